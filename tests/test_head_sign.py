"""The output layer's final solve is kept only when it wins clearly on the
held-out split (a sign test, :func:`onnxfbp.fit.head.no_clear_win`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import onnxfbp
from onnxfbp.config import RefineConfig
from onnxfbp.fit.head import no_clear_win

PROJECT = Path(__file__).resolve().parent.parent


def test_the_sign_test_counts_wins_and_losses() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    before = np.array([0, 1, 2, 3, 4, 5, 0, 0, 0, 0])  # 6 right
    after = np.array([0, 1, 2, 3, 4, 0, 6, 7, 0, 0])  # 7 right: won 6, 7; lost 5
    # won 2, lost 1: P(X >= 2 | 3 flips) = 0.5, above Phi(-1) = 0.159 and Phi(-0.5) = 0.31
    assert "2 samples won, 1 lost" in no_clear_win(before, after, y, 1.0)
    assert "2 samples won, 1 lost" in no_clear_win(before, after, y, 0.5)
    assert no_clear_win(before, after, y, 0.0) == ""  # p 0.5 <= Phi(0) = 0.5
    assert no_clear_win(before, y, y, 1.0) == ""  # won 4, lost 0: p 1/16 = 0.0625
    assert "4 samples won" in no_clear_win(before, y, y, 1.6)  # Phi(-1.6) = 0.055


def test_small_counts_need_the_exact_test() -> None:
    """2 wins and no loss happen by chance 1 time in 4: no clear win at one
    standard error, though its normal approximation (2 >= sqrt(2)) says so; and
    no flip at all is no win."""
    y = np.arange(10)
    before = np.where(np.arange(10) < 8, y, 0)  # 8 right
    after = y.copy()  # 10 right: won 2, lost 0
    assert "2 samples won, 0 lost" in no_clear_win(before, after, y, 1.0)
    assert "0 samples won, 0 lost" in no_clear_win(after, after, y, 0.0)


def test_a_solve_without_a_clear_win_is_reverted_and_says_so() -> None:
    """The demo's output layer alone, on 300 samples: the solve wins a few held-out
    samples; with a demanding ``min_z`` it is reverted, the weights stay the input's,
    and the report gives the counts; with ``min_z`` 0 the same solve is kept."""
    with np.load(PROJECT / "models" / "demo_adapt.npz") as z:
        x, y = z["input"][:1200], z["y"][:1200]
    model = str(PROJECT / "models" / "demo_mnist_cnn.onnx")
    strict = onnxfbp.refine(model, None, x, y, config=RefineConfig.of(
        device="cpu", max_layers=1, min_z=50.0))
    [layer] = strict.layers
    assert layer.outcome != "kept"
    assert "samples won" in layer.reason and "50 standard errors" in layer.reason
    assert strict.heldout_after.accuracy == strict.heldout_before.accuracy
    loose = onnxfbp.refine(model, None, x, y, config=RefineConfig.of(
        device="cpu", max_layers=1, min_z=0.0))
    assert loose.layers[0].outcome == "kept"
    assert loose.heldout_after.accuracy > loose.heldout_before.accuracy
