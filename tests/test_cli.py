"""The console script on the bundled demo model and data (success paths)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from graphcheck import changed_initializers

PROJECT = Path(__file__).resolve().parent.parent
MODELS = PROJECT / "models"


def onnxfbp(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    script = shutil.which("onnxfbp", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "onnxfbp.cli"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False
    )


def test_demo_refines_bundled_model(tmp_path: Path) -> None:
    proc = onnxfbp("demo", "--output", str(tmp_path / "demo.onnx"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if ":" in line}
    before, after = (
        float(v) for v in lines["eval accuracy"].split(":")[1].split("(")[0].split("->")
    )
    clean_before, clean_after = (
        float(v) for v in lines["clean accuracy"].split(":")[1].split("(")[0].split("->")
    )
    assert after - before >= 0.08  # rotated digits: about 0.76 -> 0.90
    assert clean_after >= clean_before - 0.02
    assert changed_initializers(MODELS / "demo_mnist_cnn.onnx", tmp_path / "demo.onnx")


def test_refine_eval_and_report(tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = onnxfbp(
        "refine",
        str(MODELS / "demo_mnist_cnn.onnx"),
        str(out),
        "--data",
        str(MODELS / "demo_adapt.npz"),
        "--eval-data",
        str(MODELS / "demo_eval.npz"),
        "--report",
        str(report),
        "--sweeps",
        "1",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet
    data = json.loads(report.read_text())
    assert data["written"] == str(out)
    assert data["eval"]["after"]["accuracy"] > data["eval"]["before"]["accuracy"]
    kept = [layer for layer in data["layers"] if layer["accepted"]]
    assert kept and all(layer["lam"] is not None for layer in kept)

    ev = onnxfbp("eval", str(out), "--data", str(MODELS / "demo_eval.npz"), "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["n"] == 1000
    assert result["accuracy"] == pytest.approx(data["eval"]["after"]["accuracy"], abs=1e-9)


def test_refine_reads_graph_input_name_or_x(tmp_path: Path) -> None:
    with np.load(MODELS / "demo_adapt.npz") as z:
        np.savez(tmp_path / "x.npz", x=z["input"][:300], y=z["y"][:300])
    proc = onnxfbp(
        "refine",
        str(MODELS / "demo_mnist_cnn.onnx"),
        str(tmp_path / "o.onnx"),
        "--data",
        str(tmp_path / "x.npz"),
        "--max-layers",
        "1",
        "--sweeps",
        "1",
        "--allow-worse",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.onnx").is_file()


def test_inspect_lists_rules_and_refined_layers() -> None:
    proc = onnxfbp("inspect", str(MODELS / "demo_mnist_cnn.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    ops = {n["op"]: n for n in info["nodes"]}
    assert ops["Gemm"]["rule"] == "rule"
    assert info["refined_layers"][0] == "/classifier/classifier.3/Gemm"
    assert info["output"]["kind"] == "logits" and info["output"]["classes"] == 10


@pytest.mark.parametrize(("preset", "expected"), [(None, "4"), ("28", "28")])
def test_openblas_threads_do_not_spin_unless_the_user_says(
    preset: str | None, expected: str
) -> None:
    """Importing onnxfbp before NumPy (the command line) sets OpenBLAS's thread
    timeout so idle BLAS threads sleep; a value the user set stays."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = "import os, onnxfbp; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    assert proc.stdout.strip() == expected
