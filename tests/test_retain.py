"""``--retain-data`` / ``retain_data=``: original-domain data kept while adapting
(issue 18, item 4), on the bundled demo model: rotated digits to adapt to
(``demo_adapt.npz``), upright ones to keep (``demo_clean.npz``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxfbp import RefineConfig, refine
from onnxfbp.cli.commands import main
from onnxfbp.data import load_data
from onnxfbp.errors import DataError
from onnxfbp.output.report import validate_report
from onnxfbp.schedules.state import Anchor, Retain

PROJECT = Path(__file__).resolve().parent.parent
MODELS = PROJECT / "models"
MODEL = MODELS / "demo_mnist_cnn.onnx"
CPU = RefineConfig.of(device="cpu", threads=1)


def _npz(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / name) as z:
        return z["input"], z["y"]


@pytest.fixture(scope="module")
def adapt() -> tuple[np.ndarray, np.ndarray]:
    return _npz("demo_adapt.npz")


@pytest.fixture(scope="module")
def clean() -> tuple[np.ndarray, np.ndarray]:
    return _npz("demo_clean.npz")


@pytest.fixture(scope="module")
def baseline(adapt: tuple[np.ndarray, np.ndarray]) -> Any:
    return refine(MODEL, None, adapt, config=CPU)


def test_labelled_retain_keeps_the_original_domain(
    adapt: tuple[np.ndarray, np.ndarray], clean: tuple[np.ndarray, np.ndarray], baseline: Any
) -> None:
    result = refine(MODEL, None, adapt, config=CPU, retain_data=clean)
    rb, ra = result.retain_before, result.retain_after
    assert rb is not None and ra is not None
    n = len(clean[1])  # the retain data's own held-out half (retain_holdout)
    assert 0.4 * n <= rb.n <= 0.6 * n
    assert ra.accuracy >= rb.accuracy - 0.01
    assert result.gate["passed"] and result.gate["retain_drop"] <= 0.01
    # the shift is still learnt: at least 80% of the held-out gain without retain data
    gain0 = baseline.heldout_after.accuracy - baseline.heldout_before.accuracy
    gain = result.heldout_after.accuracy - result.heldout_before.accuracy
    assert gain0 > 0.1 and gain >= 0.8 * gain0
    assert result.heldout_before.n == baseline.heldout_before.n  # adapt split unchanged
    info = result.data["retain"]
    assert info["labelled"] and info["targets"] == "labels" and info["n"] == len(clean[1])
    assert info["train"] + info["heldout"] == info["n"]
    report = json.loads(json.dumps(result.to_dict()))
    validate_report(report)
    assert report["retain"]["after"]["accuracy"] == pytest.approx(ra.accuracy)


def test_unlabelled_retain_uses_the_models_own_outputs(
    adapt: tuple[np.ndarray, np.ndarray], clean: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    path = tmp_path / "clean_x.npz"
    np.savez(path, input=clean[0])  # no labels
    result = refine(MODEL, None, adapt, config=CPU, retain_data=path)
    rb, ra = result.retain_before, result.retain_after
    assert rb is not None and ra is not None
    # without labels: the accuracy the input model expects of the predictions,
    # at most 1 (the input model's own argmax gets its max probability)
    assert 0.9 < rb.accuracy < 1.0 and rb.confusion is None
    assert ra.accuracy >= rb.accuracy - 0.01
    info = result.data["retain"]
    assert not info["labelled"] and info["targets"] == "model outputs"
    assert info["anchor"] is None  # no anchored second run without labels
    assert 0.9 <= info["agreement"] <= 1.0
    assert result.heldout_after.accuracy > result.heldout_before.accuracy + 0.05
    validate_report(json.loads(json.dumps(result.to_dict())))
    # (x, None) in memory gives the same run
    same = refine(MODEL, None, adapt, config=CPU, retain_data=(clean[0], None))
    assert same.retain_after is not None and same.retain_after.accuracy == ra.accuracy


def test_no_retain_data_reports_null(baseline: Any) -> None:
    report = baseline.to_dict()
    assert report["retain"] is None and baseline.data["retain"] is None
    assert baseline.gate["retain_drop"] is None
    validate_report(json.loads(json.dumps(report)))


def test_cli_retain_summary_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["refine", str(MODEL), str(out), "--data", str(MODELS / "demo_adapt.npz"),
                 "--retain-data", str(MODELS / "demo_clean.npz"), "--report", str(report),
                 "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    line = next(v for v in captured.out.splitlines() if v.startswith("retain accuracy:"))
    assert "labelled" in line and "n=" in line
    data = json.loads(report.read_text())
    validate_report(data)
    assert data["retain"]["before"]["n"] == data["retain"]["after"]["n"]
    assert data["config"]["retain"]["max_retain_drop"] == 0.01
    html = tmp_path / "run.html"
    assert main(["report", str(report), "-o", str(html)]) == 0
    assert "retain accuracy (n=" in html.read_text()  # its card, next to held-out's


def test_cli_gate_exit_3_on_a_retain_drop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The per-update check switched off (every update "keeps" the retain data): the
    # final gate alone must catch the drop. Unlabelled retain with --max-retain-drop 0:
    # any changed prediction on the retain held-out part lowers its score.
    monkeypatch.setattr(Retain, "kept", lambda self, preds: True)
    x_path = tmp_path / "clean_x.npz"
    np.savez(x_path, x=_npz("demo_clean.npz")[0])
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["refine", str(MODEL), str(out), "--data", str(MODELS / "demo_adapt.npz"),
                 "--retain-data", str(x_path), "--max-retain-drop", "0",
                 "--report", str(report), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("onnxfbp: error: retain held-out accuracy dropped") and \
        err.count("\n") == 1 and "--max-retain-drop" in err
    assert not out.exists()
    data = json.loads(report.read_text())
    validate_report(data)
    assert data["written"] is None and not data["gate"]["passed"]
    assert data["gate"]["retain_drop"] > 0 and data["gate"]["max_retain_drop"] == 0


@pytest.mark.parametrize("case", ["shape", "label", "drop", "mixed-shards", "keys"])
def test_bad_retain_input_is_one_line_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = _npz("demo_clean.npz")
    path = tmp_path / "retain.npz"
    extra: list[str] = []
    if case == "shape":
        np.savez(path, x=x[:, :, :20, :20])
    elif case == "label":
        np.savez(path, x=x[:50], y=np.full(50, 12))
    elif case == "drop":
        np.savez(path, x=x[:50])
        extra = ["--max-retain-drop", "1.5"]
    elif case == "mixed-shards":
        path = tmp_path / "shards"
        path.mkdir()
        np.savez(path / "a.npz", x=x[:20], y=y[:20])
        np.savez(path / "b.npz", x=x[20:40])
    else:
        np.savez(path, images=x[:20])
    out = tmp_path / "out.onnx"
    code = main(["refine", str(MODEL), str(out), "--data", str(MODELS / "demo_adapt.npz"),
                 "--retain-data", str(path), "--device", "cpu", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("onnxfbp: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()


def test_load_data_labels_optional(tmp_path: Path) -> None:
    x, y = _npz("demo_clean.npz")
    np.savez(tmp_path / "with.npz", x=x[:30], y=y[:30])
    np.savez(tmp_path / "without.npz", x=x[:30])
    assert load_data(tmp_path / "with.npz", labels_optional=True).labelled
    bare = load_data(tmp_path / "without.npz", labels_optional=True)
    assert not bare.labelled and len(bare) == 30
    with pytest.raises(DataError, match="labels under 'y'"):
        load_data(tmp_path / "without.npz")  # --data still needs labels
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "x.npy", x[:25])
    assert not load_data(folder, labels_optional=True).labelled
    with pytest.raises(DataError, match="y.npy"):
        load_data(folder)
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "a.npz", x=x[:10])
    np.savez(shards / "b.npz", x=x[10:25])
    data = load_data(shards, labels_optional=True)
    assert not data.labelled and len(data) == 25
    got, _ = data.take(np.array([0, 9, 10, 24]))
    np.testing.assert_array_equal(got, x[[0, 9, 10, 24]])


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_sweep_schedules_keep_the_retain_bound(
    schedule: str, adapt: tuple[np.ndarray, np.ndarray], clean: tuple[np.ndarray, np.ndarray]
) -> None:
    config = CPU.replace(schedule=schedule, sweeps=1)
    result = refine(MODEL, None, adapt, config=config, retain_data=(clean[0], None))
    rb, ra = result.retain_before, result.retain_after
    assert rb is not None and ra is not None and ra.accuracy >= rb.accuracy - 0.01
    assert result.heldout_after.accuracy > result.heldout_before.accuracy + 0.05
    assert any(layer.accepted for layer in result.layers)


def test_retain_inputs_on_another_scale_are_warned_about(
    adapt: tuple[np.ndarray, np.ndarray], clean: tuple[np.ndarray, np.ndarray]
) -> None:
    """Retain data preprocessed differently (scaled by 1/255 once more) is named in the
    run's warnings; the same preprocessing is not."""
    x, y = clean
    small = RefineConfig.of(device="cpu", threads=1, epochs=0.25)
    same = refine(MODEL, None, adapt, config=small, retain_data=(x, y))
    assert not any("far outside" in w for w in same.warnings)
    raw = refine(MODEL, None, adapt, config=small, retain_data=(x / 255.0, y))
    assert any("far outside the retain data's range" in w for w in raw.warnings)


def test_anchor_pulls_only_the_retain_rows() -> None:
    """While on, ``Anchor.pull`` adds ``step * weight * (z0 - z)`` to the rows of
    retain samples (index >= offset) and leaves the adaptation rows and its input
    alone; off, it changes nothing."""
    z0 = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    anchor = Anchor(offset=3, logits=z0, weight=0.5)
    idx = np.array([0, 2, 3, 4])
    z = np.array([[0, 0], [0, 0], [0, 0], [1, 1]], np.float32)
    target = np.ones((4, 2), np.float32)
    assert anchor.pull(idx, z, target, 2.0) is target  # off
    anchor.on = True
    out = anchor.pull(idx, z, target, 2.0)
    np.testing.assert_array_equal(out[:2], target[:2])
    np.testing.assert_allclose(out[2], 1 + 2 * 0.5 * (z0[0] - z[2]))
    np.testing.assert_allclose(out[3], 1 + 2 * 0.5 * (z0[1] - z[3]))
    np.testing.assert_array_equal(target, 1.0)  # the input is not modified
    head = target[:2]
    assert anchor.pull(np.array([0, 1]), z[:2], head, 2.0) is head  # no retain row


def test_anchored_second_run_where_the_bound_cost_the_gain() -> None:
    """keras MLP, inverted digits, 1,000 labelled upright digits: every check of the
    schedule breaks the retain bound (the kept result gains almost nothing); the
    second run, with the retain samples anchored to the input model's logits,
    learns the new domain within the bound and is kept."""
    from shared_data import mnist_test, models_dir

    model = models_dir() / "mnist_keras_tf2onnx192_mlp.onnx"
    if not model.is_file():
        pytest.skip(f"shared model corpus not found at {model.parent}; set ONNXFBP_MODELS_DIR")
    images, labels = mnist_test()
    x01 = images.astype(np.float32) / 255.0
    adapt = (1.0 - x01[:2000], labels[:2000])  # inverted digits
    retain = (x01[2000:3000], labels[2000:3000])
    events: list[Any] = []
    result = refine(model, None, adapt, config=CPU, retain_data=retain, progress=events.append)
    second = result.data["retain"]["anchor"]["second_run"]
    assert second is not None and second["kept"] == "anchored", second
    assert second["anchored_heldout_accuracy"] > second["first_heldout_accuracy"] + 0.3
    assert result.heldout_after.accuracy > result.heldout_before.accuracy + 0.5
    rb, ra = result.retain_before, result.retain_after
    assert rb is not None and ra is not None and ra.accuracy >= rb.accuracy - 0.01
    said = [str(getattr(e, "text", "")) for e in events]
    assert any("running it again with the retain samples pulled" in t for t in said)
    assert any("keeping the anchored run" in t for t in said)
    from onnxfbp.output.outcome import outcome_lines  # noqa: PLC0415

    assert any(line.startswith("retain bound: ran the schedule again") and "kept the anchored"
               in line for line in outcome_lines(result.plan, result.data, result.warnings))
    steps = [layer.name for layer in result.layers if layer.reason.startswith("minibatch")]
    assert len(steps) == len(set(steps)) == 2  # the first run's layer reports are dropped


def test_no_second_run_where_the_bound_costs_little(
    adapt: tuple[np.ndarray, np.ndarray], clean: tuple[np.ndarray, np.ndarray]
) -> None:
    """The demo with labelled retain data keeps its gain within the bound: one run,
    and ``retain_anchor`` 0 turns the second run off altogether."""
    result = refine(MODEL, None, adapt, config=CPU, retain_data=clean)
    assert result.data["retain"]["anchor"] == {
        "weight": RefineConfig().retain.retain_anchor, "second_run": None}
    off = refine(MODEL, None, adapt, config=CPU.replace(retain_anchor=0.0), retain_data=clean)
    assert off.data["retain"]["anchor"] is None


