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
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import OutputError

__all__ = ["check_output_path", "with_initializers", "write_refined"]

EXTERNAL_SIZE_THRESHOLD = 1024


def check_output_path(input_path: Path, output: Path, force: bool) -> None:
    """Refuse an output that equals the input, exists (without force), or cannot be written."""
    if output.exists() and input_path.exists() and output.resolve() == input_path.resolve():
        raise OutputError(f"output {output} is the input model; choose another output path")
    if output.is_dir():
        raise OutputError(f"output {output} is a directory; give a file name such as refined.onnx")
    if output.exists() and not force:
        raise OutputError(f"output {output} already exists; pass --force to overwrite it")
    parent = output.parent if str(output.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"cannot write {output}: {probe} is a file, not a folder")
    if not parent.is_dir():
        raise OutputError(f"cannot write {output}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {output}: folder {parent} is not writable")


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
    """Check and atomically write ``model`` to ``output`` (with ``.data`` if external)."""
    check_output_path(input_path, output, force)
    if external is None:
        external = _input_has_external_data(input_path) or model.ByteSize() > 2_000_000_000
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxfbp-", dir=output.parent if str(output.parent) else "."))
    try:
        staged = tmpdir / output.name
        data_name = output.name + ".data"
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=EXTERNAL_SIZE_THRESHOLD)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
        if external and (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, output.parent / data_name)
        os.replace(staged, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
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
