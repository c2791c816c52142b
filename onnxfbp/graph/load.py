"""Reading a model file safely: the bytes, the IR version and opsets onnxruntime
runs, and external data that stays inside the model's folder and is whole.

:func:`load_model` raises :class:`ModelError` (one line: what is wrong, what to
do) for anything onnxfbp cannot use; :mod:`onnxfbp.graph.plan` plans what it returns.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError
from ..paths import check_input_file

__all__ = ["load_model"]

Opsets = tuple[tuple[str, int], ...]


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a model and its external data; refuse what onnxfbp cannot use safely.

    Raises :class:`ModelError` (one line: what is wrong, what to do) for a missing,
    unreadable, truncated or non-ONNX file, external data that is missing, short or
    outside the model's folder, and an IR version or opset onnxruntime cannot run.
    """
    path = Path(path)
    model = _read(path)
    _check_opsets(model, path)
    base = path.resolve().parent
    _check_external_data(model, path, base)
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelError(
            f"cannot read external data of {path.name} ({exc}); "
            "copy the complete data files next to it"
        ) from exc
    _check_tensor_sizes(model, path)
    _check_graph_inputs(model, path)
    if not allow_nonfinite_weights.get():
        _check_finite_weights(model, path)
    return model


allow_nonfinite_weights: ContextVar[bool] = ContextVar("allow_nonfinite_weights", default=False)
"""Whether :func:`load_model` accepts NaN / Inf weights (``--allow-nonfinite-input``)."""


def _read(path: Path) -> onnx.ModelProto:
    """The parsed model file (external data not loaded yet)."""
    if path.is_dir():
        raise ModelError(f"model {path} is a folder; pass the .onnx file inside it")
    check_input_file(path, "model file", ModelError)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ModelError(
            f"cannot read model {path}: {exc.strerror or exc}; check its permissions"
        ) from exc
    if not raw:
        raise ModelError(
            f"model file {path} is empty; pass the .onnx file exported by your framework"
        )
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: truncated, corrupt or "
            "another format); pass the .onnx file exported by your framework"
        ) from exc
    del raw
    if not model.graph.node:
        raise ModelError(
            f"{path} has no graph nodes: it is not an ONNX model, or an empty one; "
            "pass the .onnx file exported by your framework"
        )
    return model


class _OpsetProbe:
    """Whether onnxruntime loads a one-Identity-node model with a given IR version
    and opsets (milliseconds), so an unsupported opset is named before any work."""

    def __init__(self, ir: int) -> None:
        self.ir = ir
        self._seen: dict[Opsets, bool] = {}

    def accepts(self, opsets: Opsets) -> bool:
        import onnxruntime as ort  # noqa: PLC0415

        if opsets not in self._seen:
            vi = onnx.helper.make_tensor_value_info
            graph = onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                [vi("x", onnx.TensorProto.FLOAT, [1])], [vi("y", onnx.TensorProto.FLOAT, [1])],
            )
            probe = onnx.helper.make_model(
                graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets])
            probe.ir_version = self.ir
            options = ort.SessionOptions()
            options.log_severity_level = 4
            try:
                ort.InferenceSession(probe.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"])
                self._seen[opsets] = True
            except Exception:
                self._seen[opsets] = False
        return self._seen[opsets]

    def newest(self, base_probe: Opsets, domain: str, version: int) -> int:
        """The newest version below ``version`` of ``domain`` accepted (0: none), by
        bisection."""
        lo, hi = 0, version - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.accepts(tuple((d, mid if d == domain else v) for d, v in base_probe)):
                lo = mid
            else:
                hi = mid - 1
        return lo


def _check_opsets(model: onnx.ModelProto, path: Path) -> None:
    """Refuse an IR version or opset onnxruntime cannot run, naming it."""
    import onnxruntime as ort  # noqa: PLC0415

    ir = int(model.ir_version)
    probe = _OpsetProbe(ir)
    imports = tuple(sorted((o.domain or "", int(o.version)) for o in model.opset_import))
    if not imports:
        raise ModelError(
            f"{path} declares no opset: it is truncated or not a complete ONNX export; "
            "pass the .onnx file exported by your framework"
        )
    if probe.accepts(imports):
        return
    if not probe.accepts((("", 13),)):
        raise ModelError(
            f"{path.name} has ONNX IR version {ir}, which onnxruntime {ort.__version__} cannot "
            "load; re-export the model with an older exporter or upgrade onnxruntime"
        )
    main_version = next((v for d, v in imports if d in ("", "ai.onnx")), 13)
    for domain, version in imports:
        if domain in ("", "ai.onnx"):
            base_probe: Opsets = (("", version),)
        else:
            base_probe = (("", main_version), (domain, version))
        if probe.accepts(base_probe):
            continue
        lo = probe.newest(base_probe, domain, version)
        name = domain or "ai.onnx"
        runs = f"it runs {name} up to opset {lo}" if lo else f"it has no {name} domain"
        raise ModelError(
            f"{path.name} uses opset {version} of {name}, which onnxruntime "
            f"{ort.__version__} cannot run ({runs}); re-export the model with an older "
            "opset or upgrade onnxruntime"
        )
    listed = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in imports)
    raise ModelError(
        f"onnxruntime {ort.__version__} cannot load {path.name} (IR version {ir}, opsets "
        f"{listed}); re-export the model with an older exporter or upgrade onnxruntime"
    )


def _check_external_data(model: onnx.ModelProto, path: Path, base: Path) -> None:
    """External data files named relative to the model, inside its folder, present
    and long enough for each tensor's offset and length."""
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if "\0" in location or len(os.fsencode(location)) > 4096 or any(
                len(os.fsencode(part)) > 255 for part in Path(location).parts):
            raise ModelError(
                f"external data of {tensor.name!r} has an impossible file name "
                f"({location[:40]!r}...: a NUL byte or over the filesystem's limits); "
                "re-export the model"
            )
        try:
            target = (base / location).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise ModelError(
                f"external data file {location} of {tensor.name!r} cannot be resolved "
                f"({getattr(exc, 'strerror', None) or exc}); copy the real file next to "
                f"{path.name}"
            ) from None
        if not location:
            raise ModelError(
                f"weight {tensor.name!r} is stored as external data without a file name; "
                "re-export the model (onnx.save_model(..., save_as_external_data=True))"
            )
        if Path(location).is_absolute() or location.startswith(("/", "\\")):
            raise ModelError(
                f"external data of {tensor.name!r} has an absolute location ({location}); "
                "refusing it: keep the data file next to the model, named relative to it"
            )
        if base != target and base not in target.parents:
            raise ModelError(
                f"external data of {tensor.name!r} points outside the model folder "
                f"({location}); refusing it: keep the data file next to the model"
            )
        if not os.path.lexists(target):
            raise ModelError(
                f"external data file {location} for {tensor.name!r} is missing; "
                f"copy it next to {path.name}"
            )
        check_input_file(target, f"external data file of {tensor.name!r}", ModelError)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise ModelError(
                f"external data of {tensor.name!r} has a malformed offset or length; "
                "re-export the model"
            ) from None
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise ModelError(
                f"external data file {location} is shorter than {path.name} expects "
                f"({size} bytes; {tensor.name!r} needs bytes {offset}..{offset + max(length, 0)}): "
                "it is truncated or from another export; copy the complete file"
            )


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Each raw initializer holds the bytes its shape and type need."""
    t = onnx.TensorProto
    itemsize = {t.FLOAT: 4, t.DOUBLE: 8, t.FLOAT16: 2, t.BFLOAT16: 2, t.INT8: 1, t.UINT8: 1,
                t.INT16: 2, t.UINT16: 2, t.INT32: 4, t.UINT32: 4, t.INT64: 8, t.UINT64: 8,
                t.BOOL: 1}
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or tensor.data_type not in itemsize:
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize[tensor.data_type]
        if len(tensor.raw_data) != expected:
            raise ModelError(
                f"weight {tensor.name!r} of {path.name} holds {len(tensor.raw_data)} bytes but "
                f"its shape {list(tensor.dims)} needs {expected}: the model or its data file is "
                "truncated or corrupt; copy the complete files"
            )


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in model.graph.initializer
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
    ]




def _check_graph_inputs(model: onnx.ModelProto, path: Path) -> None:
    """Refuse names that are not valid UTF-8 and a graph input with a negative or
    zero fixed dimension (no batch can have that shape)."""
    for kind, names in (
        ("initializer", [t.name for t in model.graph.initializer]),
        ("node", [n.name for n in model.graph.node]),
        ("tensor", [x for n in model.graph.node for x in (*n.input, *n.output)]),
        ("graph input", [i.name for i in model.graph.input]),
        ("graph output", [o.name for o in model.graph.output]),
    ):
        for name in names:
            if not isinstance(name, str):
                raise ModelError(
                    f"{path.name}: {kind} name {name!r} is not valid UTF-8; "
                    "re-export the model with plain names"
                )
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        for k, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                raise ModelError(
                    f"input {value.name!r} of {path.name} declares dimension {k} as "
                    f"{dim.dim_value}; every dimension must be positive (or symbolic): "
                    "re-export the model"
                )


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16)


def _check_finite_weights(model: onnx.ModelProto, path: Path) -> None:
    """Refuse NaN or Inf in a floating-point initializer (the weights; Constant nodes,
    such as -inf masks, are never refined and are left alone)."""
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        try:
            value = numpy_helper.to_array(tensor)
        except Exception:  # unreadable tensors are reported when the model is run
            continue
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise ModelError(
                f"weight {tensor.name!r} of {path.name} holds {bad} NaN or Inf value(s); "
                "fix the export, or pass --allow-nonfinite-input to refine it anyway "
                "(those values are then kept as they are)"
            )
