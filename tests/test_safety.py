"""Safe in CI, the edges (issue 17): never touch an input, never half-write, never
write NaN, never hang, and every user error one ``onnxfbp: error:`` line.

Each test names the item of the issue it reproduces. Most cases run
``onnxfbp.cli.main`` in-process (fast); signals, closed stdout and FIFOs run the
real script in a subprocess. Every case compares a snapshot of its scratch folder
before and after: an error leaves nothing behind (no output, no report, no
``.onnxfbp-*`` staging folder).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfbp.cli import commands as cli
from onnxfbp.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, OutputError
from onnxfbp.paths import Commit, remove_stale_staging

PROJECT = Path(__file__).resolve().parent.parent
DEMO = PROJECT / "models" / "demo_mnist_cnn.onnx"
ADAPT = PROJECT / "models" / "demo_adapt.npz"
FAST = ("--max-layers", "1", "--sweeps", "1", "--quiet")
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(PROJECT)}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry below ``folder``: files by content, links by target, others by kind."""
    out: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = ("special", os.stat(path).st_mode)
    return out


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, *fragments: str, exit_code: int = EXIT_USER_ERROR) -> None:
    lines = err.strip().splitlines()
    assert code == exit_code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxfbp: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err


def script(*args: str | Path, cwd: Path, timeout: float = 120,
           **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxfbp.cli", *map(str, args)], cwd=cwd,
                          env=ENV, text=True, timeout=timeout, check=False,
                          **kwargs)  # type: ignore[call-overload]


def external_copy(folder: Path, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load(str(DEMO)), str(folder / name), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=0)
    return folder / name


def with_weight(path: Path, out: Path, index: int, value: float) -> Path:
    model = onnx.load(str(path))
    tensor = model.graph.initializer[index]
    array = numpy_helper.to_array(tensor).copy()
    array.flat[0] = value
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    onnx.save_model(model, str(out))
    return out


# ------------------------------------------------- 1, 2, 3: one set of path rules


def test_1_report_on_the_input_external_data_is_refused(capsys: pytest.CaptureFixture[str],
                                                        work: Path) -> None:
    victim = external_copy(work / "victim", "mnist_cnn.onnx")
    before = snapshot(work)
    code, _, err = run(capsys, "refine", victim, work / "d.onnx", "--data", work / "adapt.npz",
                       "--report", str(victim) + ".data", "--force", *FAST)
    one_error(code, err, "mnist_cnn.onnx.data")
    assert snapshot(work) == before


def test_2_report_on_the_output_data_file_is_refused(capsys: pytest.CaptureFixture[str],
                                                     work: Path) -> None:
    before = snapshot(work)
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "d.onnx", "--data",
                       work / "adapt.npz", "--report", work / "d.onnx.data", *FAST)
    one_error(code, err, "d.onnx.data")
    assert snapshot(work) == before


@pytest.mark.parametrize("flag", ["output", "report"])
@pytest.mark.parametrize("kind", ["link-to-devnull", "link-to-file", "fifo", "folder-link"])
def test_3_output_and_report_never_replace_links_devices_or_fifos(
        capsys: pytest.CaptureFixture[str], work: Path, flag: str, kind: str) -> None:
    target = work / "target"
    if kind == "link-to-devnull":
        target.symlink_to(os.devnull)
    elif kind == "link-to-file":
        (work / "real.json").write_text("{}")
        target.symlink_to(work / "real.json")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        (work / "dir").mkdir()
        target.symlink_to(work / "dir")
    before = snapshot(work)
    args: list[str | Path] = ["refine", work / "model.onnx",
            target if flag == "output" else work / "out.onnx", "--data", work / "adapt.npz",
            "--force", *FAST]
    if flag == "report":
        args += ["--report", target]
    code, _, err = run(capsys, *args)
    one_error(code, err)
    assert snapshot(work) == before
    assert os.path.islink(target) or kind == "fifo"


@pytest.mark.skipif(not IS_ROOT, reason="only root could replace /dev/null")
def test_3_dev_null_is_never_replaced_as_root(capsys: pytest.CaptureFixture[str],
                                              work: Path) -> None:
    """Refused by the path check before any work, so the real device is never at risk."""
    st = os.stat(os.devnull)
    code, _, err = run(capsys, "report", work / "r.json", "-o", os.devnull, "--force")
    one_error(code, err, "character device")
    assert os.stat(os.devnull).st_ino == st.st_ino


def test_3_report_html_output_follows_the_same_rules(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    report.write_text("{}")
    (tmp_path / "page.html").symlink_to(os.devnull)
    code, _, err = run(capsys, "report", report, "-o", tmp_path / "page.html", "--force")
    one_error(code, err, "symbolic link")
    assert (tmp_path / "page.html").is_symlink()


# ------------------------------------------------- 4: the run committed as one step


def test_4_report_failure_leaves_no_model(capsys: pytest.CaptureFixture[str], work: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The report cannot be written (a full disk): the model is not placed either."""
    real = Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == "report.json":
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)
    before = snapshot(work)
    code, out, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                         work / "adapt.npz", "--report", work / "report.json", *FAST)
    one_error(code, err, "No space left")
    assert snapshot(work) == before


def test_4_long_report_name_is_written_whole(capsys: pytest.CaptureFixture[str],
                                             work: Path) -> None:
    """A 250-character report name: its staged copy keeps the name, so it fits."""
    report = work / ("r" * 245 + ".json")
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       work / "adapt.npz", "--report", report, *FAST)
    assert code == 0, err
    assert json.loads(report.read_text())["written"] == str(work / "out.onnx")
    assert not [p for p in work.iterdir() if p.name.startswith(".onnxfbp-")]


@pytest.mark.parametrize("stdout", ["closed", "full"])
def test_4_closed_or_full_stdout_writes_nothing(work: Path, stdout: str) -> None:
    before = snapshot(work)
    args = ["refine", "model.onnx", "out.onnx", "--data", "adapt.npz", "--report",
            "report.json", *FAST]
    if stdout == "full":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        with open("/dev/full", "w") as full:
            proc = script(*args, cwd=work, stdout=full, stderr=subprocess.PIPE)
        err = proc.stderr
        code = proc.returncode
    else:
        child = subprocess.Popen([sys.executable, "-m", "onnxfbp.cli", *args], cwd=work,
                                 env=ENV, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()  # the reader is gone before the run prints anything
        err = child.stderr.read()
        code = child.wait(timeout=120)
    one_error(code, err, "standard output", "nothing was written")
    assert snapshot(work) == before


def test_4_signal_during_the_commit_places_nothing(capsys: pytest.CaptureFixture[str],
                                                   work: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM between placing the report and the model: both are taken back, exit 130."""
    from onnxfbp import paths

    real_link = os.link
    calls: list[str] = []

    def link_and_signal(src: str | Path, dst: str | Path) -> None:
        calls.append(str(dst))
        real_link(src, dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(paths.os, "link", link_and_signal)
    before = snapshot(work)
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       work / "adapt.npz", "--report", work / "report.json", *FAST)
    assert code == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "onnxfbp: interrupted; nothing was written"
    assert calls == [str(work / "report.json")]
    assert snapshot(work) == before


# ------------------------------------------------- 5: never NaN


@pytest.mark.parametrize("index,value", [(0, float("nan")), (1, float("inf"))],
                         ids=["nan-weight", "inf-bias"])
def test_5_non_finite_input_weights_are_refused(capsys: pytest.CaptureFixture[str],
                                                work: Path, index: int, value: float) -> None:
    bad = with_weight(work / "model.onnx", work / "bad.onnx", index, value)
    before = snapshot(work)
    code, _, err = run(capsys, "refine", bad, work / "out.onnx", "--data", work / "adapt.npz",
                       *FAST)
    one_error(code, err, "NaN or Inf", "--allow-nonfinite-input")
    assert snapshot(work) == before


def test_5_allowed_non_finite_input_is_kept_and_eval_json_stays_json(
        capsys: pytest.CaptureFixture[str], work: Path) -> None:
    bad = with_weight(work / "model.onnx", work / "bad.onnx", 1, float("nan"))
    code, out, err = run(capsys, "eval", bad, "--data", work / "adapt.npz", "--json",
                         "--allow-nonfinite-input", "--quiet")
    assert code == 0, err
    parsed = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in {out}"))
    assert parsed["loss"] is None  # NaN scores: no finite loss, written as null


def test_5_allowed_non_finite_weights_pass_through_unchanged(
        capsys: pytest.CaptureFixture[str], work: Path) -> None:
    """With --allow-nonfinite-input a NaN bias is kept as it is, without a warning that
    calls it refined; every weight that was refined is finite."""
    bad = with_weight(work / "model.onnx", work / "bad.onnx", 1, float("nan"))
    code, _, err = run(capsys, "refine", bad, work / "out.onnx", "--data", work / "adapt.npz",
                       "--allow-nonfinite-input", "--allow-worse", *FAST)
    assert code == 0, err
    assert "warning" not in err
    written = onnx.load(str(work / "out.onnx"))
    source = onnx.load(str(bad))
    for new, old in zip(written.graph.initializer, source.graph.initializer, strict=True):
        a, b = numpy_helper.to_array(new), numpy_helper.to_array(old)
        assert np.isfinite(a).all() or np.array_equal(a, b, equal_nan=True), new.name


def test_5_refined_weights_are_never_non_finite() -> None:
    """The last guard: a refined value with NaN/Inf (or one that overflows the
    initializer's dtype) is not written; the tensor keeps its original value."""
    from onnxfbp.output.patch import NonFiniteRefinedWarning, with_initializers

    model = onnx.load(str(DEMO))
    names = [t.name for t in model.graph.initializer[:2]]
    old = [numpy_helper.to_array(t) for t in model.graph.initializer[:2]]
    nan = np.full_like(old[0], np.nan)
    huge = np.full(old[1].shape, 1e39, np.float64)  # Inf once cast to float32
    with pytest.warns(NonFiniteRefinedWarning):
        out = with_initializers(model, {names[0]: nan, names[1]: huge})
    for tensor, original in zip(out.graph.initializer[:2], old, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), original)


def test_5_data_finite_in_float64_but_inf_in_float32_is_refused(
        capsys: pytest.CaptureFixture[str], work: Path) -> None:
    with np.load(work / "adapt.npz") as z:
        x, y = z["input"].astype(np.float64), z["y"]
    x[7, 0, 0, 0] = 1e39
    np.savez(work / "big.npz", input=x, y=y)
    before = snapshot(work)
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       work / "big.npz", *FAST)
    one_error(code, err, "float32", "sample 7")
    assert snapshot(work) == before


# ------------------------------------------------- 6: --holdout leaves 50 on each side


@pytest.mark.parametrize("holdout", ["0", "1e-9", "0.1", "0.999"])
def test_6_holdout_must_leave_50_samples_on_each_side(
        capsys: pytest.CaptureFixture[str], work: Path, holdout: str) -> None:
    before = snapshot(work)
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       work / "adapt.npz", "--holdout", holdout, *FAST)
    one_error(code, err, "--holdout", "at least 50")
    assert snapshot(work) == before


# ------------------------------------------------- 7: bounded reads, no hangs


def test_7_dev_zero_as_data_is_refused(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       "/dev/zero", *FAST)
    one_error(code, err, "character device")


@pytest.mark.parametrize("command", ["eval", "refine", "report", "inspect"])
def test_7_fifo_inputs_never_block(work: Path, command: str) -> None:
    os.mkfifo(work / "fifo")
    before = snapshot(work)
    args = {
        "eval": ["eval", "model.onnx", "--data", "fifo"],
        "refine": ["refine", "model.onnx", "out.onnx", "--data", "fifo"],
        "report": ["report", "fifo", "-o", "page.html"],
        "inspect": ["inspect", "fifo"],
    }[command]
    proc = script(*args, cwd=work, timeout=60, capture_output=True)
    one_error(proc.returncode, proc.stderr, "FIFO")
    assert snapshot(work) == before


def test_7_fifo_as_external_weights_file_is_named(capsys: pytest.CaptureFixture[str],
                                                  work: Path) -> None:
    model = external_copy(work / "ext")
    data = model.with_name(model.name + ".data")
    data.unlink()
    os.mkfifo(data)
    code, _, err = run(capsys, "eval", model, "--data", work / "adapt.npz")
    one_error(code, err, "FIFO")
    assert "missing" not in err


def test_7_npz_member_declaring_more_than_it_holds_is_refused(
        capsys: pytest.CaptureFixture[str], work: Path) -> None:
    """A forged npy header (a huge shape) is refused from the zip's sizes, before any
    allocation: not 'out of memory'."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    with zipfile.ZipFile(work / "forged.npz", "w") as zf:
        with zf.open("input.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
        with zf.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(3, np.int64))
    code, _, err = run(capsys, "eval", work / "model.onnx", "--data", work / "forged.npz")
    one_error(code, err, "forged.npz", "declares shape")
    assert "out of memory" not in err


# ------------------------------------------------- 8: user errors, not internal errors


def test_8_damaged_deflate_stream_is_a_data_error(capsys: pytest.CaptureFixture[str],
                                                  work: Path) -> None:
    with np.load(work / "adapt.npz") as z:
        np.savez_compressed(work / "c.npz", input=z["input"], y=z["y"])
    raw = bytearray((work / "c.npz").read_bytes())
    with zipfile.ZipFile(work / "c.npz") as zf:
        info = zf.getinfo("input.npy")
    start = info.header_offset + 30 + len(info.filename) + 200
    for k in range(start, start + 64):
        raw[k] ^= 0x5A
    (work / "c.npz").write_bytes(bytes(raw))
    code, _, err = run(capsys, "eval", work / "model.onnx", "--data", work / "c.npz")
    one_error(code, err, "c.npz")


@pytest.mark.parametrize("dim", [0, -3])
def test_8_non_positive_batch_dimension_is_a_model_error(
        capsys: pytest.CaptureFixture[str], work: Path, dim: int) -> None:
    model = onnx.load(str(DEMO))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = dim
    onnx.save_model(model, str(work / "bad.onnx"))
    code, _, err = run(capsys, "eval", work / "bad.onnx", "--data", work / "adapt.npz")
    one_error(code, err, f"as {dim}")


@pytest.mark.parametrize("location", ["nul", "long", "loop"])
def test_8_impossible_external_data_names_are_model_errors(
        capsys: pytest.CaptureFixture[str], work: Path, location: str) -> None:
    model_path = external_copy(work / "ext")
    name = {"nul": "a\0b.data", "long": "x" * 300, "loop": "loop.data"}[location]
    if location == "loop":
        (work / "ext" / "loop.data").symlink_to(work / "ext" / "loop.data")
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = name
    onnx.save_model(model, str(model_path))
    code, _, err = run(capsys, "eval", model_path, "--data", work / "adapt.npz")
    one_error(code, err)


def test_8_invalid_utf8_tensor_name_is_a_model_error(capsys: pytest.CaptureFixture[str],
                                                     work: Path) -> None:
    raw = DEMO.read_bytes()
    name = b"features.0.weight"
    (work / "bad.onnx").write_bytes(raw.replace(name, b"\xff" + name[1:]))
    code, _, err = run(capsys, "refine", work / "bad.onnx", work / "out.onnx", "--data",
                       work / "adapt.npz", *FAST)
    one_error(code, err, "UTF-8")


@pytest.mark.parametrize("args,fragment", [
    (("--seed", "-1"), "--seed"),
    (("--min-gain", "nan"), "--min-gain"),
    (("--epochs", "inf"), "--epochs"),
    (("--holdout", "0.999"), "--holdout"),
    (("--batch-size", "x"), "--batch-size"),
    (("--schedule", "fast"), "--schedule"),
    (("--unknown",), "--unknown"),
], ids=["seed", "min-gain-nan", "epochs-inf", "holdout", "batch-size", "schedule", "unknown"])
def test_8_10_bad_settings_are_one_line(capsys: pytest.CaptureFixture[str], work: Path,
                                        args: tuple[str, ...], fragment: str) -> None:
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       work / "adapt.npz", *args)
    one_error(code, err, fragment)


@pytest.mark.parametrize("argv", [[], ["refine"], ["nonsense"], ["report", "r.json"]],
                         ids=["nothing", "refine-alone", "bad-command", "report-no-o"])
def test_10_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                         argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    one_error(code, err)
    assert out == ""


def test_8_255_byte_output_name_is_written(capsys: pytest.CaptureFixture[str],
                                           work: Path) -> None:
    out = work / ("o" * 250 + ".onnx")
    code, _, err = run(capsys, "refine", work / "model.onnx", out, "--data", work / "adapt.npz",
                       *FAST)
    assert code == 0, err
    onnx.checker.check_model(str(out))


def test_8_256_byte_output_name_is_a_user_error(capsys: pytest.CaptureFixture[str],
                                                work: Path) -> None:
    code, _, err = run(capsys, "refine", work / "model.onnx", work / ("o" * 251 + ".onnx"),
                       "--data", work / "adapt.npz", *FAST)
    one_error(code, err, "255")


def test_8_256_byte_report_page_name_is_a_user_error(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{}")
    code, _, err = run(capsys, "report", tmp_path / "r.json", "-o", tmp_path / ("p" * 256))
    one_error(code, err, "255")


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_8_report_into_read_only_folder(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "r.json").write_text("{}")
    (tmp_path / "ro").chmod(0o555)
    try:
        code, _, err = run(capsys, "report", tmp_path / "r.json", "-o",
                           tmp_path / "ro" / "page.html")
    finally:
        (tmp_path / "ro").chmod(0o755)
    one_error(code, err, "not writable")


def test_8_deeply_nested_report_is_refused(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run(capsys, "report", tmp_path / "deep.json", "-o", tmp_path / "p.html")
    one_error(code, err, "nests")
    assert not (tmp_path / "p.html").exists()


# ------------------------------------------------- 9: leftovers and races


def test_9_stale_staging_folder_of_a_dead_process_is_removed(
        capsys: pytest.CaptureFixture[str], work: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = work / f".onnxfbp-{pid}-abc"
    stale.mkdir()
    (stale / "owner").write_text(f"{pid}\nout.onnx\n")
    (stale / "out.onnx").write_bytes(b"partial" * 1000)
    mine = work / f".onnxfbp-{os.getpid()}-live"  # a live owner's folder is left alone
    mine.mkdir()
    (mine / "owner").write_text(f"{os.getpid()}\nout.onnx\n")
    other = work / ".onnxfbp-1-other"  # another destination's folder is left alone
    other.mkdir()
    (other / "owner").write_text(f"{pid}\nother.onnx\n")
    code, _, err = run(capsys, "refine", work / "model.onnx", work / "out.onnx", "--data",
                       work / "adapt.npz", *FAST)
    assert code == 0, err
    assert not stale.exists() and mine.exists() and other.exists()


def test_9_a_run_never_overwrites_an_output_that_appeared_meanwhile(tmp_path: Path) -> None:
    """Two concurrent runs to one output without --force: the second to commit fails
    (exclusive creation), the first one's file is untouched, nothing is left behind."""
    dest = tmp_path / "out.onnx"
    with Commit(force=False) as commit:
        commit.stage(dest, main=True).write_bytes(b"mine")
        dest.write_bytes(b"the other run")  # the other run committed first
        with pytest.raises(OutputError, match="appeared while this run was working"):
            commit.commit()
    assert dest.read_bytes() == b"the other run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_9_failed_commit_takes_back_what_it_placed(tmp_path: Path) -> None:
    """The report is placed, then the model cannot be: the report is taken back and a
    replaced file (--force) gets its old content back."""
    report, model = tmp_path / "r.json", tmp_path / "out.onnx"
    report.write_text("old report")
    with Commit(force=True) as commit:
        commit.stage(report).write_text("new report")
        commit.stage(model, main=True).write_bytes(b"model")
        os.mkfifo(model)  # the model's destination turned into a FIFO meanwhile
        with pytest.raises(OutputError):
            commit.commit()
    assert report.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "r.json"]


def test_9_remove_stale_staging_ignores_unowned_folders(tmp_path: Path) -> None:
    (tmp_path / ".onnxfbp-probe").mkdir()  # no owner file: not ours to judge
    assert remove_stale_staging([tmp_path / "out.onnx"]) == []
    assert (tmp_path / ".onnxfbp-probe").exists()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_9_signal_mid_run_leaves_nothing(work: Path, signum: int) -> None:
    before = snapshot(work)
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxfbp.cli", "refine", "model.onnx", "out.onnx", "--data",
         "adapt.npz", "--report", "report.json", "--max-layers", "1"],
        cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        seen = ""
        while "held-out" not in seen and "step" not in seen:
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            assert ready, "no progress within 120 s"
            line = proc.stderr.readline()
            assert line, f"refine ended early: {seen}"
            seen += line
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, seen + rest
    assert rest.strip().splitlines()[-1] == "onnxfbp: interrupted; nothing was written"
    assert snapshot(work) == before


# ------------------------------------------------- 10: rough edges


def test_10_report_output_needs_force(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    report.write_text("{}")
    page = tmp_path / "model.onnx"
    page.write_bytes(b"precious")
    code, _, err = run(capsys, "report", report, "-o", page)
    one_error(code, err, "--force")
    assert page.read_bytes() == b"precious"


def test_10_inspect_escapes_terminal_control_characters(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    model = onnx.load(str(DEMO))
    model.graph.node[1].name = "\x1b[2Jevil\x07"
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    code, out, err = run(capsys, "inspect", tmp_path / "m.onnx")
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2Jevil\\x07" in out


def test_10_rendering_caps_giant_reports(tmp_path: Path) -> None:
    """20,000 layer visits and 1,500 classes: the tables are cut at MAX_TABLE_ROWS
    with a note, the layer figure draws the last visits, the confusion figure is
    bounded in size."""
    from onnxfbp.output.figures import MAX_TABLE_ROWS
    from onnxfbp.output.html import build_html

    k, n = 1500, 3000
    confusion = np.zeros((k, k), np.int64)
    confusion[np.arange(n) % k, np.arange(n) % k] = 2
    split = {"accuracy": 1.0, "n": 2 * k, "loss": 0.1, "per_class": [1.0] * k,
             "confusion": confusion.tolist()}
    visit = {"sweep": 0, "name": "fc", "op": "Gemm", "weight_shape": [2, 2], "accepted": True,
             "reason": "gain", "lam": 0.1, "relative_change": 0.1, "residual_before": 1.0,
             "residual_after": 0.5, "heldout_accuracy": 0.9, "seconds": 0.1}
    report: dict[str, object] = {"schema": "onnxfbp.report/1", "written": None, "model": "m.onnx",
              "heldout": {"before": split, "after": split}, "eval": None,
              "layers": [dict(visit, sweep=i) for i in range(20_000)],
              "timings": {"total": 1.0}, "environment": {"device": "cpu", "providers": []},
              "plan": {"layers": [], "boundaries": []}, "config": {}}
    page = build_html(report)
    assert page.count("<tr>") <= 3 * (MAX_TABLE_ROWS + 1) + 50
    assert "more row(s) not shown" in page
    assert "the last 60 of 20000 visits" in page


def test_10_misleading_messages_are_fixed(capsys: pytest.CaptureFixture[str],
                                          work: Path) -> None:
    code, _, err = run(capsys, "inspect", "/dev/zero")
    one_error(code, err, "character device")
    assert "does not exist" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_10_signal_during_the_imports_exits_130(tmp_path: Path, signum: int) -> None:
    """The console script receives a signal while NumPy is being imported (the first
    heavy import, long before main() runs): exit 130 and one line, not -15 or a
    traceback."""
    code = (
        "import builtins, os, sys\n"
        "sys.argv = ['/usr/bin/onnxfbp', 'eval', 'm.onnx', '--data', 'd.npz']\n"
        "real = builtins.__import__\n"
        "def imp(name, *args, **kwargs):\n"
        "    if name == 'numpy':\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = imp\n"
        "from onnxfbp.cli.commands import main\n"
        "raise SystemExit(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["onnxfbp: interrupted; nothing was written"]
