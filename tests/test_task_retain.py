"""``--retain-data`` with tasks beyond classification (issue 21) on corpus models
(``models/corpus``) and their data (``tools/corpus_data.py``, MNIST digits): the
retain held-out part is scored with the task's metric and bounds every update
and the gate (docs/tasks.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxfbp import RefineConfig
from onnxfbp.cli.commands import main
from onnxfbp.errors import UnsupportedModelError
from onnxfbp.fit.tasks import retain_drop
from onnxfbp.output.report import validate_report
from onnxfbp.refine import refine
from onnxfbp.schedules.state import Retain

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "models" / "corpus"
sys.path.insert(0, str(PROJECT / "tools"))


def _data(name: str, shift: str, n: int, tmp: Path, labelled: bool = True) -> tuple[Path, Path]:
    """Adaptation data under ``shift`` and original-domain retain data (other digits)."""
    import corpus_data  # noqa: PLC0415 (reads MNIST under ../shared)

    adapt, retain = tmp / "adapt.npz", tmp / "retain.npz"
    np.savez(adapt, **corpus_data.sample(name, "adapt", n, shift, 1))
    clean = corpus_data.sample(name, "eval", n, "none", 2)
    if not labelled:
        clean.pop("y")
    np.savez(retain, **clean)
    return adapt, retain


def _config(drop: float, **kw: object) -> RefineConfig:
    return RefineConfig.of(device="cpu", threads=1, max_retain_drop=drop, **kw)


def test_regression_keeps_its_labelled_retain_data(mnist: object, tmp_path: Path) -> None:
    adapt, retain = _data("bbox_regress", "contrast", 300, tmp_path)
    result = refine(CORPUS / "bbox_regress.onnx", None, adapt, retain_data=retain,
                    config=_config(0.5))
    rb, ra = result.retain_before, result.retain_after
    assert rb is not None and ra is not None and rb.task == ra.task == "regression"
    assert rb.n == ra.n > 0 and rb.metrics["mae"] != ra.metrics["mae"]
    scale = result.data["retain"]["scale"]
    assert scale > 0 and result.data["retain"]["targets"] == "labels"
    drop = retain_drop(rb, ra, scale)
    assert drop == pytest.approx((ra.metrics["mae"] - rb.metrics["mae"]) / scale)
    assert result.gate["passed"] and result.gate["retain_drop"] == pytest.approx(drop)
    assert drop <= 0.5
    assert result.heldout_after.metrics["mae"] < result.heldout_before.metrics["mae"]
    report = json.loads(json.dumps(result.to_dict()))
    validate_report(report)
    assert report["retain"]["after"]["metrics"]["mae"] == pytest.approx(ra.metrics["mae"])


def test_a_tight_bound_keeps_the_retain_mae(mnist: object, tmp_path: Path) -> None:
    adapt, retain = _data("bbox_regress", "contrast", 300, tmp_path)
    result = refine(CORPUS / "bbox_regress.onnx", None, adapt, retain_data=retain,
                    config=_config(0.0))
    assert result.retain_after.metrics["mae"] <= result.retain_before.metrics["mae"] + 1e-9


def test_unlabelled_regression_retain_targets_the_models_outputs(
        mnist: object, tmp_path: Path) -> None:
    adapt, retain = _data("rot_regress", "noise", 300, tmp_path, labelled=False)
    result = refine(CORPUS / "rot_regress.onnx", None, adapt, retain_data=retain,
                    config=_config(0.5))
    assert result.data["retain"]["targets"] == "model outputs"
    assert result.retain_before.metrics["mae"] < 1e-6  # the input model against itself
    assert result.gate["retain_drop"] <= 0.5


def test_gate_exit_3_when_the_retain_mae_rises(
        mnist: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The per-update bound switched off: the final gate alone must catch the rise.
    monkeypatch.setattr(Retain, "holds", lambda self, state, data, preds=None: True)
    adapt, retain = _data("bbox_regress", "contrast", 300, tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["refine", str(CORPUS / "bbox_regress.onnx"), str(out), "--data", str(adapt),
                 "--retain-data", str(retain), "--max-retain-drop", "0", "--report",
                 str(report), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("onnxfbp: error: retain held-out mae rose") and err.count("\n") == 1
    assert not out.exists()
    data = json.loads(report.read_text())
    validate_report(data)
    assert not data["gate"]["passed"] and data["gate"]["retain_drop"] > 0


def test_binary_masks_keep_their_retain_mean_iou(mnist: object, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    adapt, retain = _data("mask_sigmoid", "noise", 300, tmp_path)
    code = main(["refine", str(CORPUS / "mask_sigmoid.onnx"), str(tmp_path / "out.onnx"),
                 "--data", str(adapt), "--retain-data", str(retain), "--max-retain-drop",
                 "0.02", "--allow-worse", "--report", str(tmp_path / "r.json"),
                 "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert any(line.startswith("retain binary: pixel_accuracy") and "labelled)" in line
               for line in out.splitlines())
    data = json.loads((tmp_path / "r.json").read_text())
    before, after = data["retain"]["before"]["metrics"], data["retain"]["after"]["metrics"]
    assert before["mean_iou"] - after["mean_iou"] <= 0.02 + 1e-9
    assert data["gate"]["retain_drop"] == pytest.approx(before["mean_iou"] - after["mean_iou"])


def test_several_outputs_refuse_retain_data(mnist: object, tmp_path: Path) -> None:
    import corpus_data  # noqa: PLC0415

    data = corpus_data.sample("two_output", "adapt", 20, "noise", 1)
    np.savez(tmp_path / "a.npz", **data)
    with pytest.raises(UnsupportedModelError, match="one trained output"):
        refine(CORPUS / "two_output.onnx", None, tmp_path / "a.npz", retain_data=tmp_path /
               "a.npz", config=RefineConfig.of(device="cpu", threads=1,
                                               targets=("logits=y_class", "angle=y_angle")))
