"""The robustness matrix's bookkeeping (``tools/matrix.py``): the summary rows against
the tuned peer, the layer counts read from an onnxfbp report, and the peer script's
ONNX-in, ONNX-out round trip on the real PyTorch CNN (when torch and onnx2torch are
installed: the ``bench`` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import matrix  # noqa: E402
from benchlib import MODELS, import_onnx2torch, ort_accuracy  # noqa: E402


def _row(gain: float, drop: float, seconds: float, status: str = "ok",
         diverged: bool = False) -> dict[str, Any]:
    return {"status": status, "gain": gain, "drop": drop, "process_s": seconds,
            "diverged": diverged, "other_load": 0.0}


def _failed() -> dict[str, Any]:  # a peer that cannot convert the model
    return {"status": "failed", "process_s": 3.0, "diverged": False, "other_load": 0.0,
            "stderr_tail": "peer_adam: error: onnx2torch cannot convert m.onnx"}


def _cell(shift: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"model": "m.onnx", "shift": shift, "n_adapt": 2000, "methods": rows,
            "before": {"shift_acc": 0.5, "orig_acc": 0.99}}


def test_summary_rows_against_the_tuned_peer() -> None:
    cells = [
        _cell("rot", {"onnxfbp": _row(0.09, 0.00, 10), "adam-1": _row(0.05, 0.0, 5),
                      "adam-tuned": _row(0.10, 0.01, 20)}),  # 90 % of the gain
        _cell("noise", {"onnxfbp": _row(0.02, 0.08, 30), "adam-1": _row(0.04, 0.0, 10),
                        "adam-tuned": _row(0.20, 0.02, 40)}),  # 10 %; drop 6 pt worse
        _cell("blur", {"onnxfbp": _row(-0.03, 0.0, 8, diverged=True),
                       "adam-1": _failed(), "adam-tuned": _failed()}),
    ]
    rows = {r["method"]: r for r in matrix.summarize(cells, ["onnxfbp", "adam-1", "adam-tuned"])}
    mine = rows["onnxfbp"]
    assert mine["ran"] == 3 and mine["paired_with_tuned"] == 2
    assert mine["median_gain"] == pytest.approx(0.02)
    assert mine["divergences"] == 1
    assert mine["share_reaching_80pct_of_tuned_gain"] == pytest.approx(0.5)
    assert mine["cells_drop_5pt_worse_than_tuned"] == 1
    assert mine["median_time_vs_tuned"] == pytest.approx(np.median([10 / 20, 30 / 40]))
    assert mine["median_time_vs_adam1"] == pytest.approx(np.median([10 / 5, 30 / 10]))
    assert mine["median_gain_minus_tuned"] == pytest.approx(np.median([-0.01, -0.18]))
    assert rows["adam-tuned"]["share_reaching_80pct_of_tuned_gain"] == 1.0
    assert rows["adam-1"]["ran"] == 2
    text = matrix.markdown({"cells": cells, "methods": ["onnxfbp", "adam-1", "adam-tuned"],
                            "meta": {"date": "d", "command": "c", "versions": {},
                                     "machine": {"cpu": "x", "cores": 2, "mem_gib": 1}}})
    assert "| 2000 | onnxfbp | 3/3 | +0.0200 |" in text


def test_layer_counts_from_a_report(tmp_path: Path) -> None:
    report = {
        "plan": {"layers": [{"name": "a", "refined": False}, {"name": "b", "refined": True},
                            {"name": "c", "refined": True}]},
        "layers": [{"name": "b", "accepted": False}, {"name": "c", "accepted": True},
                   {"name": "b", "accepted": False}],
        "gate": {"gain": 0.03},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    got = matrix.onnxfbp_layers(path)
    assert (got["layers_planned"], got["layers_changed"], got["layers_reverted"]) == (2, 1, 1)
    assert got["reverted"] == ["b"] and got["heldout_gain"] == 0.03
    assert "report_divergence" not in got


def _need_peer() -> None:
    """Skip unless the peer can run here (torch and onnx2torch: the bench extra)."""
    pytest.importorskip("torch")
    try:
        import_onnx2torch()
    except ImportError:
        pytest.skip("onnx2torch is not installed (the bench extra)")


@pytest.mark.slow
def test_peer_script_round_trip(shared_models: Path, mnist: tuple[np.ndarray, np.ndarray],
                                tmp_path: Path) -> None:
    _need_peer()
    name = "mnist_pytorch25_legacy_cnn.onnx"
    x, y = mnist
    data = tmp_path / "adapt.npz"
    np.savez(data, x=MODELS[name].prep(x[:256]), y=y[:256])
    out = tmp_path / "peer.onnx"
    report = tmp_path / "peer.json"
    cmd = [sys.executable, str(TOOLS / "peer_adam.py"), str(shared_models / name), str(out),
           "--data", str(data), "--report", str(report), "--threads", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    import onnx

    graph = onnx.load(str(out)).graph
    assert [graph.input[0].name, graph.output[0].name] == ["input", "output"]
    before = ort_accuracy(shared_models / name, MODELS[name].prep(x[:256]), y[:256], 1)
    after = ort_accuracy(out, MODELS[name].prep(x[:256]), y[:256], 1)
    assert after >= before - 0.02  # one epoch at lr 1e-3 on clean digits keeps the model
    assert json.loads(report.read_text())["lr"] == 1e-3


@pytest.mark.slow
def test_peer_with_retain_keeps_the_bound_or_the_input(
        shared_models: Path, mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """``peer_adam.py --tune --retain``: half the retain samples held out; every
    candidate is scored on them, and only one within the bound may be chosen. With a
    bound no candidate keeps (a negative drop), the input model comes back unchanged."""
    _need_peer()
    name = "mnist_pytorch25_legacy_cnn.onnx"
    x, y = mnist
    prep = MODELS[name].prep
    data, retain = tmp_path / "adapt.npz", tmp_path / "retain.npz"
    np.savez(data, x=prep(1.0 - x[:192]), y=y[:192])  # inverted digits
    np.savez(retain, x=prep(x[192:392]), y=y[192:392])
    np.savez(tmp_path / "retain_x.npz", x=prep(x[192:392]))
    for bound in ("0.01", "-1", "unlabelled"):
        out, report = tmp_path / f"peer{bound}.onnx", tmp_path / f"peer{bound}.json"
        given = tmp_path / "retain_x.npz" if bound == "unlabelled" else retain
        cmd = [sys.executable, str(TOOLS / "peer_adam.py"), str(shared_models / name), str(out),
               "--data", str(data), "--report", str(report), "--threads", "1", "--tune",
               "--retain", str(given), "--max-retain-drop",
               "0.01" if bound == "unlabelled" else bound]
        subprocess.run(cmd, check=True, capture_output=True)
        rep = json.loads(report.read_text())
        assert rep["retain"]["train"] == rep["retain"]["heldout"] == 100
        # unlabelled: the bound is on the accuracy the input model expects (below 1)
        assert rep["retain"]["labelled"] == (bound != "unlabelled")
        assert 0.5 < rep["retain"]["before"] <= 1.0
        if bound == "unlabelled":
            assert rep["retain"]["before"] < 1.0
        rows = rep["tuning"]
        assert len(rows) == 9 and all("retain_accuracy" in r for r in rows)
        if bound == "-1":
            assert rep["epochs"] == 0 and not any(r["retain_kept"] for r in rows)
            xe = prep(x[400:600])
            assert (ort_accuracy(out, xe, y[400:600], 1)
                    == ort_accuracy(shared_models / name, xe, y[400:600], 1))
        else:
            chosen = [r for r in rows if (r["lr"], r["epochs"]) == (rep["lr"], rep["epochs"])]
            assert rep["epochs"] == 0 or chosen[0]["retain_kept"]
