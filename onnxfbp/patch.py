"""Patch: write refined weights into a copy of the input model.

Only initializer *values* change: the same names, dtypes and shapes, the same
nodes, attributes, inputs, outputs, opsets and metadata. Tensors that the input
kept in an external data file are kept external in ``OUT.onnx.data``. The file
is checked (onnx.checker, then loaded by onnxruntime) in a temporary folder
next to the destination and moved into place only then, so the output appears
whole or not at all. The input file is only ever read.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import OutputError

__all__ = ["check_output_path", "signals_deferred", "with_initializers", "write_refined"]

EXTERNAL_SIZE_THRESHOLD = 1024


def check_output_path(input_path: Path, output: Path, force: bool) -> None:
    """Refuse, before any work, an output that cannot be written as asked.

    Refused: the input model or one of its external data files (also through a link,
    and for the ``OUT.data`` file an external-data output writes), an existing file
    without ``force``, a folder, a path below a regular file, a missing or unwritable
    folder. Writability is probed by creating (and removing) an empty temporary
    folder where the output will be staged, so it holds for root and read-only mounts.
    """
    output, input_path = Path(output), Path(input_path)
    if output.name in ("", ".", "..") or output.is_dir():
        raise OutputError(f"output {output} is a folder; give a file name such as refined.onnx")
    data_file = output.with_name(output.name + ".data")
    protected = _input_files(input_path, [output, data_file])
    for candidate in (output, data_file):
        for k, name in enumerate(protected):
            if not _same_file(candidate, name):
                continue
            if candidate == output and k == 0:
                raise OutputError(f"output {output} is the input model; choose another output path")
            what = "the input model" if k == 0 else f"{name.name} (data of {input_path.name})"
            raise OutputError(
                f"writing {candidate} would overwrite {what}; choose another output path"
            )
    if output.exists() and not force:
        raise OutputError(f"output {output} already exists; pass --force to overwrite it")
    if data_file.exists() and not force:
        raise OutputError(
            f"{data_file} already exists (it would hold the output's weights); "
            "pass --force to overwrite it or choose another output path"
        )
    parent = output.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"cannot write {output}: {probe} is a file, not a folder")
    check_writable_folder(parent, str(output), "choose another output folder")


def check_writable_folder(parent: Path, what: str, advice: str) -> None:
    """Refuse a missing or unwritable folder by really creating (and removing) a
    temporary folder in it: permission bits alone lie for root and for /proc."""
    if not parent.is_dir():
        raise OutputError(f"cannot write {what}: folder {parent} does not exist; create it first")
    try:
        with signals_deferred():
            os.rmdir(tempfile.mkdtemp(prefix=".onnxfbp-", dir=parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write {what}: folder {parent} is not writable "
            f"({exc.strerror or exc}); {advice}"
        ) from exc


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (links and spellings resolved)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _input_files(input_path: Path, candidates: list[Path]) -> list[Path]:
    """The input model and (only if a candidate exists, to stay cheap) its external data files."""
    files = [input_path]
    if any(c.exists() for c in candidates) and input_path.is_file():
        try:
            header = onnx.load(str(input_path), load_external_data=False)
        except Exception:  # an unreadable model is reported by load_model
            return files
        for tensor in header.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), "")
                if location:
                    files.append(input_path.parent / location)
    return files


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM for the duration of a short critical section.

    A signal that arrives inside is re-raised as soon as the section ends, through
    the handler that was installed before (KeyboardInterrupt for SIGINT), so a
    commit of several renames, or the removal of a temporary folder, is never cut
    in half. Outside the main thread (where handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None or handler in (signal.SIG_IGN, signal.SIG_DFL):
            continue  # ignored, default (kills: nothing to clean up) or set outside Python
        previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])


def with_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``values`` (same dtype/shape)."""
    out = copy.deepcopy(model)
    for tensor in out.graph.initializer:
        if tensor.name not in values:
            continue
        old = numpy_helper.to_array(tensor)
        new = np.asarray(values[tensor.name])
        if new.shape != old.shape:
            raise ValueError(f"refined {tensor.name} has shape {new.shape}, expected {old.shape}")
        replacement = numpy_helper.from_array(new.astype(old.dtype), tensor.name)
        replacement.doc_string = tensor.doc_string
        tensor.CopyFrom(replacement)
    return out


def write_refined(model: onnx.ModelProto, output: Path, force: bool, input_path: Path,
                  external: bool | None = None) -> None:
    """Check and atomically write ``model`` to ``output`` (with ``.data`` if external).

    The model is saved, checked by onnx.checker and loaded by onnxruntime in a
    temporary ``.onnxfbp-*`` folder next to ``output``, then moved into place.
    Ctrl-C or SIGTERM at any point leaves either no output or a complete one, and
    no temporary folder.
    """
    output, input_path = Path(output), Path(input_path)
    check_output_path(input_path, output, force)
    if external is None:
        external = _input_has_external_data(input_path) or model.ByteSize() > 2_000_000_000
    tmpdir: Path | None = None
    try:
        with signals_deferred():
            tmpdir = Path(tempfile.mkdtemp(prefix=".onnxfbp-", dir=output.parent))
        staged = tmpdir / output.name
        data_name = output.name + ".data"
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=EXTERNAL_SIZE_THRESHOLD)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        with signals_deferred():  # the data file and the model land together
            if external and (tmpdir / data_name).exists():
                os.replace(tmpdir / data_name, output.parent / data_name)
            os.replace(staged, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        if tmpdir is not None:
            with signals_deferred():
                shutil.rmtree(tmpdir, ignore_errors=True)


def _input_has_external_data(path: Path) -> bool:
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(
        t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
        for t in header.graph.initializer
    )
