"""The model corpus of today's architectures and tasks (``models/corpus``, built by
``tools/corpus.py``): every file listed in its MANIFEST exists, is small, runs in
onnxruntime with the inputs and outputs the MANIFEST names, has the node and
initializer counts it states (the Constant-node rewrites none), reproduces the clean
metric the MANIFEST records on the held-out images, and ``onnxfbp inspect`` exits 0
on it. The data builder writes the arrays the MANIFEST's ``labels`` column describes.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxfbp.cli import main as cli_main

PROJECT = Path(__file__).resolve().parent.parent
CORPUS = PROJECT / "models" / "corpus"
sys.path.insert(0, str(PROJECT / "tools"))


def _rows() -> list[dict[str, str]]:
    path = CORPUS / "MANIFEST.tsv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


ROWS = [r for r in _rows() if r.get("nodes")]  # rows of failed exports carry no file
IDS = [r["file"] for r in ROWS]


def _shapes(column: str) -> dict[str, list[str]]:
    """``name[d0,d1,...] name2[...]`` -> {name: [d0, d1, ...]}."""
    return {m[1]: m[2].split(",") for m in re.finditer(r"(\S+?)\[([^\]]*)\]", column)}


def _dims(v: ort.NodeArg) -> list[str]:
    return [str(d) for d in v.shape]


def test_manifest_lists_every_model_and_variant() -> None:
    """Every corpus model is there, each in its three exports (or a recorded failure)."""
    import corpus_data

    rows = _rows()
    assert rows, "models/corpus/MANIFEST.tsv is missing: run python tools/corpus.py"
    files = {r["file"] for r in rows}
    on_disk = {p.name for p in CORPUS.glob("*.onnx")}
    assert on_disk == {r["file"] for r in ROWS}, "MANIFEST and the files disagree"
    for name in corpus_data.TASKS:
        for suffix in (".onnx", ".const.onnx", ".dynamo.onnx"):
            assert f"{name}{suffix}" in files, f"{name}{suffix} not in the MANIFEST"
    for r in rows:
        if not r.get("nodes"):
            assert r["notes"].startswith("EXPORT FAILED"), r


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_file_matches_its_manifest_row(row: dict[str, str]) -> None:
    path = CORPUS / row["file"]
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert len(model.graph.node) == int(row["nodes"])
    assert len(model.graph.initializer) == int(row["initializers"])
    if row["file"].endswith(".const.onnx"):
        assert not model.graph.initializer
        assert sum(n.op_type == "Constant" for n in model.graph.node) >= 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = _shapes(row["inputs"]), _shapes(row["outputs"])
    assert [i.name for i in sess.get_inputs()] == list(inputs)
    assert [o.name for o in sess.get_outputs()] == list(outputs)
    feed = {}
    for i in sess.get_inputs():
        assert _dims(i)[1:] == inputs[i.name][1:]
        dims = [3 if not isinstance(d, int) else d for d in i.shape]
        feed[i.name] = np.random.default_rng(0).uniform(0, 1, dims).astype(np.float32)
    for o, got in zip(sess.get_outputs(), sess.run(None, feed), strict=True):
        assert list(got.shape[1:]) == [int(d) for d in outputs[o.name][1:]]
        assert got.shape[0] == 3 and np.isfinite(got).all()


@pytest.mark.parametrize("row", [r for r in ROWS if r["file"].endswith(".const.onnx")],
                         ids=lambda r: r["file"])
def test_clean_metric_reproduces(row: dict[str, str], mnist: object) -> None:
    """The held-out clean metric of the MANIFEST, recomputed (first 300 images: within
    the sampling error of the 2,000 it was measured on)."""
    import corpus

    spec = corpus.SPECS[row["name"]]
    data = corpus.sample(row["name"], "eval", 300)
    got = corpus.metrics(spec, corpus.run_onnx(CORPUS / row["file"], data, spec.inputs), data)
    recorded = dict(kv.rsplit(" ", 1) for kv in row["clean_metric"].split(", "))
    assert set(recorded) == set(got)
    for key, value in got.items():
        assert abs(value - float(recorded[key])) < 0.06, (key, value, recorded[key])


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_inspect_exits_0(row: dict[str, str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(["inspect", str(CORPUS / row["file"]), "--json"])
    assert code == 0, err.getvalue()


def test_data_builder_writes_the_labels_the_manifest_describes(
        tmp_path: Path, mnist: object) -> None:
    import corpus

    shapes = {"seg_fcn": (6, 56, 56), "mask_sigmoid": (6, 1, 56, 56), "bbox_regress": (6, 4),
              "rot_regress": (6, 1), "two_input_sum": (6,)}
    for name, shape in shapes.items():
        out = tmp_path / f"{name}.npz"
        assert corpus.main(["data", name, "--n", "6", "--shift", "noise", "--out",
                            str(out)]) == 0
        with np.load(out) as z:
            assert z["y"].shape == shape
            spec = corpus.SPECS[name]
            for k in spec.inputs:
                assert z[k].dtype == np.float32 and z[k].shape[0] == 6
    with np.load(tmp_path / "seg_fcn.npz") as z:
        assert set(np.unique(z["y"])) <= {*range(11), 255}
    assert corpus.main(["data", "two_output", "--n", "4", "--out",
                        str(tmp_path / "t.npz")]) == 0
    with np.load(tmp_path / "t.npz") as z:
        assert z["y_class"].shape == (4,) and z["y_angle"].shape == (4, 1)
        assert np.abs(z["y_angle"]).max() <= 1.0
    assert corpus.main(["data", "rot_regress", "--n", "4", "--shift", "rot", "--out",
                        str(tmp_path / "r.npz")]) == 2  # the angle is the label
