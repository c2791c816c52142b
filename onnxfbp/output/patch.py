"""Patch: write refined weights into a copy of the input model.

Only stored weight *values* change (initializers, and the value attributes of
Constant nodes that hold weights): the same names, dtypes and shapes, the same
nodes, attributes, inputs, outputs, opsets and metadata. Tensors that the input
kept in an external data file are kept external in ``OUT.onnx.data``. The file
is checked (onnx.checker, then loaded by onnxruntime) in a temporary folder
next to the destination and moved into place only then, so the output appears
whole or not at all. The input file is only ever read.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ..errors import OutputError
from ..graph.weights import constant_value, write_constant
from ..paths import (
    NAME_MAX,
    Commit,
    _same,
    check_destination,
    check_distinct,
    held_signals,
    model_files,
    remove_stale_staging,
)

__all__ = [
    "NonFiniteRefinedWarning",
    "check_output_path",
    "signals_deferred",
    "stage_refined",
    "with_initializers",
    "write_refined",
]

EXTERNAL_SIZE_THRESHOLD = 1024


def check_output_path(input_path: Path, output: Path, force: bool) -> None:
    """Refuse, before any work, an output that cannot be written as asked.

    The rules of :func:`onnxfbp.paths.check_destination` hold for the output and
    for the ``OUT.data`` file an external-data output writes; neither may be the
    input model or one of its external data files (also through a link).
    """
    output, input_path = Path(output), Path(input_path)
    if output.name in ("", ".", "..") or os.path.isdir(output):
        raise OutputError(f"output {output} is a folder; give a file name such as refined.onnx")
    data_file = output.with_name(output.name + ".data")
    if any(
            os.path.lexists(p) for p in (output, data_file)):
        protected = model_files(input_path)
        if _same(output, input_path):
            raise OutputError(f"output {output} is the input model; choose another output path")
        check_distinct([(output, "output"), (data_file, "the output's data file")], protected)
    check_destination(output, "output", force, "choose another output path")
    if len(os.fsencode(data_file.name)) > NAME_MAX and not os.path.lexists(data_file) \
            and not _input_has_external_data(input_path):
        return  # no OUT.data is written: a name of up to 255 bytes is fine
    check_destination(data_file, "the output's data file", force,
                      "pass --force to overwrite it or choose another output path")


signals_deferred = held_signals  # the earlier name


class NonFiniteRefinedWarning(UserWarning):
    """A refined tensor held NaN or Inf; its original value was kept instead."""


def with_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named stored tensors hold ``values`` (same dtype and
    shape): initializers by name, Constant nodes by their output's name (written in
    the form the node holds its value, :func:`onnxfbp.graph.weights.write_constant`).

    No refined weight is ever non-finite: a value with NaN or Inf (after the cast to
    the stored dtype) is not written; the tensor keeps its original value and
    a :class:`NonFiniteRefinedWarning` names it (the CLI prints it on stderr and
    lists it under ``notes`` in the report).
    """
    out = copy.deepcopy(model)
    for tensor in out.graph.initializer:
        if tensor.name in values:
            cast = _checked_value(tensor.name, numpy_helper.to_array(tensor), values[tensor.name])
            if cast is not None:
                replacement = numpy_helper.from_array(cast, tensor.name)
                replacement.doc_string = tensor.doc_string
                tensor.CopyFrom(replacement)
    initializers = {t.name for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1 \
                and node.output[0] in values and node.output[0] not in initializers:
            old = constant_value(node)
            if old is None:
                raise ValueError(f"Constant {node.output[0]} holds no value onnxfbp writes")
            cast = _checked_value(node.output[0], old, values[node.output[0]])
            if cast is not None:
                write_constant(node, cast)
    return out


def _checked_value(name: str, old: np.ndarray, value: np.ndarray) -> np.ndarray | None:
    """``value`` cast to ``old``'s dtype, or None to keep ``old`` (unchanged, or not
    finite: then a :class:`NonFiniteRefinedWarning` says so)."""
    new = np.asarray(value)
    if new.shape != old.shape:
        raise ValueError(f"refined {name} has shape {new.shape}, expected {old.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = new.astype(old.dtype)
    if cast.dtype.kind in "fc" and not np.isfinite(cast).all():
        if np.array_equal(cast, old, equal_nan=True):
            return None  # unchanged (a non-finite input let through by --allow-nonfinite-input)
        import warnings  # noqa: PLC0415

        warnings.warn(NonFiniteRefinedWarning(
            f"refined weight {name!r} held NaN or Inf; its original value was kept"),
            stacklevel=3)
        return None
    return cast


def stage_refined(model: onnx.ModelProto, output: Path, commit: Commit, input_path: Path,
                  external: bool | None = None) -> Path:
    """Save ``model`` for ``output`` into ``commit``'s staging folder (with
    ``OUT.data`` if external), check it with onnx.checker and load it with
    onnxruntime; return the staged path. Nothing is placed until ``commit.commit()``.
    """
    output, input_path = Path(output), Path(input_path)
    if external is None:
        external = _input_has_external_data(input_path) or model.ByteSize() > 2_000_000_000
    data_name = output.name + ".data"
    try:
        staged = commit.stage(output, main=True)
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=EXTERNAL_SIZE_THRESHOLD)
        else:
            onnx.save_model(model, str(staged))
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}; nothing was written") \
            from None
    if external and (staged.parent / data_name).exists():
        commit.add(staged.parent / data_name, output.with_name(data_name))
    onnx.checker.check_model(str(staged))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    ort.InferenceSession(str(staged), options, providers=["CPUExecutionProvider"])
    return staged


def write_refined(model: onnx.ModelProto, output: Path, force: bool, input_path: Path,
                  external: bool | None = None) -> None:
    """Check and atomically write ``model`` to ``output`` (with ``.data`` if external).

    The model is saved, checked by onnx.checker and loaded by onnxruntime in a
    staging ``.onnxfbp-*`` folder next to ``output``, then placed (see
    :class:`onnxfbp.paths.Commit`): the data file and the model together or
    neither. Ctrl-C or SIGTERM at any point leaves no output (or, once both are
    placed, the complete one) and no staging folder.
    """
    output, input_path = Path(output), Path(input_path)
    check_output_path(input_path, output, force)
    remove_stale_staging([output])
    with Commit(force) as commit:
        stage_refined(model, output, commit, input_path, external)
        commit.commit()


def _input_has_external_data(path: Path) -> bool:
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(
        t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
        for t in header.graph.initializer
    )
