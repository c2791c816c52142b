"""The descriptive parts of a refine report: environment, plan and feature maps."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .. import __version__
from ..data import LabelledData
from ..fit.targets import label_target
from ..reverse.arrays import reverse_target
from ..run.backend import to_numpy
from ..schedules.state import ModelState

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


def plan_summary(state: ModelState) -> dict[str, Any]:
    """Input, output, logits, classes, boundaries and every layer with its status."""
    plan = state.plan
    refined = {layer.name for layer in state.layers}
    return {
        "input": plan.input_name,
        "output": plan.output_name,
        "logits": plan.logits,
        "output_kind": plan.output_kind,
        "n_classes": plan.n_classes,
        "boundaries": plan.boundaries,
        "layers": [
            {
                "name": layer.name,
                "op": layer.op,
                "refined": layer.name in refined,
                "reason": layer.reason or state.skipped.get(layer.name),
            }
            for layer in plan.layers
        ],
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
    logits = state.plan.logits
    out: dict[str, Any] = {}
    for layer in state.layers:
        acts = state.forward(x, state.needed(layer))
        z = acts[logits].reshape(len(y), -1)
        t_logits = label_target(z, y, cfg.target_step).reshape(acts[logits].shape)
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
            "labels": [int(v) for v in y],
            "channels": [int(c) for c in chosen],
            "actual": np.round(actual.astype(np.float64), 4).tolist(),
            "target": np.round(target.astype(np.float64), 4).tolist(),
        }
    return out
