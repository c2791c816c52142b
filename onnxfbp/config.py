"""Settings of a refine run: one small frozen dataclass per concern.

:class:`RefineConfig` composes them; the defaults need no tuning. Every setting
has one name across all sections, so a run can be described flat::

    RefineConfig.of(device="cpu", epochs=1.0, step_batch=100)
    config.replace(max_layers=2)          # a copy with these settings changed

Four regularization weights, four names (each reported as a layer's ``lam``):

- ``MinibatchConfig.damping``: the preconditioner's ``lam = damping * mean diag(C)``
  added to each layer's row Gram ``C`` (minibatch schedule);
- ``SweepConfig.ridge_grid``: the candidates ``lam / mean diag(G)`` of the
  proximal least-squares solve ``||X W - T||^2 + lam ||W - W0||^2`` (jacobi and
  sequential sweeps; the held-out residual picks one);
- ``HeadConfig.l2_grid``: the candidates of the output layer's L2-regularized
  logistic regression (held-out or cross-validated cross-entropy picks one);
- ``SweepConfig.mu``: the proximal weight of the inverse rules that carry a
  target back (relative; not chosen, not reported).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError

__all__ = [
    "Device",
    "GateConfig",
    "HeadConfig",
    "LayersConfig",
    "MinibatchConfig",
    "RefineConfig",
    "RetainConfig",
    "RunConfig",
    "Schedule",
    "SplitConfig",
    "SweepConfig",
    "TaskConfig",
]

Schedule = Literal["minibatch", "jacobi", "sequential"]
Device = Literal["auto", "cpu", "cuda"]
SCHEDULES = ("minibatch", "jacobi", "sequential")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the forward passes run."""

    device: Device = "auto"
    threads: int | None = None  # onnxruntime intra-op threads (None: all cores)
    batch_size: int = 500  # samples per forward batch (scores, sums, features)


@dataclass(frozen=True)
class SplitConfig:
    """The held-out part of the labelled data that judges every update."""

    holdout: float = 0.2  # fraction held out (fewer than 10 samples: none, train judges)
    seed: int = 0  # seeds the split and every random draw of the run


@dataclass(frozen=True)
class LayersConfig:
    """Which layers a run may change."""

    max_layers: int | None = None  # at most this many refinable layers, from the output
    deep: bool = False  # jacobi/sequential: also layers whose target passes a Conv inverse
    output_name: str | None = None  # the class-score output (default: found automatically)
    requantize_scales: bool = False  # QDQ --teacher: refit each weight's scale (docs/quant.md)
    gptq_finish: bool = True  # QDQ: round the run's result again by GPTQ (docs/quant.md)


@dataclass(frozen=True)
class MinibatchConfig:
    """The default schedule: preconditioned steps of every layer on mini-batches
    (:mod:`onnxfbp.schedules.minibatch`)."""

    step_batch: int = 100  # samples per step
    epochs: float = 3.0  # passes over the training split at most (patience ends it sooner)
    average: float = 0.9  # checks score the running average of the steps (0: off)
    lr: float = 0.05  # each step moves every layer by this fraction of its weight norm
    damping: float = 1.0  # preconditioner lam / mean diag of each layer's row Gram
    precond_samples: int = 1000  # samples whose rows estimate each layer's Gram
    gram_positions: int = 16  # conv output positions per sample in those rows
    step_positions: int = 48  # conv output positions of each step's rows
    checks_per_epoch: int = 2  # held-out checks per epoch
    patience: int = 2  # checks without a held-out gain before the schedule stops
    halvings: int = 6  # blow-ups survived (each halves the step) before the schedule stops
    compiled_reverse: bool = True  # carry residuals back with an onnxruntime graph
    sweep_max_inputs: int = 1024  # then sweep dense layers with at most this d_in + 1


@dataclass(frozen=True)
class SweepConfig:
    """Full-pass sweeps of least-squares solves (jacobi and sequential schedules,
    and the dense layers after the minibatch schedule)."""

    sweeps: int = 5  # at most (stop early when the held-out score stops improving)
    target_step: float = 20.0  # logit-space step of the label target
    mu: float = 1.0  # proximal weight of the inverse rules (relative)
    ridge_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # lam / mean diag(G), first sweep
    jacobi_steps: tuple[float, ...] = (1.0, 0.5)  # joint-update scales tried on held-out data
    min_sweep_gain: float = 0.002  # stop after a sweep that gains less held-out accuracy
    positions: int = 16  # conv output positions per sample in the normal equations


@dataclass(frozen=True)
class HeadConfig:
    """The output layer's logistic-regression solve (:mod:`onnxfbp.fit.head`)."""

    l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # lam / mean diag(x^T x)
    iterations: int = 100  # bound-optimization iterations per lam
    max_rows: int = 20000  # samples per split used by the solve
    refit: bool = True  # refit on train + held-out with the chosen lam
    min_z: float = 1.0  # kept only on a held-out sign test's p <= Phi(-min_z) (fit.head)
    min_heldout_for_depth: int = 100  # fewer held-out samples: output layer only, by CV
    min_heldout_for_depth_dense: int = 20  # the same for dense and mask tasks (labels per position)
    folds: int = 5  # cross-validation folds for that case


@dataclass(frozen=True)
class GateConfig:
    """When the refined model is written."""

    min_gain: float | None = None  # required held-out accuracy gain, else GateError
    allow_worse: bool = False  # write even if held-out accuracy dropped


@dataclass(frozen=True)
class RetainConfig:
    """Keeping the original domain. With retain data (``--retain-data``) every
    update must keep its held-out accuracy (another task: its gate metric,
    :mod:`onnxfbp.retain`) within ``max_retain_drop`` of the input model's; with
    or without it, the schedule's change is blended back toward the input
    weights as far as the held-out split allows (:mod:`onnxfbp.schedules.blend`)."""

    max_retain_drop: float = 0.01  # largest allowed retain held-out accuracy drop, in [0, 1]
    # the retain data's held-out fraction, which judges that bound: a bound of 1 point
    # needs hundreds of samples (0.2 of 1,000 allows a drop of 2 samples)
    retain_holdout: float = 0.5
    # the fractions of the schedule's change tried when blending back (schedules.blend)
    blend_grid: tuple[float, ...] = (0.25, 0.5, 0.75)
    # labelled classifiers: the weight kappa of the pull of the retain training samples' logits
    # toward the input model's, kappa (z0 - z), in the schedule's second run, when the
    # retain bound cost most of the first's gain (refine.train_on_split; 0: no second run)
    retain_anchor: float = 0.3


@dataclass(frozen=True)
class TaskConfig:
    """What the target output learns (:mod:`onnxfbp.fit.tasks`): the task follows
    from the labels and the output unless ``task`` names it; ``loss`` is the
    regression loss."""

    task: str | None = None  # classification, dense, binary or regression (None: detected)
    loss: str = "mse"  # regression loss: mse, l1 or huber
    targets: tuple[str, ...] = ()  # "OUTPUT=KEY": outputs trained on those labels (() : y)
    target_weights: tuple[str, ...] = ()  # "OUTPUT=W": that output's loss weight (default 1)


_SECTIONS = {
    "run": RunConfig, "split": SplitConfig, "layers": LayersConfig,
    "minibatch": MinibatchConfig, "sweep": SweepConfig, "head": HeadConfig, "gate": GateConfig,
    "retain": RetainConfig, "task": TaskConfig,
}
# flat setting name -> its section
_SECTION_OF = {f.name: section for section, cls in _SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class RefineConfig:
    """Settings of a refine run, by concern; checked when built (:class:`ConfigError`
    lists every setting out of range)."""

    schedule: Schedule = "minibatch"
    run: RunConfig = field(default_factory=RunConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    minibatch: MinibatchConfig = field(default_factory=MinibatchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    retain: RetainConfig = field(default_factory=RetainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        bad = _problems(self)
        if bad:
            raise ConfigError("setting out of range: " + "; ".join(bad) + "; change it and rerun")

    @classmethod
    def of(cls, **settings: Any) -> RefineConfig:
        """The defaults with ``settings`` (flat names, e.g. ``device``, ``epochs``)."""
        return cls().replace(**settings)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> RefineConfig:
        """From a nested dict as :meth:`to_dict` gives (missing settings: defaults)."""
        flat: dict[str, Any] = {}
        for key, value in settings.items():
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return cls.of(**flat)

    def replace(self, **settings: Any) -> RefineConfig:
        """A copy with ``settings`` (flat names) changed; unknown names: ConfigError."""
        top = {k: settings.pop(k) for k in list(settings) if k == "schedule"}
        unknown = [k for k in settings if k not in _SECTION_OF]
        if unknown:
            raise ConfigError(f"unknown setting {', '.join(unknown)}; use one of "
                              f"schedule, {', '.join(sorted(_SECTION_OF))}")
        changes: dict[str, Any] = dict(top)
        for section in _SECTIONS:
            mine = {k: v for k, v in settings.items() if _SECTION_OF[k] == section}
            if mine:
                changes[section] = dataclasses.replace(getattr(self, section), **mine)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Nested by concern (the report's ``config``)."""
        return dataclasses.asdict(self)


def _problems(config: RefineConfig) -> list[str]:
    """Each setting out of range, as ``name value (what it must be)``."""
    bad = []
    if config.schedule not in SCHEDULES:
        bad.append(f"schedule {config.schedule!r} (minibatch, jacobi or sequential)")
    if config.run.device not in ("auto", "cpu", "cuda"):
        bad.append(f"device {config.run.device!r} (auto, cpu or cuda)")
    if not 0.0 <= config.split.holdout < 1.0:
        bad.append(f"holdout {config.split.holdout} (a fraction in [0, 1))")
    if not (math.isfinite(config.head.min_z) and config.head.min_z >= 0):
        bad.append(f"min_z {config.head.min_z} (a number >= 0)")
    if not 0.0 < config.retain.retain_holdout < 1.0:
        bad.append(f"retain_holdout {config.retain.retain_holdout} (a fraction in (0, 1))")
    if not (math.isfinite(config.retain.retain_anchor) and config.retain.retain_anchor >= 0):
        bad.append(f"retain_anchor {config.retain.retain_anchor} (a weight >= 0)")
    if not all(math.isfinite(a) and 0.0 < a < 1.0 for a in config.retain.blend_grid):
        bad.append(f"blend_grid {config.retain.blend_grid} (fractions in (0, 1))")
    drop = config.retain.max_retain_drop
    if not (math.isfinite(drop) and 0.0 <= drop <= 1.0):
        bad.append(f"max_retain_drop {drop} (a fraction in [0, 1])")
    mb = config.minibatch
    if not 0.0 <= mb.average < 1.0:
        bad.append(f"average {mb.average} (a fraction in [0, 1))")
    for key, value in (("epochs", mb.epochs), ("lr", mb.lr), ("damping", mb.damping)):
        if not (math.isfinite(value) and value > 0):
            bad.append(f"{key} {value} (a positive number)")
    at_least_one = {
        "sweeps": config.sweep.sweeps, "batch_size": config.run.batch_size,
        "step_batch": mb.step_batch, "precond_samples": mb.precond_samples,
        "checks_per_epoch": mb.checks_per_epoch, "patience": mb.patience,
        "gram_positions": mb.gram_positions, "step_positions": mb.step_positions,
        "positions": config.sweep.positions,
    }
    for key, value in at_least_one.items():
        if value < 1:
            bad.append(f"{key} {value} (at least 1)")
    if config.task.task not in (None, "classification", "dense", "binary", "regression"):
        bad.append(f"task {config.task.task!r} (classification, dense, binary or regression)")
    if config.task.loss not in ("mse", "l1", "huber"):
        bad.append(f"loss {config.task.loss!r} (mse, l1 or huber)")
    if config.layers.max_layers is not None and config.layers.max_layers < 1:
        bad.append(f"max_layers {config.layers.max_layers} (at least 1)")
    return bad
