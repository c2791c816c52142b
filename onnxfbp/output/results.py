"""What a refine run returns: per-layer reports, accuracies and the JSON report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

__all__ = ["EvalResult", "LayerReport", "RefineResult", "eval_result"]


@dataclass
class LayerReport:
    """What happened to one layer in one sweep.

    ``lam`` is the regularization weight the layer's update used, by schedule:
    the chosen ridge ``lam / mean diag(G)`` of a least-squares sweep
    (``SweepConfig.ridge_grid``), the preconditioner ``damping`` of the minibatch
    schedule, or the chosen L2 weight of the output layer's logistic regression
    (``HeadConfig.l2_grid``); None when no finite solve was found.

    ``outcome`` says what became of the update: ``kept`` (the weights changed),
    ``reverted`` (tried, then undone: ``reason`` says why, e.g. ``diverged at
    step 13; step halved 3 times; reverted``) or ``skipped`` (no finite update,
    e.g. non-finite features reached a solve: the layer is left unchanged).
    ``accepted`` is ``outcome == "kept"``."""

    sweep: int
    name: str
    op: str
    weight_shape: list[int]
    accepted: bool
    reason: str
    lam: float | None = None
    relative_change: float = 0.0
    residual_before: float | None = None  # held-out target residual, per row
    residual_after: float | None = None
    heldout_accuracy: float | None = None
    seconds: float = 0.0
    outcome: str | None = None  # "kept", "reverted" (tried, then undone) or "skipped"
    halvings: int = 0  # minibatch blow-ups survived (each halved the step)


@dataclass
class EvalResult:
    """Accuracy, sample count, mean cross-entropy, per-class accuracy, confusion."""

    accuracy: float
    n: int
    loss: float | None = None
    per_class: list[float] | None = None
    confusion: list[list[int]] | None = None
    task: str | None = None  # None: classification; else dense, binary or regression
    metrics: dict[str, Any] | None = None  # that task's figures (onnxfbp.fit.tasks.Metrics)


def eval_result(
    loss: float, correct: int, preds: np.ndarray, labels: np.ndarray, n_classes: int | None
) -> EvalResult:
    """The :class:`EvalResult` of summed cross-entropy ``loss``, ``correct`` count
    and predictions ``preds`` against ``labels``."""
    k = int(max(n_classes or 0, labels.max(initial=0) + 1, preds.max(initial=0) + 1))
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class = (np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)).round(6).tolist()
    n = len(labels)
    return EvalResult(correct / max(n, 1), n, loss / max(n, 1), per_class, confusion.tolist())


@dataclass
class RefineResult:
    """Outcome of :func:`onnxfbp.refine`; ``to_dict()`` is the JSON report."""

    model: onnx.ModelProto
    written: str | None
    layers: list[LayerReport]
    heldout_before: EvalResult
    heldout_after: EvalResult
    eval_before: EvalResult | None = None
    eval_after: EvalResult | None = None
    # the held-out part of the retain (original-domain) data; unlabelled: agreement
    # with the input model's predictions
    retain_before: EvalResult | None = None
    retain_after: EvalResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # RefineConfig.to_dict(): nested
    feature_maps: dict[str, Any] = field(default_factory=dict)
    # per trained output that is not a classifier: what its figure draws (summary.task_figures)
    task_figures: dict[str, Any] = field(default_factory=dict)
    model_path: str | None = None
    created: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # sample counts and sources
    gate: dict[str, Any] = field(default_factory=dict)  # metric, gain, min_gain, passed
    warnings: list[str] = field(default_factory=list)  # suspicious data (onnxfbp.checks)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (strict JSON: non-finite numbers become null)."""
        return finite_json(
            {
                "schema": "onnxfbp.report/1",
                "created": self.created,
                "model": self.model_path,
                "written": self.written,
                "data": self.data,
                "gate": self.gate,
                "heldout": {
                    "before": asdict(self.heldout_before),
                    "after": asdict(self.heldout_after),
                },
                "eval": None
                if self.eval_before is None
                else {
                    "before": asdict(self.eval_before),
                    "after": asdict(self.eval_after) if self.eval_after else None,
                },
                "retain": None
                if self.retain_before is None
                else {
                    "before": asdict(self.retain_before),
                    "after": asdict(self.retain_after) if self.retain_after else None,
                },
                "layers": [asdict(layer) for layer in self.layers],
                "timings": self.timings,
                "environment": self.environment,
                "plan": self.plan,
                "config": self.config,
                "feature_maps": self.feature_maps,
                "task_figures": self.task_figures,
                "warnings": self.warnings,
            }
        )


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float as None (NumPy scalars and arrays as
    lists): what JSON output holds, so that it is always valid JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy scalars and arrays
        return finite_json(value.tolist())
    return value
