"""The blend back toward the input model (``onnxfbp.schedules.blend``): the least
of the schedule's change that keeps its held-out gain, and, with retain data, a
part of a change the retain bound refused whole."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfbp import RefineConfig, refine
from onnxfbp.errors import ConfigError
from onnxfbp.output.report import validate_report
from onnxfbp.schedules.blend import Blend, choose

PROJECT = Path(__file__).resolve().parent.parent
MODEL = PROJECT / "models" / "demo_mnist_cnn.onnx"
CPU = RefineConfig.of(device="cpu", threads=1)


def _blend(a: float, right: np.ndarray, source: str = "kept") -> Blend:
    """A candidate whose held-out predictions are right where ``right`` is."""
    preds = np.where(right, 0, 1)
    return Blend(source, a, loss=float((~right).sum()), correct=int(right.sum()),
                 preds=preds, values={})


def test_choose_takes_the_smallest_blend_the_best_does_not_clearly_beat() -> None:
    y = np.zeros(100, np.int64)
    before = _blend(0.0, np.arange(100) < 50)            # 50 right
    full = _blend(1.0, np.arange(100) < 80)              # 80 right
    i = np.arange(100)
    three_q = _blend(0.75, (i < 77) | (i == 80) | (i == 81))  # 3 won, 2 lost: no clear win
    half = _blend(0.5, np.arange(100) < 65)              # 15 lost: full wins clearly
    chosen, best = choose([half, three_q, full], before, y, min_z=1.0) or (None, None)
    assert best is full and chosen is three_q
    # a laxer test (larger min_z) lets the smaller blend through
    chosen, _ = choose([half, three_q, full], before, y, min_z=10.0) or (None, None)
    assert chosen is half


def test_choose_never_keeps_a_blend_that_loses_to_the_input() -> None:
    y = np.zeros(100, np.int64)
    before = _blend(0.0, np.arange(100) < 60)
    worse = [_blend(a, np.arange(100) < 55) for a in (0.25, 0.5, 1.0)]
    assert choose(worse, before, y, min_z=1.0) is None
    # a blend that beats the input only by a hair is kept only if the best does not win
    full = _blend(1.0, np.arange(100) < 90)
    small = _blend(0.25, np.arange(100) < 61)
    chosen, _ = choose([small, full], before, y, min_z=1.0) or (None, None)
    assert chosen is full


def test_choose_stays_with_the_best_blends_source() -> None:
    y = np.zeros(100, np.int64)
    before = _blend(0.0, np.arange(100) < 50)
    kept_small = _blend(0.25, np.arange(100) < 51, "kept")
    unbound = _blend(0.5, np.arange(100) < 90, "unbound")
    chosen, best = choose([kept_small, unbound], before, y, min_z=1.0) or (None, None)
    assert best is unbound and chosen is unbound


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def adapt() -> tuple[np.ndarray, np.ndarray]:
    with np.load(PROJECT / "models" / "demo_adapt.npz") as z:
        return z["input"], z["y"]


def test_blended_weights_lie_on_the_line_to_the_input(adapt: Any) -> None:
    """Without the output layer's final solve, a blended run's weights are
    ``W0 + a (W1 - W0)`` of the same run without the blend."""
    settings = {"min_z": 1e9}  # the output layer's final solve never kept: only the blend
    cfg = CPU.replace(blend_grid=(0.25, 0.5, 0.75), **settings)
    # a sign test no blend can pass makes the smallest blend that beats the input win
    blended = refine(MODEL, None, adapt, config=cfg)
    full = refine(MODEL, None, adapt, config=CPU.replace(blend_grid=(), **settings))
    info = blended.data.get("blend")
    assert info is not None and info["of"] == "kept" and info["a"] < 1
    w0, w1, wa = (_weights(onnx.load(MODEL)), _weights(full.model), _weights(blended.model))
    moved = [k for k in w0 if not np.array_equal(w0[k], w1[k])]
    assert moved
    for k in moved:
        np.testing.assert_allclose(wa[k], w0[k] + info["a"] * (w1[k] - w0[k]), rtol=1e-5,
                                   atol=1e-6)
    assert blended.heldout_after.accuracy > blended.heldout_before.accuracy
    report = blended.to_dict()
    validate_report(report)
    assert any("blend:" in (row.get("reason") or "") for row in report["layers"])


def test_unlabelled_retain_keeps_part_of_a_change_its_bound_refused(shared_models: Path) -> None:
    """The cell that made the blend: the whitematter CNN on inverted digits with
    1,000 unlabelled upright digits to keep. Every minibatch check broke the
    retain bound (held-out 0.21 -> 0.97 on the new domain), so nothing was kept;
    a blend of that change keeps the bound and most of the gain."""
    sys.path.insert(0, str(PROJECT / "tools"))
    from benchlib import MODELS, load_images01  # noqa: PLC0415
    from shifts import apply_shift  # noqa: PLC0415

    name = "mnist_whitematter_custom_bn.onnx"
    prep = MODELS[name].prep
    images, labels = load_images01("mnist")
    adapt = (prep(apply_shift(images[:2000], "inverted", 1)), labels[:2000])
    retain = (prep(images[2000:3000]), None)
    result = refine(shared_models / name, None, adapt, config=CPU, retain_data=retain)
    info = result.data.get("blend")
    assert info is not None and info["of"] == "unbound" and 0 < info["a"] <= 1
    rb, ra = result.retain_before, result.retain_after
    assert rb is not None and ra is not None and ra.accuracy >= rb.accuracy - 0.01
    assert result.heldout_after.accuracy > result.heldout_before.accuracy + 0.5
    assert result.gate["passed"]
    changed = {p["name"] for p in result.plan["layers"] if p.get("changed")}
    said = {r.name for r in result.layers if r.outcome == "kept" and "blend:" in r.reason}
    assert changed and changed <= said | {result.plan["layers"][-1]["name"]}


@pytest.mark.parametrize("settings, named", [
    ({"retain_holdout": 0.0}, "retain_holdout"), ({"retain_holdout": 1.0}, "retain_holdout"),
    ({"blend_grid": (0.5, 1.5)}, "blend_grid"), ({"blend_grid": (float("nan"),)}, "blend_grid"),
    ({"retain_anchor": -0.1}, "retain_anchor"), ({"retain_anchor": float("inf")}, "retain_anchor"),
])
def test_out_of_range_blend_and_retain_settings_say_which(settings: dict[str, Any],
                                                          named: str) -> None:
    with pytest.raises(ConfigError, match=f"setting out of range: {named}"):
        RefineConfig.of(**settings)


def test_the_summary_says_what_the_blend_kept(adapt: Any, tmp_path: Path) -> None:
    """The summary names the blend (the CLI prints these lines even with --quiet;
    the HTML report shows them under its header): a changed result is said, never
    hidden."""
    from onnxfbp.output.html import build_html  # noqa: PLC0415
    from onnxfbp.output.outcome import outcome_lines  # noqa: PLC0415

    cfg = CPU.replace(min_z=1e9)  # the smallest blend that beats the input is kept
    result = refine(MODEL, None, adapt, config=cfg)
    a = result.data["blend"]["a"]
    said = f"blended back: {a:g} of the schedule's change kept"
    assert said in outcome_lines(result.plan, result.data, result.warnings)
    report = json.loads(json.dumps(result.to_dict()))
    assert said in outcome_lines(report["plan"], report["data"], report["warnings"])
    assert f"<li>{html.escape(said)}</li>" in build_html(report)
    plain = refine(MODEL, None, adapt, config=CPU.replace(blend_grid=()))
    assert not any("blended" in line
                   for line in outcome_lines(plain.plan, plain.data, plain.warnings))
