"""The refine pipeline: graph -> forward -> targets -> rules -> solve -> patch.

:func:`refine` loads the model (:class:`ModelState`: plan, runner, weights),
splits the labelled data into a training and a held-out part, runs the
configured schedule on it (:mod:`onnxfbp.schedules`), takes the output layer to
its logistic-regression optimum (:mod:`onnxfbp.fit.head`), gates the result on
the held-out (or evaluation) accuracy and writes the patched model.

- ``minibatch`` (default): every layer together, preconditioned steps on
  mini-batches, then full-pass sweeps of the narrow dense layers;
- ``jacobi`` / ``sequential``: full-pass sweeps of least-squares solves against
  label targets carried back through the inverse rules.

Every update is kept only if the held-out score improves (accuracy, ties broken
by cross-entropy). With fewer than ``min_heldout_for_depth`` held-out samples
only the output layer is refined, its regularization chosen by k-fold
cross-validation. The refined model is written only if it is at least as good
as the input model on the held-out data (or better by ``min_gain`` when asked).

With retain data (original-domain samples, ``retain_data=`` / ``--retain-data``)
the run trains on the union of both training splits (retain samples with their
labels, or, unlabelled, with the input model's outputs as targets), every
update must also keep the retain held-out figure (accuracy; another task: its
gate metric, :mod:`onnxfbp.retain`) within ``max_retain_drop`` of the input
model's, and so must the final result (else :class:`GateError`). Where that
bound cost a classifier most of the minibatch schedule's gain, the schedule runs
a second time with the retain samples anchored to the input model's logits, and
the better run is kept (:func:`onnxfbp.retain.retry_anchored`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .checks import announce, label_warnings, range_warnings
from .config import RefineConfig
from .data import LabelledData, from_arrays, load_data
from .errors import ConfigError, DataError, GateError, UnsupportedModelError
from .events import Event, Message, Progress
from .fit.head import SEED_SALT, head_cross_validated, polish_head
from .fit.tasks import GATE_METRIC, gate_value, task_gain
from .fit.tasks import retain_drop as task_retain_drop
from .graph.plan import Plan
from .multidata import KeyedLabelData, MultiInputData, load_inputs, read_label_keys
from .output.patch import check_output_path, write_refined
from .output.results import EvalResult, LayerReport, RefineResult
from .output.summary import environment, feature_maps, plan_summary, task_figures, task_outputs
from .retain import RetainLike, as_retain, attach_retain, retain_eval, retry_anchored
from .schedules.blend import blend_back
from .schedules.minibatch import train_minibatch
from .schedules.state import ModelState, RunContext, Score
from .schedules.sweeps import Sweeps, narrow_sweeps, run_sweeps

__all__ = [
    "EvalResult",
    "LayerReport",
    "RefineConfig",
    "RefineResult",
    "evaluate",
    "refine",
    "run_refine",
]

DataLike = LabelledData | tuple[np.ndarray, np.ndarray] | str | os.PathLike[str]


def _quiet(event: Event) -> None:
    """The default progress callback: nothing."""


def _as_data(data: DataLike, input_name: str, plan: Plan | None = None,
             keys: list[str] | None = None) -> LabelledData:
    if isinstance(data, LabelledData):
        return data
    if keys and keys != ["y"]:  # labels under other keys, or several (--target)
        return _keyed(data, input_name, plan, list(dict.fromkeys(keys)))
    if plan is not None and len(plan.input_names) > 1:  # a model with several inputs
        return _several_inputs(data, plan)
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, input_name)
    x, y = data
    return from_arrays(x, y)


def _keyed(data: DataLike, input_name: str, plan: Plan | None,
           keys: list[str]) -> LabelledData:
    """Inputs with the labels under ``keys``: a path, or ``(x, labels)`` with
    ``labels`` a dict of arrays by key."""
    base: LabelledData
    if isinstance(data, (str, os.PathLike)):
        if plan is not None and len(plan.input_names) > 1:
            base = load_inputs(data, plan.input_names, plan.input_shapes, labels_optional=True)
        else:
            base = load_data(data, input_name, labels_optional=True)
        return KeyedLabelData(base, read_label_keys(data, keys))
    x, labels = data  # type: ignore[misc]
    if not isinstance(labels, dict) or any(k not in labels for k in keys):
        raise DataError(f"give the labels as a dict of arrays with the keys {keys}")
    n = len(next(iter(x.values())) if isinstance(x, dict) else x)
    base = _as_data((x, np.zeros(n, np.int64)), input_name, plan)
    return KeyedLabelData(base, {k: np.asarray(labels[k]) for k in keys})


def _several_inputs(data: DataLike, plan: Plan) -> LabelledData:
    """Data of a model with several inputs: a path, or ``(x, y)`` with ``x`` a
    mapping of arrays by input name."""
    if isinstance(data, (str, os.PathLike)):
        return load_inputs(data, plan.input_names, plan.input_shapes)
    x, y = data  # type: ignore[misc]
    missing = [n for n in plan.input_names if not isinstance(x, dict) or n not in x]
    if missing:
        raise DataError(f"no inputs for the model input {missing[0]!r}; give a dict of arrays "
                        f"with the keys {plan.input_names}")
    return MultiInputData({n: from_arrays(x[n], y, f"input {n!r}") for n in plan.input_names},
                          plan.input_shapes)


@dataclass
class _Outcome:
    """What the training stage gives the report: held-out before/after and how
    they were measured."""

    before: EvalResult
    after: EvalResult
    scored_idx: np.ndarray
    n_train: int
    validation: str


def _check_refinable(state: ModelState, progress: Progress) -> None:
    plan = state.plan
    if not state.layers:
        raise UnsupportedModelError(
            "nothing to refine: no Conv/Gemm/MatMul layer with stored weights is reachable "
            "from the output"
            + (f" (boundaries: {'; '.join(plan.boundaries)})" if plan.boundaries else "")
        )
    if plan.boundaries:
        progress(Message("transitional boundaries (layers before them are left alone): "
                         + "; ".join(plan.boundaries)))


def split(n: int, config: RefineConfig) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The run's random generator and its training and held-out indices (fewer than
    10 samples, or none held out: the training part judges itself)."""
    rng = np.random.default_rng([config.split.seed, SEED_SALT])
    is_val = rng.random(n) < config.split.holdout if n >= 10 else np.zeros(n, bool)
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(val_idx) == 0:
        val_idx = train_idx
    return rng, train_idx, val_idx


def _few_heldout(state: ModelState, n_val: int, progress: Progress) -> None:
    """A few dozen held-out samples cannot tell a deeper update from over-fitting:
    keep to the output layer (measured: 100 labelled samples, all layers 0.850,
    output layer only 0.883 on rotated MNIST)."""
    head = state.config.head
    # a dense or mask sample scores every position: far more held-out labels per sample
    floor = head.min_heldout_for_depth_dense if state.task.positions > 1 \
        else head.min_heldout_for_depth
    if n_val >= floor or state.config.layers.max_layers is not None or len(state.layers) < 2:
        return
    keep = state.layers[:1]
    if len(state.plan.head_logits) > 1:  # several outputs: each one's output layer
        keep = [layer for layer in state.layers if not any(
            state.plan.nodes[i].op in ("Conv", "Gemm", "MatMul")
            for i in state.downstream[layer.name])]
    for layer in state.layers:
        if layer not in keep:
            state.skipped[layer.name] = (
                f"only {n_val} held-out samples (< {floor}): output layer only")
    state.layers = keep
    progress(Message(f"{n_val} held-out samples: refining the output layer only"))


def train_on_split(state: ModelState, ctx: RunContext) -> EvalResult | None:
    """The configured schedule on the training split, every update judged on the
    held-out split, then the output layer's logistic-regression optimum. Returns
    the held-out estimate of a refitted output layer (None: no refit)."""
    polished, estimate = (polish_head(state, ctx) if len(state.layers) == 1
                          else (False, None))
    if polished:
        return estimate
    before = Score(ctx.score.loss, ctx.score.correct)

    def schedule() -> EvalResult | None:
        if state.config.schedule == "minibatch":
            train_minibatch(state, ctx)
            # Then full-pass sweeps over the narrow dense layers: their exact
            # least-squares solves are cheap there and can jump further than small
            # steps (measured: the demo model 0.905 -> 0.946).
            narrow = narrow_sweeps(state)
            if any(layer is not state.layers[0] for layer in narrow.layers):
                run_sweeps(state, ctx, 1, narrow)
        else:
            run_sweeps(state, ctx, 0, Sweeps(state.layers, state.downstream))
        blend_back(state, ctx, before)
        if len(state.layers) > 1 and (ctx.score.correct > 0 or not state.task.classification):
            # With the features settled, take the output layer to its optimum too.
            return polish_head(state, ctx)[1]
        return None

    start, mark = dict(state.values), len(ctx.reports)
    estimate = schedule()
    if state.config.schedule == "minibatch":
        estimate = retry_anchored(state, ctx, before, start, mark, schedule, estimate)
    return estimate


def _train(state: ModelState, ctx: RunContext) -> _Outcome:
    """Cross-validate the output layer alone (too few held-out samples), or run the
    schedule on the split; the held-out results before and after."""
    n, cfg = len(ctx.data), state.config
    if (len(state.layers) == 1 and len(ctx.val_idx) < cfg.head.min_heldout_for_depth
            and n >= 10 and ctx.retain is None):
        # Too few held-out samples to steer by: the output layer alone, its
        # regularization chosen by k-fold cross-validation on every sample and
        # judged by its out-of-fold predictions.
        cross_validated = head_cross_validated(state, ctx)
        if cross_validated is not None:
            before, after = cross_validated
            validation = f"{min(cfg.head.folds, n)}-fold cross-validation on all {n} samples"
            return _Outcome(before, after, np.arange(n), n, validation)
    t = time.perf_counter()
    before = state.evaluate(ctx.data, ctx.val_idx)
    state.timings["evaluate_before"] += time.perf_counter() - t
    n_val = len(ctx.val_idx)
    if state.task.classification:
        ctx.score = Score(before.loss * n_val, round(before.accuracy * n_val))  # type: ignore[operator]
    else:  # correct positions (dense, binary) or none (regression), not samples
        ctx.score = Score(*state.scores(ctx.data, ctx.val_idx)[:2])
    estimate = train_on_split(state, ctx)
    validation = "held-out split"
    if estimate is not None:  # before the output layer saw the held-out split
        after = estimate
        validation += " (then the output layer refitted on all samples)"
    else:
        after = state.evaluate(ctx.data, ctx.val_idx)
    return _Outcome(before, after, ctx.val_idx, len(ctx.train_idx), validation)


def run_refine(
    state: ModelState,
    data: LabelledData,
    eval_data: LabelledData | None = None,
    progress: Progress | None = None,
    retain_data: LabelledData | None = None,
) -> RefineResult:
    """Refine ``state``'s weights in memory on ``data`` (and ``retain_data``,
    see the module docstring): validate, train, evaluate and describe the run
    (no gate, nothing written; ``state.values`` hold the result)."""
    progress = progress or _quiet
    t0 = time.perf_counter()
    plan, timings = state.plan, state.timings
    cfg_task = state.config.task
    task = state.detect_task(data, cfg_task.task, cfg_task.loss)
    for d in (data, eval_data, retain_data):
        if d is not None:
            d.validate(plan.input_shape, task.n_classes if not task.classification
                       else plan.n_classes, _LABELS[task.kind])
    _check_refinable(state, progress)
    warnings = announce((label_warnings(data, plan.n_classes) if task.classification else [])
                        + (range_warnings(data, retain_data) if len(plan.input_names) == 1
                           else []), progress)
    rng, train_idx, val_idx = split(len(data), state.config)
    timings["validate"] = time.perf_counter() - t0
    _few_heldout(state, len(val_idx), progress)
    t = time.perf_counter()
    eval_before = state.evaluate(eval_data) if eval_data is not None else None
    shown = (eval_data, np.arange(len(eval_data))) if eval_data is not None else (data, val_idx)
    shown_before = task_outputs(state, *shown)  # the task figures': eval data, else held-out
    timings["evaluate_before"] = time.perf_counter() - t
    ctx = RunContext(data, train_idx, val_idx, rng, Score(0.0, 0), progress)
    retained, retain_before = None, None
    if retain_data is not None:
        t = time.perf_counter()
        retained, retain_before = attach_retain(state, ctx, retain_data)
        timings["evaluate_before"] += time.perf_counter() - t
    outcome = _train(state, ctx)
    final_rounding = None
    # QDQ (docs/quant.md); in process only (a cluster's state streams its passes)
    if state.quant and state.config.layers.gptq_finish and type(state) is ModelState:
        from .quant.finish import finish_rounding  # noqa: PLC0415

        final_rounding = finish_rounding(state, ctx)
        if final_rounding is not None and final_rounding["kept"] == "gptq":
            outcome.after = state.evaluate(ctx.data, outcome.scored_idx)
    timings["forward_and_targets"] = state.clock.forward
    timings["solve"] = state.clock.solve
    t = time.perf_counter()
    eval_after = state.evaluate(eval_data) if eval_data is not None else None
    retain_after, agreement = (retain_eval(state, retained) if retained is not None
                               else (None, None))
    shown_after = task_outputs(state, *shown)
    timings["evaluate_after"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return RefineResult(
        model=state.patched_model(),
        written=None,
        layers=ctx.reports,
        heldout_before=outcome.before,
        heldout_after=outcome.after,
        eval_before=eval_before,
        eval_after=eval_after,
        retain_before=retain_before,
        retain_after=retain_after,
        timings=dict(timings),
        environment=environment(state),
        plan=plan_summary(state, ctx.reports),
        config=state.config.to_dict(),
        feature_maps=feature_maps(state, data, outcome.scored_idx[:4]),
        task_figures=task_figures(shown_before, shown_after,
                                  "held-out" if eval_data is None else "eval"),
        warnings=warnings,
        model_path=str(state.model_path),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data={
            "adapt": {"source": data.source, "n": len(data)},
            "train": outcome.n_train,
            "heldout": len(outcome.scored_idx),
            "validation": outcome.validation,
            "eval": None
            if eval_data is None
            else {"source": eval_data.source, "n": len(eval_data)},
            "retain": None if retained is None else {
                "source": retained.data.source, "n": len(retained.data),
                "labelled": retained.data.labelled, "train": len(retained.train_idx),
                "heldout": len(retained.val_idx),
                "targets": "labels" if retained.data.labelled else "model outputs",
                "agreement": agreement,  # with the input model's predictions, after
                # the pull toward the input model's logits (classifiers) and the second,
                # anchored run of the schedule (null: not needed)
                "anchor": None if ctx.anchor is None else {
                    "weight": ctx.anchor.weight, "second_run": ctx.anchor.outcome},
                **({"scale": retained.scale} if task.kind == "regression" else {}),
            },
            **({"final_rounding": final_rounding} if final_rounding is not None else {}),
            **({"blend": ctx.blend} if ctx.blend is not None else {}),
        },
    )


_LABELS = {"classification": "classes", "dense": "dense", "binary": "values",
           "regression": "values", "multi": "classes"}


def _gate(result: RefineResult, config: RefineConfig) -> None:
    """Set ``result.gate``; raise :class:`GateError` (with the result) if it fails."""
    gate_before, gate_after = result.heldout_before, result.heldout_after
    if result.eval_before is not None and result.eval_after is not None:
        gate_before, gate_after = result.eval_before, result.eval_after
    gain = gate_after.accuracy - gate_before.accuracy
    metric = "eval_accuracy" if gate_after is result.eval_after else "heldout_accuracy"
    if gate_after.task is not None:  # the task's metric (lower-is-better ones negated)
        name = GATE_METRIC[gate_after.task][0]
        gain = task_gain(gate_before, gate_after)
        metric = ("eval_" if gate_after is result.eval_after else "heldout_") + name
    min_gain = config.gate.min_gain
    failure = None
    if min_gain is not None and gain < min_gain:
        failure = f"held-out accuracy gain {gain:+.4f} is below --min-gain {min_gain}"
    elif gain < 0 and not config.gate.allow_worse:
        failure = f"refined model is worse on held-out data ({gain:+.4f})"
    max_drop = config.retain.max_retain_drop
    retain_drop = None
    rb, ra = result.retain_before, result.retain_after
    if rb is not None and ra is not None:
        retain_drop = task_retain_drop(rb, ra, (result.data.get("retain") or {}).get("scale", 1.0))
        if failure is None and retain_drop > max_drop + 1e-12:
            name = GATE_METRIC[rb.task][0] if rb.task is not None else "accuracy"
            failure = (f"retain held-out {name} {'rose' if rb.task == 'regression' else 'dropped'}"
                       f" {retain_drop:.4f} ({gate_value(rb):.4f} -> {gate_value(ra):.4f}"
                       f"{', relative to its scale' if rb.task == 'regression' else ''}), more "
                       f"than --max-retain-drop {max_drop:g}; raise --max-retain-drop or give "
                       "more retain data")
    result.gate = {
        "metric": metric,
        "before": gate_value(gate_before),
        "after": gate_value(gate_after),
        "gain": gain,
        "min_gain": min_gain,
        "retain_drop": retain_drop,
        "max_retain_drop": max_drop if retain_drop is not None else None,
        "passed": failure is None,
    }
    if failure is not None:
        error = GateError(f"{failure}; nothing written")
        error.result = result  # type: ignore[attr-defined]  # lets the CLI still write the report
        raise error


def refine(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    data: DataLike,
    y: np.ndarray | None = None,
    *,
    config: RefineConfig | None = None,
    eval_data: DataLike | None = None,
    retain_data: RetainLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
    teacher: str | os.PathLike[str] | None = None,
    client: Any = None,
) -> RefineResult:
    """Refine ``model`` on labelled data and write the result to ``output``.

    ``data`` is a path (.npz, .npy directory, shard directory), a
    :class:`LabelledData`, or inputs ``x`` with labels ``y`` given as the next
    argument. ``retain_data`` (same forms; ``(x, None)`` or a file without
    ``y`` for unlabelled samples) is original-domain data to keep: see the module
    docstring. ``progress`` receives the run's events (:mod:`onnxfbp.events`).
    Returns the report; raises :class:`OnnxfbpError` subclasses for user errors
    and :class:`GateError` when the held-out gate is not met or the retain
    accuracy drops more than ``max_retain_drop`` (then nothing is written).
    With ``teacher`` (the float model a QDQ ``model`` was quantized from) the
    labels are optional: the teacher's predictions are the targets
    (:mod:`onnxfbp.quant.teacher`).
    With a ``distributed.Client`` as ``client`` the passes over the data run on its
    workers, which read ``data`` (a path) themselves (:mod:`onnxfbp.cluster`).
    """
    config = config or RefineConfig()
    if output is not None:
        check_output_path(Path(model), Path(output), force)
    state: ModelState
    adapt: LabelledData
    held: LabelledData | None
    coach = None
    if client is not None:
        from .cluster import start  # noqa: PLC0415 (dask only when asked for)

        if teacher is not None:
            raise ConfigError("--teacher is not supported with --dask yet; "
                              "run the recovery without --dask")
        state, adapt, held = start(client, model, config, data if y is None else (data, y),
                                   eval_data, retain_data, progress or _quiet)
        kept = None
    else:
        state = ModelState(model, config)
        name = state.plan.input_name
        keys = list(state.label_keys.values())
        held = _as_data(eval_data, name, state.plan, keys) if eval_data is not None else None
        if teacher is not None:
            from .quant.teacher import open_teacher  # noqa: PLC0415

            coach = open_teacher(teacher, state)
            given = (load_data(data, name, labels_optional=True)
                     if isinstance(data, (str, os.PathLike)) and y is None
                     else as_retain((data, y) if y is not None else data, name))  # type: ignore[arg-type]
            adapt = coach.prepare(state, given, held, progress or _quiet)
        else:
            adapt = _as_data((data, y) if y is not None else data, name,  # type: ignore[arg-type]
                             state.plan, keys)
        kept = as_retain(retain_data, name) if retain_data is not None else None
    result = run_refine(state, adapt, held, progress, kept)
    if coach is not None:
        coach.settle(state, result, progress or _quiet)
        result.data["teacher"] = {"path": str(teacher), **coach.summary}
    if client is not None:
        result.environment["cluster"] = state.record()  # type: ignore[attr-defined]
    _gate(result, config)
    if output is not None:
        t = time.perf_counter()
        write_refined(result.model, Path(output), force, input_path=Path(model))
        result.timings["write"] = time.perf_counter() - t
        result.written = str(output)
    return result


def evaluate(
    model: str | os.PathLike[str],
    data: DataLike,
    y: np.ndarray | None = None,
    *,
    device: str = "auto",
    batch_size: int = 500,
    output: str | None = None,
    task_override: str | None = None,
    loss: str | None = None,
    targets: tuple[str, ...] = (),
) -> EvalResult:
    """Accuracy of ``model`` on labelled data (same inputs as :func:`refine`)."""
    state = ModelState(model, RefineConfig.of(device=device, batch_size=batch_size,
                                              output_name=output, targets=targets),
                       layers=False)
    adapt = _as_data((data, y) if y is not None else data, state.plan.input_name,  # type: ignore[arg-type]
                     state.plan, list(state.label_keys.values()))
    task = state.detect_task(adapt, task_override, loss or "mse")
    adapt.validate(state.plan.input_shape, task.n_classes if not task.classification
                   else state.plan.n_classes, _LABELS[task.kind])
    result = state.evaluate(adapt)
    # the output scored (CLI: eval --json names it), with today's figures for a classifier
    result.metrics = {**(result.metrics or {"task": "classification", "n": result.n,
                                            "accuracy": result.accuracy, "loss": result.loss}),
                      "output": state.plan.output_name}
    return result
