"""The descriptive parts of a refine report: environment, plan and feature maps."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .. import __version__
from ..data import LabelledData
from ..reverse.arrays import reverse_target
from ..run.backend import to_numpy
from ..schedules.state import ModelState
from .results import LayerReport

__all__ = ["environment", "feature_maps", "plan_summary"]


def environment(state: ModelState) -> dict[str, Any]:
    """Versions, device, providers, batch mode and the reverse pass of the run."""
    return {
        "onnxfbp": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": state.device,
        "providers": state.providers,
        "batch_mode": "dynamic"
        if state.runner.chunk is None
        else f"fixed chunks of {state.runner.chunk}",
        "reverse_pass": state.reverse_pass,
        "kept_branch": state.kept_branch,
    }


def layer_changed(state: ModelState) -> dict[str, bool]:
    """For each selected layer: whether its weight or bias values differ from the
    input model's (the truth the report's ``refined`` shows)."""
    out = {}
    for layer in state.layers:
        inits = [layer.weight.initializer]
        if layer.bias is not None:
            inits.append(layer.bias.initializer)
        out[layer.name] = any(
            not np.array_equal(state.values[i], state.original[i]) for i in inits)
    return out


def plan_summary(state: ModelState, reports: list[LayerReport] | None = None) -> dict[str, Any]:
    """Input, output, logits, classes, boundaries and every layer with its status:
    ``selected`` (the run tried to refine it), ``changed`` / ``refined`` (its weights
    differ from the input model's: only then ``refined`` is true), ``outcome``
    (``changed``, ``reverted``, ``skipped``, ``unchanged`` or ``not selected``) and ``reason``
    (why it is not refined)."""
    plan = state.plan
    selected = {layer.name for layer in state.layers}
    changed = layer_changed(state)
    last: dict[str, LayerReport] = {}
    for report in reports or []:
        last[report.name] = report
    rows = []
    for layer in plan.layers:
        is_changed = changed.get(layer.name, False)
        if is_changed:
            outcome, reason = "changed", None
        elif layer.name in selected:
            undone = next((r for r in reversed(reports or []) if r.name == layer.name
                           and r.outcome in ("reverted", "skipped")), None)
            outcome = undone.outcome or "unchanged" if undone is not None else "unchanged"
            reason = (undone.reason if undone is not None
                      else last[layer.name].reason if layer.name in last
                      else "selected; no update was kept")
        else:
            outcome, reason = "not selected", layer.reason or state.skipped.get(layer.name)
        rows.append({"name": layer.name, "op": layer.op, "refined": is_changed,
                     "selected": layer.name in selected, "changed": is_changed,
                     "outcome": outcome, "reason": reason})
    return {
        "input": plan.input_name,
        "output": plan.output_name,
        "logits": plan.logits,
        "output_kind": plan.output_kind,
        "n_classes": plan.n_classes,
        "boundaries": plan.boundaries,
        "layers": rows,
    }


def feature_maps(
    state: ModelState, data: LabelledData, idx: np.ndarray, channels: int = 6
) -> dict[str, Any]:
    """For a few samples: each refined layer's actual output next to the target
    reconstructed for it from the labels (final weights): the ``channels`` conv
    channels where they differ most, or the first 64 dense features."""
    if not len(idx):
        return {}
    x, y = data.take(np.sort(idx))
    views = state.views()
    cfg = state.config.sweep
    out: dict[str, Any] = {}
    for layer in state.layers:
        acts = state.forward(x, state.needed(layer))
        t_logits = state.label_target(acts, y, cfg.target_step)
        target = to_numpy(reverse_target(
            state.plan, acts, t_logits, layer, state.downstream[layer.name], views, cfg.mu))
        actual = to_numpy(acts[layer.output])
        if actual.ndim == 4:
            energy = np.abs(target - actual).mean(axis=(0, 2, 3))
            chosen = np.sort(np.argsort(energy)[::-1][:channels])
            actual, target = actual[:, chosen], target[:, chosen]
        else:
            chosen = np.arange(min(actual.shape[-1], 64))
            actual, target = actual[..., chosen], target[..., chosen]
        out[layer.name] = {
            "op": layer.op,
            "samples": [int(i) for i in np.sort(idx)],
            "labels": [int(v) for v in y] if state.task.classification else None,
            "channels": [int(c) for c in chosen],
            "actual": np.round(actual.astype(np.float64), 4).tolist(),
            "target": np.round(target.astype(np.float64), 4).tolist(),
        }
        if out[layer.name]["labels"] is None:  # class labels only (not values, not masks)
            del out[layer.name]["labels"]
    return out
