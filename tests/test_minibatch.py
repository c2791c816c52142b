"""The minibatch schedule on its own (:mod:`onnxfbp.schedules.minibatch`): a
ModelState and a RunContext are all it needs; it reports typed events, one
report per layer, and leaves the kept weights (or the input ones) in the state."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxfbp import ModelState, RefineConfig, from_arrays, load_data
from onnxfbp.events import Event, LayerVisited, Message, StepBackedOff, StepChecked
from onnxfbp.refine import split
from onnxfbp.schedules.minibatch import train_minibatch
from onnxfbp.schedules.state import RunContext, Score

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_minibatch_schedule_alone() -> None:
    full = load_data(MODELS / "demo_adapt.npz", "input")
    x, y = full.take(np.arange(300))
    data = from_arrays(x, y)
    config = RefineConfig.of(device="cpu", epochs=0.5, step_batch=50, precond_samples=100)
    state = ModelState(MODELS / "demo_mnist_cnn.onnx", config)
    rng, train_idx, val_idx = split(len(data), config)
    before = state.evaluate(data, val_idx)
    n = len(val_idx)
    assert before.loss is not None
    events: list[Event] = []
    ctx = RunContext(data, train_idx, val_idx, rng,
                     Score(before.loss * n, round(before.accuracy * n)), events.append)
    improved = train_minibatch(state, ctx)

    assert all(isinstance(e, (Message, LayerVisited, StepChecked, StepBackedOff))
               for e in events)
    checks = [e for e in events if isinstance(e, StepChecked)]
    per_epoch = -(-len(train_idx) // 50)
    assert checks and checks[-1].total == int(np.ceil(0.5 * per_epoch))
    assert all(0.0 <= c.accuracy <= 1.0 and np.isfinite(c.loss) for c in checks)
    assert [r.name for r in ctx.reports] == [layer.name for layer in state.layers]
    assert [e.report for e in events if isinstance(e, LayerVisited)] == ctx.reports
    assert all(r.accepted == improved and r.lam == config.minibatch.damping for r in ctx.reports)
    changed = any(not np.array_equal(v, state.original[k]) for k, v in state.values.items())
    assert changed == improved
    assert state.reverse_pass == "onnxruntime"
    assert state.kept_branch == "/features/features.0/Conv"
