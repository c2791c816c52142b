"""Safe in a CI step: the console script on broken models, data and output paths,
the held-out gate, interrupts and degenerate numerics.

Every user error must end with exit code 2 (3 for the gate, 130 for an
interrupt), exactly one line on stderr that says what is wrong and what to do,
no traceback, the input untouched and nothing new on disk (no output, no
``.onnxfbp-*`` temporary folder). Each case runs the real ``onnxfbp`` script in
a scratch folder and compares a snapshot of the whole folder before and after.
Progress is left on, so a single stderr line also proves that nothing was
computed before the error was found.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfbp.errors import EXIT_GATE, EXIT_INTERRUPTED, EXIT_USER_ERROR

PROJECT = Path(__file__).resolve().parent.parent
MODELS = PROJECT / "models"
DEMO = MODELS / "demo_mnist_cnn.onnx"
ADAPT = MODELS / "demo_adapt.npz"
FAST = ("--max-layers", "1", "--sweeps", "1")


def _command() -> list[str]:
    script = shutil.which("onnxfbp", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "onnxfbp.cli"]


ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def onnxfbp(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_command(), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout, check=False)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (its sha256) and folder below ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def refused(work: Path, *args: str | Path, code: int = EXIT_USER_ERROR) -> str:
    """Run the script; assert it refused cleanly and left ``work`` as it was. Returns
    the stderr line."""
    before = snapshot(work)
    proc = onnxfbp(*args, cwd=work)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no progress lines: nothing was computed
    prefix = "onnxfbp: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert len(lines[0]) > len(prefix) + 20
    assert snapshot(work) == before, "the run changed files"
    return lines[0][len(prefix):]


def _demo_arrays(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    with np.load(ADAPT) as z:
        return z["input"][:n].copy(), z["y"][:n].copy()


def _external_copy(folder: Path, name: str = "model.onnx", location: str | None = None) -> Path:
    """The demo model saved with its weights in an external data file."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(DEMO))
    onnx.save_model(model, str(folder / name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location or f"{name}.data",
                    size_threshold=0)
    return folder / name


def _set_locations(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


# ------------------------------------------------------------------------ models


def _model_missing(work: Path) -> str:
    return "nope.onnx"


def _model_folder(work: Path) -> str:
    (work / "folder.onnx").mkdir()
    return "folder.onnx"


def _model_empty(work: Path) -> str:
    (work / "empty.onnx").write_bytes(b"")
    return "empty.onnx"


def _model_truncated(work: Path) -> str:
    raw = DEMO.read_bytes()
    (work / "cut.onnx").write_bytes(raw[: len(raw) // 2])
    return "cut.onnx"


def _model_garbage(work: Path) -> str:
    (work / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return "garbage.onnx"


def _model_npz(work: Path) -> str:
    shutil.copy(work / "adapt.npz", work / "data_as_model.onnx")
    return "data_as_model.onnx"


def _model_opset99(work: Path) -> str:
    model = onnx.load(str(DEMO))
    model.opset_import[0].version = 99
    onnx.save_model(model, str(work / "opset99.onnx"))
    return "opset99.onnx"


def _model_ir99(work: Path) -> str:
    model = onnx.load(str(DEMO))
    model.ir_version = 99
    onnx.save_model(model, str(work / "ir99.onnx"))
    return "ir99.onnx"


def _model_ext_missing(work: Path) -> str:
    path = _external_copy(work / "ext")
    (work / "ext" / "model.onnx.data").unlink()
    return str(path.relative_to(work))


def _model_ext_outside(work: Path) -> str:
    path = _external_copy(work / "ext")
    (work / "ext" / "model.onnx.data").rename(work / "weights.data")
    _set_locations(path, "../weights.data")
    return str(path.relative_to(work))


def _model_ext_absolute(work: Path) -> str:
    path = _external_copy(work / "ext")
    _set_locations(path, str((work / "ext" / "model.onnx.data").resolve()))
    return str(path.relative_to(work))


def _model_ext_truncated(work: Path) -> str:
    path = _external_copy(work / "ext")
    data = work / "ext" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    return str(path.relative_to(work))


def _model_no_scores(work: Path) -> str:
    """The demo model with an ArgMax after the logits: only an int64 output."""
    model = onnx.load(str(DEMO))
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("ArgMax", [logits], ["label"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
    onnx.save_model(model, str(work / "argmax.onnx"))
    return "argmax.onnx"


def _model_nothing_refinable(work: Path) -> str:
    """input (N,1,28,28) -> Flatten -> Slice (10 values) -> Relu: no weights at all."""
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["ten"]),
        helper.make_node("Relu", ["ten"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(np.array([v], np.int64), n)
             for n, v in (("starts", 0), ("ends", 10), ("axes", 1))]
    graph = helper.make_graph(
        nodes, "no-weights",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(work / "no_weights.onnx"))
    return "no_weights.onnx"


BAD_MODELS: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "missing": (_model_missing, ("does not exist", "check the path")),
    "folder": (_model_folder, ("folder", "pass the .onnx file")),
    "empty": (_model_empty, ("empty",)),
    "truncated": (_model_truncated, ("not a readable onnx model", "truncated")),
    "garbage": (_model_garbage, ("not a readable onnx model",)),
    "npz-not-onnx": (_model_npz, ("not a readable onnx model",)),
    "opset-99": (_model_opset99, ("opset 99", "onnxruntime", "up to opset", "re-export")),
    "ir-version-99": (_model_ir99, ("ir version 99", "onnxruntime", "re-export")),
    "external-data-missing": (_model_ext_missing, ("model.onnx.data", "missing", "copy it")),
    "external-data-outside": (_model_ext_outside, ("outside the model folder", "refusing")),
    "external-data-absolute": (_model_ext_absolute, ("absolute location", "refusing")),
    "external-data-truncated": (_model_ext_truncated, ("shorter", "truncated")),
    "no-class-score-output": (_model_no_scores, ("no class-score output",)),
    "nothing-refinable": (_model_nothing_refinable, ("nothing to refine",)),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_model_is_refused(work: Path, case: str) -> None:
    build, fragments = BAD_MODELS[case]
    model = build(work)
    message = refused(work, "refine", model, "out.onnx", "--data", "adapt.npz", *FAST)
    for fragment in fragments:
        assert fragment in message.lower(), message


def test_bad_model_is_refused_by_eval_too(work: Path) -> None:
    message = refused(work, "eval", _model_opset99(work), "--data", "adapt.npz")
    assert "opset 99" in message


def test_shared_external_data_model_without_its_data_file(shared_models: Path,
                                                          tmp_path: Path) -> None:
    """The real dynamo export from the corpus, copied without ``mnist_cnn.onnx.data``."""
    shutil.copy(shared_models / "mnist_dynamo_pt211_extdata_resnet_gap" / "mnist_cnn.onnx",
                tmp_path / "mnist_cnn.onnx")
    x, y = _demo_arrays(50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    message = refused(tmp_path, "refine", "mnist_cnn.onnx", "out.onnx", "--data", "d.npz")
    assert "mnist_cnn.onnx.data" in message and "missing" in message


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode")
@pytest.mark.parametrize("name", ["model.onnx", "adapt.npz"])
def test_unreadable_input_file(work: Path, name: str) -> None:
    (work / name).chmod(0)
    try:
        message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz")
    finally:
        (work / name).chmod(0o644)
    assert "cannot read" in message


# -------------------------------------------------------------------------- data


def _save(work: Path, name: str, **arrays: np.ndarray) -> str:
    np.savez(work / name, **arrays)  # type: ignore[arg-type]
    return name


def _bad_data(case: str, work: Path) -> str:
    x, y = _demo_arrays(300)
    if case == "missing":
        return "nope.npz"
    if case == "garbage":
        (work / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
        return "garbage.npz"
    if case == "single-npy":
        np.save(work / "x.npy", x)
        return "x.npy"
    if case == "empty-folder":
        (work / "nothing").mkdir()
        return "nothing"
    if case == "npy-without-labels":
        (work / "mm").mkdir()
        np.save(work / "mm" / "x.npy", x)
        return "mm"
    if case == "wrong-keys":  # also: no labels
        return _save(work, "keys.npz", images=x)
    if case == "objects":
        return _save(work, "objects.npz", x=np.array([object()] * 3), y=y[:3])
    if case == "wrong-shape":
        return _save(work, "shape.npz", x=x[:, 0], y=y)
    if case == "wrong-dtype":
        return _save(work, "complex.npz", x=x.astype(np.complex64), y=y)
    if case == "float-labels":
        return _save(work, "flabels.npz", x=x, y=y.astype(np.float32))
    if case == "nan":
        x[-1, 0, 5, 5] = np.nan  # the last sample: validation reads everything first
        return _save(work, "nan.npz", x=x, y=y)
    if case == "inf":
        x[7, 0, 0, 0] = -np.inf
        return _save(work, "inf.npz", x=x, y=y)
    if case == "label-out-of-range":
        y[-1] = 10
        return _save(work, "range.npz", x=x, y=y)
    if case == "label-negative":
        y[3] = -1
        return _save(work, "negative.npz", x=x, y=y)
    if case == "empty":
        return _save(work, "empty.npz", x=x[:0], y=y[:0])
    if case == "length-mismatch":
        return _save(work, "lengths.npz", x=x, y=y[:-5])
    if case == "labels-2d":
        return _save(work, "y2d.npz", x=x, y=y[:, None])
    if case == "memmap-length-mismatch":
        (work / "mm").mkdir()
        np.save(work / "mm" / "x.npy", x)
        np.save(work / "mm" / "y.npy", y[:-1])
        return "mm"
    if case == "shard-without-labels":
        (work / "shards").mkdir()
        np.savez(work / "shards" / "0.npz", x=x[:100], y=y[:100])
        np.savez(work / "shards" / "1.npz", x=x[100:])
        return "shards"
    if case == "shard-with-nan":
        (work / "shards").mkdir()
        np.savez(work / "shards" / "0.npz", x=x[:100], y=y[:100])
        x[250, 0, 1, 1] = np.nan
        np.savez(work / "shards" / "1.npz", x=x[100:], y=y[100:])
        return "shards"
    raise AssertionError(case)


BAD_DATA = {
    "missing": ("does not exist",),
    "garbage": ("not an .npz file", "numpy.savez"),
    "single-npy": ("single .npy", "x.npy and y.npy"),
    "empty-folder": ("neither x.npy + y.npy nor .npz shards",),
    "npy-without-labels": ("no y.npy",),
    "wrong-keys": ("has keys ['images']", "'input' or 'x'", "labels under 'y'"),
    "objects": ("python objects", "numeric"),
    "wrong-shape": ("shape [300, 28, 28]", "expects ['n', 1, 28, 28]"),
    "wrong-dtype": ("dtype complex64",),
    "float-labels": ("labels have dtype float32", "integer"),
    "nan": ("nan or inf", "sample 299"),
    "inf": ("nan or inf", "sample 7"),
    "label-out-of-range": ("label 10 is out of range", "0..9"),
    "label-negative": (">= 0", "-1"),
    "empty": ("no samples",),
    "length-mismatch": ("labels of shape [295]", "pair one to one"),
    "labels-2d": ("labels of shape [300, 1]", "1-d"),
    "memmap-length-mismatch": ("300 inputs but 299 labels",),
    "shard-without-labels": ("1.npz", "no labels under 'y'"),
    "shard-with-nan": ("1.npz", "nan or inf", "sample 250"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused(work: Path, case: str) -> None:
    data = _bad_data(case, work)
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", data, *FAST)
    for fragment in BAD_DATA[case]:
        assert fragment in message.lower(), message


def test_bad_eval_data_is_refused_before_any_work(work: Path) -> None:
    data = _bad_data("nan", work)  # NaN in the very last sample of the eval data
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz",
                      "--eval-data", data)
    assert "nan.npz" in message and "nan or inf" in message.lower()


def test_bad_data_is_refused_by_eval(work: Path) -> None:
    message = refused(work, "eval", "model.onnx", "--data", _bad_data("label-negative", work))
    assert ">= 0" in message




# ------------------------------------------------------------------------ output


def test_output_equal_to_input_is_refused(work: Path) -> None:
    for spelling in ("./model.onnx", str(work / "model.onnx")):
        message = refused(work, "refine", "model.onnx", spelling, "--data", "adapt.npz",
                          "--force")
        assert "is the input model" in message


def test_output_linked_to_input_is_refused(work: Path) -> None:
    (work / "link.onnx").symlink_to(work / "model.onnx")
    message = refused(work, "refine", "model.onnx", "link.onnx", "--data", "adapt.npz", "--force")
    assert "is the input model" in message


def test_output_on_input_external_data_is_refused(work: Path) -> None:
    """Writing ``OUT`` or its ``OUT.data`` must never clobber the input's weights."""
    _external_copy(work / "ext", "a.onnx", location="b.onnx.data")
    message = refused(work, "refine", "ext/a.onnx", "ext/b.onnx.data", "--data", "adapt.npz",
                      "--force")
    assert "would overwrite b.onnx.data" in message
    message = refused(work, "refine", "ext/a.onnx", "ext/b.onnx", "--data", "adapt.npz",
                      "--force")
    assert "would overwrite b.onnx.data" in message


def test_existing_output_needs_force(work: Path) -> None:
    (work / "out.onnx").write_bytes(b"keep me")
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz")
    assert "already exists" in message and "--force" in message


def test_existing_output_data_file_needs_force(work: Path) -> None:
    (work / "out.onnx.data").write_bytes(b"keep me")
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz")
    assert "out.onnx.data already exists" in message and "--force" in message


@pytest.mark.parametrize("output, fragments", [
    ("adapt.npz/out.onnx", ("adapt.npz is a file, not a folder",)),
    ("no/such/folder/out.onnx", ("does not exist", "create it first")),
    (".", ("is a folder", "file name")),
    ("sub", ("is a folder", "file name")),
])
def test_impossible_output_path(work: Path, output: str, fragments: tuple[str, ...]) -> None:
    (work / "sub").mkdir()
    message = refused(work, "refine", "model.onnx", output, "--data", "adapt.npz")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_output_folder(work: Path) -> None:
    """/proc accepts no new files, even from root (os.access would say it does)."""
    message = refused(work, "refine", "model.onnx", "/proc/out.onnx", "--data", "adapt.npz")
    assert "not writable" in message and "/proc" in message


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_output_folder(work: Path) -> None:
    (work / "ro").mkdir()
    (work / "ro").chmod(0o555)
    try:
        message = refused(work, "refine", "model.onnx", "ro/out.onnx", "--data", "adapt.npz")
    finally:
        (work / "ro").chmod(0o755)
    assert "not writable" in message


@pytest.mark.parametrize("report, fragment", [
    ("model.onnx", "also the model, data or output"),
    ("out.onnx", "also the model, data or output"),
    ("sub", "is a folder"),
    ("/proc/report.json", "not writable"),
    ("missing/report.json", "does not exist"),
])
def test_bad_report_path_is_refused_before_any_work(work: Path, report: str,
                                                    fragment: str) -> None:
    (work / "sub").mkdir()
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz",
                      "--report", report)
    assert fragment in message


@pytest.mark.parametrize("case", ["data", "eval-data", "output", "report"])
def test_nothing_is_computed_before_inputs_are_checked(
        work: Path, case: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """In-process, with onnxruntime's batch runs forbidden: each of these errors is
    found before the first forward pass (a NaN in the very last sample included)."""
    from onnxfbp.cli import commands as cli
    from onnxfbp.run.forward import ForwardRunner

    runs: list[int] = []

    def forbidden(self: object, x: np.ndarray, *args: object, **kwargs: object) -> None:
        runs.append(len(x))
        raise RuntimeError("a forward pass ran before the inputs were checked")

    monkeypatch.setattr(ForwardRunner, "run", forbidden)
    argv = {
        "data": ["--data", str(work / _bad_data("nan", work))],
        "eval-data": ["--data", str(work / "adapt.npz"), "--eval-data",
                      str(work / _bad_data("label-out-of-range", work))],
        "output": ["--data", str(work / "adapt.npz")],
        "report": ["--data", str(work / "adapt.npz"), "--report", "/proc/report.json"],
    }[case]
    output = "/proc/out.onnx" if case == "output" else str(work / "out.onnx")
    if case in ("output", "report") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    code = cli.main(["refine", str(work / "model.onnx"), output, *argv, "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert runs == [] and err.startswith("onnxfbp: error: ")


@pytest.mark.parametrize("args,fragment", [
    (("--epochs", "0"), "epochs 0.0 (a positive number)"),
    (("--epochs", "-1"), "epochs -1.0"),
    (("--holdout", "1.5"), "holdout 1.5"),
    (("--max-layers", "0"), "max_layers 0 (at least 1)"),
    (("--batch-size", "-4"), "batch_size -4"),
])
def test_out_of_range_settings_are_refused_before_any_work(
    work: Path, args: tuple[str, ...], fragment: str
) -> None:
    msg = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz", *args)
    assert msg.startswith("setting out of range: ") and fragment in msg, msg


def test_output_that_is_a_data_file_is_refused(work: Path) -> None:
    message = refused(work, "refine", "model.onnx", "adapt.npz", "--data", "adapt.npz",
                      "--force")
    assert "would overwrite the data file adapt.npz" in message


def test_debug_shows_the_traceback(work: Path) -> None:
    proc = onnxfbp("refine", "model.onnx", "out.onnx", "--data", _bad_data("nan", work),
                   "--debug", cwd=work)
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" in proc.stderr and "DataError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("onnxfbp: error: ")
    assert not (work / "out.onnx").exists()


# -------------------------------------------------------------------------- gate


def _outputs(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_min_gain_gate_exits_3_and_writes_nothing(work: Path) -> None:
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz",
                      "--min-gain", "0.5", "--quiet", *FAST, code=EXIT_GATE)
    assert "below --min-gain 0.5" in message and "nothing written" in message


def test_failed_gate_still_writes_the_report_but_no_model(work: Path) -> None:
    proc = onnxfbp("refine", "model.onnx", "out.onnx", "--data", "adapt.npz", "--min-gain",
                   "0.5", "--report", "report.json", "--quiet", *FAST, cwd=work)
    assert proc.returncode == EXIT_GATE, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("onnxfbp: error: held-out")
    report = json.loads((work / "report.json").read_text())
    assert report["written"] is None
    assert not (work / "out.onnx").exists()
    assert not list(work.glob(".onnxfbp-*")) and not list(work.glob(".report.json*"))


def test_min_gain_met_writes_the_model(work: Path) -> None:
    proc = onnxfbp("refine", "model.onnx", "out.onnx", "--data", "adapt.npz", "--min-gain",
                   "0.01", "--quiet", *FAST, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "out.onnx").is_file()


def test_worse_model_is_never_written_by_default(work: Path) -> None:
    """Held-out data labelled with the input model's own predictions: the input model
    scores 1.0 there, so any refinement that changes a prediction is worse."""
    with np.load(MODELS / "demo_eval.npz") as z:
        x = z["input"][:300]
    y = _outputs(DEMO, x).argmax(axis=1).astype(np.int64)
    np.savez(work / "self_labelled.npz", x=x, y=y)
    message = refused(work, "refine", "model.onnx", "out.onnx", "--data", "adapt.npz",
                      "--eval-data", "self_labelled.npz", "--quiet", *FAST, code=EXIT_GATE)
    assert "worse on held-out data" in message and "nothing written" in message

    proc = onnxfbp("refine", "model.onnx", "out.onnx", "--data", "adapt.npz", "--eval-data",
                   "self_labelled.npz", "--allow-worse", "--quiet", *FAST, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "out.onnx").is_file()


# -------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_run_exits_130_and_writes_nothing(tmp_path: Path, signum: int) -> None:
    """A full refine of the demo model takes a few seconds; the signal arrives in
    the middle of it (after the first held-out check of the minibatch schedule)."""
    shutil.copy(DEMO, tmp_path / "model.onnx")
    shutil.copy(ADAPT, tmp_path / "adapt.npz")
    before = snapshot(tmp_path)
    proc = subprocess.Popen(
        [*_command(), "refine", "model.onnx", "out.onnx", "--data", "adapt.npz",
         "--report", "report.json"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any("minibatch step" in line for line in lines):
            assert time.monotonic() < deadline, "no progress line within 120 s"
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                line = proc.stderr.readline()
                assert line, f"refine ended early: {''.join(lines)}"
                lines.append(line)
        started = time.monotonic()
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=60)
        stopped = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(lines) + rest
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert rest.strip().splitlines()[-1] == "onnxfbp: interrupted; nothing was written", stderr
    assert stopped < 10, f"took {stopped:.1f}s to stop"
    assert snapshot(tmp_path) == before  # no output, no report, no .onnxfbp-* folder


def test_interrupt_while_writing_leaves_no_output_and_no_temp_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the staged file is being checked: the temporary folder goes away."""
    from onnxfbp.output import patch

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(patch.onnx.checker, "check_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        patch.write_refined(onnx.load(str(DEMO)), tmp_path / "out.onnx", False, DEMO)
    assert list(tmp_path.iterdir()) == []


def test_signal_during_commit_places_neither_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT between placing the data file and the model of an external-data output
    aborts the commit: the data file is taken back, neither file is left, and the
    interrupt is delivered after (never a half output)."""
    from onnxfbp import paths
    from onnxfbp.graph.plan import load_model
    from onnxfbp.output import patch

    source = _external_copy(tmp_path / "in")
    real_link = os.link
    calls: list[str] = []

    def link_and_signal(src: str | Path, dst: str | Path) -> None:
        calls.append(str(dst))
        real_link(src, dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two placements

    monkeypatch.setattr(paths.os, "link", link_and_signal)
    out = tmp_path / "out" / "refined.onnx"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        patch.write_refined(load_model(source), out, False, source)
    assert calls == [str(out) + ".data"]
    assert list(out.parent.iterdir()) == []


def test_interrupt_message_says_when_the_output_was_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxfbp.cli import commands as cli

    def writes_then_interrupted(args: object) -> int:
        (tmp_path / "out.onnx").write_bytes(b"new")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_refine", writes_then_interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["refine", str(DEMO), str(tmp_path / "out.onnx"), "--data", str(ADAPT)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == EXIT_INTERRUPTED
    assert "interrupted after" in capsys.readouterr().err


# ---------------------------------------------------------------------- numerics


def _finite_initializers(path: Path) -> bool:
    model = onnx.load(str(path))
    return all(np.isfinite(numpy_helper.to_array(t)).all() for t in model.graph.initializer
               if numpy_helper.to_array(t).dtype.kind == "f")


@pytest.mark.parametrize("inputs", ["zeros", "constant", "huge"])
def test_degenerate_data_never_yields_non_finite_weights(work: Path, inputs: str) -> None:
    """All-zero or constant inputs make every layer's Gram singular (rank one, plus
    the bias); inputs of 1e30 overflow the float32 activations to inf / NaN. Either
    the run writes a finite model, or the gate refuses with a clear message."""
    x, y = _demo_arrays(200)
    x = {"zeros": np.zeros_like(x), "constant": np.full_like(x, 0.5),
         "huge": x * np.float32(1e30)}[inputs]
    np.savez(work / "degenerate.npz", x=x, y=y)
    proc = onnxfbp("refine", "model.onnx", "out.onnx", "--data", "degenerate.npz", *FAST,
                   cwd=work)
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        assert _finite_initializers(work / "out.onnx")
        assert "wrote out.onnx" in proc.stdout
    else:
        assert proc.returncode == EXIT_GATE, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("onnxfbp: error: ")
        assert not (work / "out.onnx").exists()


def test_solver_skips_singular_and_non_finite_systems() -> None:
    """choose_ridge on a zero Gram, a NaN Gram and an overflowing Gram: finite
    weights (the ridge solution, or W0 when no solve is finite)."""
    from onnxfbp.fit.solve import NormalEquations, choose_ridge

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((1, 4, 3))
    for fill in (0.0, np.nan, np.inf, 1e300):
        train, val = NormalEquations(1, 4, 3), NormalEquations(1, 4, 3)
        for ne in (train, val):
            ne.gram[...] = fill
            ne.cross[...] = rng.standard_normal((1, 4, 3))
        with np.errstate(all="ignore"):
            choice = choose_ridge(train, val, w0, (1e-3, 1e-2, 1e-1, 1.0))
        assert np.isfinite(np.asarray(choice.weights)).all(), fill
