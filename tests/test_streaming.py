"""Data larger than memory: a folder with ``x.npy`` + ``y.npy`` (memory-mapped)
and a folder of ``.npz`` shards (opened one at a time) behave exactly like the
equivalent single ``.npz`` file, and never bring the whole input array into memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxfbp import data as data_module
from onnxfbp.data import LabelledData, from_arrays, load_data

PROJECT = Path(__file__).resolve().parent.parent
MODELS = PROJECT / "models"
DEMO = MODELS / "demo_mnist_cnn.onnx"
ADAPT = MODELS / "demo_adapt.npz"
SHARD_SIZES = (700, 500, 600, 200)  # uneven, so batches straddle shard boundaries


def onnxfbp(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = shutil.which("onnxfbp", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "onnxfbp.cli"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 2,000 demo samples as one .npz, as .npz shards and as an .npy pair."""
    root = tmp_path_factory.mktemp("formats")
    with np.load(ADAPT) as z:
        x, y = z["input"], z["y"]
    np.savez(root / "single.npz", input=x, y=y)
    (root / "shards").mkdir()
    start = 0
    for k, size in enumerate(SHARD_SIZES):
        key = "input" if k % 2 else "x"  # either key works in a shard
        np.savez(root / "shards" / f"part-{k:02d}.npz", **{key: x[start:start + size]},
                 y=y[start:start + size])
        start += size
    assert start == len(y)
    (root / "npy").mkdir()
    np.save(root / "npy" / "x.npy", x)
    np.save(root / "npy" / "y.npy", y)
    return {"npz": root / "single.npz", "shards": root / "shards", "npy": root / "npy"}


def test_refine_on_shards_and_memmap_matches_single_npz(formats: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Same samples, same order, same held-out split: the same held-out accuracies."""
    reports: dict[str, dict[str, Any]] = {}
    for name, path in formats.items():
        proc = onnxfbp("refine", DEMO, f"{name}.onnx", "--data", path, "--report",
                       f"{name}.json", "--max-layers", "1", "--sweeps", "1", "--quiet",
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    reference = reports["npz"]["heldout"]
    assert reference["after"]["accuracy"] > reference["before"]["accuracy"]
    for name in ("shards", "npy"):
        got = reports[name]["heldout"]
        for when in ("before", "after"):
            assert got[when]["n"] == reference[when]["n"]
            assert abs(got[when]["accuracy"] - reference[when]["accuracy"]) <= 1e-3, (name, when)


def test_eval_on_every_format_gives_the_same_accuracy(formats: dict[str, Path],
                                                      tmp_path: Path) -> None:
    results = {}
    for name, path in formats.items():
        proc = onnxfbp("eval", DEMO, "--data", path, "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads(proc.stdout)
    assert results["shards"] == results["npz"] == results["npy"]
    assert results["npz"]["n"] == 2000


def test_npy_folder_is_memory_mapped(formats: dict[str, Path]) -> None:
    data = load_data(formats["npy"], "input")
    assert isinstance(data.parts[0].x, np.memmap)
    assert isinstance(data.parts[0].y, np.memmap)
    assert len(data) == 2000


def test_npy_folder_may_name_the_input(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 28, 28), np.float32)
    np.save(tmp_path / "input.npy", x)
    np.save(tmp_path / "y.npy", np.arange(4))
    data = load_data(tmp_path, "input")
    assert isinstance(data.parts[0].x, np.memmap) and len(data) == 4


class _CountingMemmap(np.memmap):
    """A memory map that records how many rows each indexing reads."""

    reads: list[int]

    def __getitem__(self, key: Any) -> Any:
        first = key[0] if isinstance(key, tuple) else key
        if isinstance(first, slice):
            self.reads.append(len(range(*first.indices(self.shape[0]))))
        elif isinstance(first, np.ndarray | list):
            self.reads.append(len(first))
        return super().__getitem__(key)


def test_take_reads_only_the_requested_rows(formats: dict[str, Path]) -> None:
    x = np.load(formats["npy"] / "x.npy", mmap_mode="r").view(_CountingMemmap)
    x.reads = []
    y = np.load(formats["npy"] / "y.npy", mmap_mode="r")
    data = from_arrays(x, y, "counted")
    with np.load(ADAPT) as z:
        x_ref, y_ref = z["input"], z["y"]

    idx = np.array([3, 17, 18, 999, 1500, 1999])
    got_x, got_y = data.take(idx)
    assert x.reads == [len(idx)]
    np.testing.assert_array_equal(got_x, x_ref[idx])
    np.testing.assert_array_equal(got_y, y_ref[idx])

    x.reads.clear()
    labels = data.labels(np.arange(0, 2000, 7))
    assert x.reads == []  # labels never touch the inputs
    np.testing.assert_array_equal(labels, y_ref[::7])

    x.reads.clear()
    rows = np.flatnonzero(np.random.default_rng(0).random(2000) < 0.2)
    for _ in data.batches(rows, 128):
        pass
    assert max(x.reads) <= 128 and sum(x.reads) == len(rows)

    x.reads.clear()
    data.validate(["N", 1, 28, 28], 10)  # streams: chunks, never the whole array
    assert sum(x.reads) == 2000 and max(x.reads) <= data_module._CHECK_CHUNK < 2000 * 4


def _big_npy_folder(folder: Path) -> int:
    """12,000 demo samples (37.6 MB of float32 inputs) as x.npy / y.npy in ``folder``;
    returns the inputs' size in bytes."""
    with np.load(ADAPT) as z:
        x, y = np.tile(z["input"], (6, 1, 1, 1)), np.tile(z["y"], 6)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return int(x.nbytes)


def test_memmap_validate_and_batches_stay_small(tmp_path: Path) -> None:
    """12,000 samples (37.6 MB of float32 inputs): checking them and streaming them
    in batches of 500 allocates a few MB at most."""
    size = _big_npy_folder(tmp_path)
    data = load_data(tmp_path, "input")
    tracemalloc.start()
    try:
        data.validate(["N", 1, 28, 28], 10)
        n = sum(len(yb) for _, yb in data.batches(np.arange(len(data)), 500))
        data.labels()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 12000
    assert peak < size / 5, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of inputs"


def test_evaluate_on_a_memmap_stays_small(tmp_path: Path) -> None:
    from onnxfbp import evaluate

    size = _big_npy_folder(tmp_path)
    tracemalloc.start()
    try:
        evaluate(DEMO, tmp_path, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 5, f"peak {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of inputs"


def test_shards_are_opened_one_at_a_time(formats: dict[str, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = data_module._read_npz

    def counting(path: Path, key: str | None) -> Any:
        opened.append(path.name)
        return real(path, key)

    monkeypatch.setattr(data_module, "_read_npz", counting)
    data = load_data(formats["shards"], "input")
    assert isinstance(data, LabelledData) and len(data) == 2000
    assert opened == []  # opening the folder reads only the labels' sizes
    with np.load(ADAPT) as z:
        x_ref, y_ref = z["input"], z["y"]

    rows = np.flatnonzero(np.random.default_rng(1).random(2000) < 0.5)
    xs, ys = zip(*data.batches(rows, 300), strict=True)
    np.testing.assert_array_equal(np.concatenate(xs), x_ref[rows])
    np.testing.assert_array_equal(np.concatenate(ys), y_ref[rows])
    names = [f"part-{k:02d}.npz" for k in range(len(SHARD_SIZES))]
    assert opened == names  # each shard once, in order: one in memory at a time

    opened.clear()
    np.testing.assert_array_equal(data.labels(rows), y_ref[rows])
    assert opened == []  # labels come from 'y' alone


def test_shards_with_different_sample_shapes_are_refused(tmp_path: Path) -> None:
    from onnxfbp.errors import DataError

    np.savez(tmp_path / "a.npz", x=np.zeros((3, 4), np.float32), y=np.zeros(3, np.int64))
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 5), np.float32), y=np.zeros(3, np.int64))
    data = load_data(tmp_path)
    with pytest.raises(DataError, match="earlier shards"):
        data.validate(["N", "features"], 10)
