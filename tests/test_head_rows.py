"""The output layer's solve on a capped held-out split (``HeadConfig.max_rows``):
the candidate is judged on the whole held-out split, like every other update, so a
capped solve can still be kept (it was always reverted when its subset count was
compared with the whole split's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import onnxfbp
from onnxfbp.config import RefineConfig

PROJECT = Path(__file__).resolve().parent.parent


def test_output_layer_solved_on_capped_rows_is_judged_on_the_whole_split() -> None:
    with np.load(PROJECT / "models" / "demo_adapt.npz") as z:
        x, y = z["input"], z["y"]
    model = str(PROJECT / "models" / "demo_mnist_cnn.onnx")
    capped = onnxfbp.refine(model, None, x, y, config=RefineConfig.of(
        device="cpu", max_rows=100, max_layers=1))
    whole = onnxfbp.refine(model, None, x, y, config=RefineConfig.of(
        device="cpu", max_layers=1))
    assert len(x) * 0.2 > 100  # the held-out split (20 %) is larger than the cap
    [layer] = capped.layers
    assert layer.outcome == "kept", layer.reason
    assert capped.heldout_after.accuracy > capped.heldout_before.accuracy
    # the reported held-out accuracy is the whole split's
    assert layer.heldout_accuracy == capped.heldout_after.accuracy
    assert whole.layers[0].outcome == "kept"
