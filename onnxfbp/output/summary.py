"""The descriptive parts of a refine report: environment, plan, feature maps and
the task figures' data (predicted vs true values, masks before and after)."""

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

__all__ = ["environment", "feature_maps", "plan_summary", "task_figures", "task_outputs"]


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


# The bounds of the report's task figures (``task_figures``), whatever the data's size.
MAX_SCATTER_POINTS = 500  # regression: samples per output
MAX_SCATTER_DIMS = 4  # regression: the first values of each sample's (flattened) target
MASK_SAMPLES = 3  # dense, binary: samples per output
MAX_MASK_SIDE = 128  # dense, binary: masks and inputs strided down to this many per side


def _heads(state: ModelState) -> list[tuple[str, str, str | None, Any]]:
    """(output, target tensor, label key or None, task) of each trained output
    that is not a classifier."""
    from ..fit.tasks import MultiTask  # noqa: PLC0415

    task = state.task
    heads = ([(h.output, h.logits, h.key, h.task) for h in task.heads]
             if isinstance(task, MultiTask) else
             [(state.plan.output_name, state.plan.logits, None, task)])
    return [h for h in heads if h[3].kind in ("regression", "dense", "binary")]


def _strided(a: np.ndarray) -> np.ndarray:
    """``a`` [s, h, w] strided to at most MAX_MASK_SIDE per side."""
    step = -(-max(a.shape[1:], default=1) // MAX_MASK_SIDE)
    return a[:, ::step, ::step]


def task_outputs(state: ModelState, data: LabelledData, idx: np.ndarray) -> dict[str, Any]:
    """What the report's task figures need of the current weights, per trained
    output that is not a classifier, on the first samples of ``idx``: regression,
    the first MAX_SCATTER_DIMS values of MAX_SCATTER_POINTS samples (true and
    predicted); dense and binary, MASK_SAMPLES samples (the first channel of the
    first input, the true and the predicted mask: classes, or 0/1). Nothing (no
    forward pass) for a classifier."""
    out: dict[str, Any] = {}
    for output, logits, key, task in _heads(state):
        regression = task.kind == "regression"
        chosen = np.sort(np.asarray(idx)[:MAX_SCATTER_POINTS if regression else MASK_SAMPLES])
        x, y = data.take(chosen)
        labels = np.asarray(y[key] if isinstance(y, dict) else y)
        pred = np.asarray(task.predictions(state.frozen_forward([logits])(x)[logits], labels))
        entry: dict[str, Any] = {"task": task.kind, "samples": chosen}
        if regression:
            entry["true"] = labels.reshape(len(chosen), -1)[:, :MAX_SCATTER_DIMS]
            entry["pred"] = pred.reshape(len(chosen), -1)[:, :MAX_SCATTER_DIMS]
        else:
            truth = (labels >= 0.5).astype(np.int64) if task.kind == "binary" else labels
            if truth.ndim < 3 or int(np.prod(truth.shape[1:-2])) != 1:
                continue  # not one 2-D mask per sample: nothing to draw
            masks = [a.reshape(len(chosen), *truth.shape[-2:]) for a in (truth, pred)]
            first = x[state.plan.input_names[0]] if isinstance(x, dict) else x
            entry["input"] = (_strided(np.asarray(first)[:, 0]) if np.ndim(first) == 4
                              else None)
            entry["true"], entry["pred"] = _strided(masks[0]), _strided(masks[1])
        out[output] = entry
    return out


def task_figures(before: dict[str, Any], after: dict[str, Any], split: str) -> dict[str, Any]:
    """The report's ``task_figures``: by output, :func:`task_outputs` before and
    after the run on the same samples of ``split``."""
    out: dict[str, Any] = {}
    for output, b in before.items():
        a = after.get(output)
        if a is None:
            continue
        def values(v: Any, regression: bool = b["task"] == "regression") -> Any:
            return (np.round(np.asarray(v, np.float64), 5) if regression
                    else np.asarray(v, np.int64)).tolist()

        entry = {"task": b["task"], "split": split,
                 "samples": [int(i) for i in b["samples"]],
                 "true": values(b["true"]), "before": values(b["pred"]),
                 "after": values(a["pred"])}
        if b["task"] != "regression":
            entry["input"] = (None if b["input"] is None
                              else np.round(np.asarray(b["input"], np.float64), 3).tolist())
        out[output] = entry
    return out
