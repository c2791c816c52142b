"""A built wheel carries the demo: ``pip wheel .``, the wheel's package alone on the
path, and ``onnxfbp demo`` run from a folder outside the clone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
DEMO_FILES = {"demo_mnist_cnn.onnx", "demo_adapt.npz", "demo_eval.npz", "demo_clean.npz"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(PROJECT)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("onnxfbp-*.whl")
    return path


def test_wheel_holds_the_demo_model_and_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = {Path(n).name for n in z.namelist() if n.startswith("onnxfbp/demo_data/")}
        sizes = {Path(i.filename).name: i.file_size for i in z.infolist()}
    assert names == DEMO_FILES
    assert all(sizes[n] > 100_000 for n in DEMO_FILES)  # real files, not links


@pytest.mark.slow
def test_demo_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, onnxfbp.cli; print(onnxfbp.cli.__file__, file=sys.stderr); "
         "sys.exit(onnxfbp.cli.main(['demo', '--quiet']))"],
        capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(site) in proc.stderr  # the wheel's copy ran, not the clone's
    assert (elsewhere / "demo_refined.onnx").is_file()
    assert "eval accuracy" in proc.stdout
