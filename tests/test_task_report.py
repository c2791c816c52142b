"""The JSON and HTML reports of tasks beyond classification (issue 21): a
regression output's predicted vs true values and a dense or binary output's
masks, before and after, on corpus models (``models/corpus``) and their data
(``tools/corpus_data.py``, MNIST digits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxfbp import RefineConfig
from onnxfbp.output.html import build_html
from onnxfbp.output.report import validate_report
from onnxfbp.refine import refine

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "models" / "corpus"
sys.path.insert(0, str(PROJECT / "tools"))

CPU = RefineConfig.of(device="cpu", threads=1)


def corpus_sample(name: str, part: str, n: int, shift: str, seed: int) -> dict[str, np.ndarray]:
    import corpus_data  # noqa: PLC0415 (reads MNIST under ../shared)

    return corpus_data.sample(name, part, n, shift, seed)


def _run(name: str, shift: str, n: int, tmp: Path,
         config: RefineConfig = CPU) -> dict[str, Any]:
    adapt = corpus_sample(name, "adapt", n, shift, 1)
    np.savez(tmp / "adapt.npz", **adapt)
    result = refine(CORPUS / f"{name}.onnx", None, tmp / "adapt.npz", config=config)
    report = json.loads(json.dumps(result.to_dict()))
    validate_report(report)
    return report


def test_regression_report_holds_the_scatter(mnist: object, tmp_path: Path) -> None:
    report = _run("bbox_regress", "contrast", 300, tmp_path)
    tf = report["task_figures"]["box"]
    n = len(tf["samples"])
    assert tf["task"] == "regression" and tf["split"] == "held-out"
    assert n == report["heldout"]["before"]["n"] and 0 < n <= 500
    for part in ("true", "before", "after"):
        assert np.asarray(tf[part]).shape == (n, 4)
    assert not np.allclose(tf["before"], tf["after"])
    # the points are the held-out predictions: their MAE is the report's
    mae = np.abs(np.asarray(tf["after"]) - np.asarray(tf["true"])).mean()
    assert mae == pytest.approx(report["heldout"]["after"]["metrics"]["mae"], rel=1e-3)
    page = build_html(report)
    assert "Outputs</h2>" in page and 'alt="regression output box before and after"' in page


def test_mask_report_holds_masks_before_and_after(mnist: object, tmp_path: Path) -> None:
    # 300 samples are too few for this model to gain (2,000 are: benchmarks/NOTES.md);
    # the figures do not depend on the gate
    report = _run("mask_sigmoid", "noise", 300, tmp_path,
                  RefineConfig.of(device="cpu", threads=1, allow_worse=True))
    tf = report["task_figures"]["mask"]
    assert tf["task"] == "binary" and len(tf["samples"]) == 3
    for part in ("true", "before", "after", "input"):
        assert np.asarray(tf[part]).shape == (3, 56, 56)
    assert set(np.unique(tf["after"])) <= {0, 1}
    assert not np.array_equal(tf["before"], tf["after"])
    page = build_html(report)
    assert 'alt="binary output mask before and after"' in page


def test_a_task_figure_of_mismatched_shapes_is_refused() -> None:
    from onnxfbp.output.report import ReportError  # noqa: PLC0415

    report = {"task_figures": {"out": {"task": "regression", "split": "held-out",
                                       "samples": [1, 2], "true": [[0.0], [1.0]],
                                       "before": [[0.0], [1.0]], "after": [[0.0]]}}}
    with pytest.raises(ReportError, match="after: shape differs"):
        from onnxfbp.output.report import _check_task_figure  # noqa: PLC0415

        _check_task_figure(report["task_figures"]["out"], "task_figures['out']")
