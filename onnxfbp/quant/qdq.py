"""QDQ weights: ``w = DequantizeLinear(q, s, zp) = (q - zp) * s``.

A static QDQ model (``onnxruntime.quantization.quantize_static``, QuantFormat.QDQ)
stores each weight as an integer initializer ``q`` (int8 / uint8 / int4 / uint4 /
int16 / uint16 / int32 for biases) read by a ``DequantizeLinear`` node (default
domain, or ``com.microsoft`` where the opset has no such type) with a scale and
zero point that are per tensor (scalars), per axis (1-D along ``axis``) or, from
opset 21, per block (``block_size`` along ``axis``).

:func:`float_view` gives the model onnxfbp refines: every such node is replaced
by a float initializer holding ``(q - zp) * s`` under the node's output name, so
planning, forward passes and solves see an ordinary float model (activation
Q/DQ pairs stay: they are planned as a straight-through clip, see
:func:`fused_qdq`). :class:`QuantMap` maps the refined float values back:

    q = clip(round(w / s) + zp, qmin, qmax)        (nearest, ties to even)

into the *same* integer initializers (dtype, shape, scale and zero point
unchanged), so the written model has the input's graph. Every weight the run
sets is projected onto that grid at once (:meth:`QuantMap.project`), so each
forward pass and held-out score is the quantized model's own. A scale read by
one node alone may be refitted (:meth:`QuantMap.set_scale`, same shape: per
tensor stays per tensor); it is then written with the integers.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = [
    "INT_RANGES",
    "QuantMap",
    "QuantWeight",
    "float_view",
    "fused_qdq",
    "is_qdq_op",
]

# ONNX integer element types: (bits, qmin, qmax)
INT_RANGES: dict[int, tuple[int, int, int]] = {
    TensorProto.INT8: (8, -128, 127),
    TensorProto.UINT8: (8, 0, 255),
    TensorProto.INT16: (16, -32768, 32767),
    TensorProto.UINT16: (16, 0, 65535),
    TensorProto.INT32: (32, -(2**31), 2**31 - 1),
    TensorProto.INT4: (4, -8, 7),
    TensorProto.UINT4: (4, 0, 15),
}
_DOMAINS = ("", "ai.onnx", "com.microsoft")


def is_qdq_op(op: str, domain: str | None, kind: str = "DequantizeLinear") -> bool:
    return op == kind and (domain or "") in _DOMAINS


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


@dataclass(frozen=True)
class QuantWeight:
    """One dequantized weight: integer initializer ``initializer`` read by the
    ``DequantizeLinear`` node ``node`` whose output is ``tensor``."""

    initializer: str
    tensor: str
    node: str
    data_type: int
    shape: tuple[int, ...]
    scale: np.ndarray = field(repr=False)
    zero_point: np.ndarray = field(repr=False)
    axis: int | None  # None: per tensor
    block_size: int = 0  # > 0: per block along axis
    scale_initializer: str = ""  # the scale's initializer when only this node reads it

    @property
    def bits(self) -> int:
        return INT_RANGES[self.data_type][0]

    @property
    def qrange(self) -> tuple[int, int]:
        return INT_RANGES[self.data_type][1:]

    @property
    def type_name(self) -> str:
        return str(TensorProto.DataType.Name(self.data_type)).lower()

    @property
    def granularity(self) -> str:
        if self.axis is None:
            return "per-tensor"
        if self.block_size:
            return f"block {self.block_size} (axis {self.axis})"
        return f"per-channel axis {self.axis}"

    def _expand(self, a: np.ndarray) -> np.ndarray:
        """``a`` (scale or zero point) broadcast to the weight's shape."""
        a = np.asarray(a)
        if self.axis is None or a.ndim == 0:
            return a.reshape(())
        ndim = len(self.shape)
        if self.block_size:
            a = np.repeat(a, self.block_size, axis=self.axis)
            index = [slice(None)] * ndim
            index[self.axis] = slice(0, self.shape[self.axis])
            return a[tuple(index)]
        shape = [1] * ndim
        shape[self.axis] = -1
        return a.reshape(shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``(q - zp) * s`` as float32."""
        zp = self._expand(self.zero_point).astype(np.float64)
        s = self._expand(self.scale).astype(np.float64)
        return ((np.asarray(q).astype(np.float64) - zp) * s).astype(np.float32)

    def quantize(self, w: np.ndarray) -> np.ndarray:
        """Nearest grid point of float ``w``: ``clip(round(w / s) + zp)``, int64."""
        return self.to_int(self.levels(w))

    def levels(self, w: np.ndarray) -> np.ndarray:
        """``w / s + zp`` (unrounded, float64)."""
        s = self._expand(self.scale).astype(np.float64)
        zp = self._expand(self.zero_point).astype(np.float64)
        return np.asarray(w, dtype=np.float64) / np.where(s == 0, 1.0, s) + zp

    def to_int(self, levels: np.ndarray) -> np.ndarray:
        lo, hi = self.qrange
        return np.clip(np.rint(np.nan_to_num(levels)), lo, hi).astype(np.int64)

    def project(self, w: np.ndarray) -> np.ndarray:
        """``dequantize(quantize(w))``: the float value the written model will hold."""
        return self.dequantize(self.quantize(w))


@dataclass
class QuantMap:
    """The quantized weights of a model, by the float view's tensor name."""

    qdq_model: onnx.ModelProto  # the model as given (integer initializers)
    weights: dict[str, QuantWeight] = field(default_factory=dict)
    refit: set[str] = field(default_factory=set)  # tensors whose scale was changed
    _shadows: dict[int, tuple[Any, np.ndarray]] = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.weights)

    def set_scale(self, tensor: str, scale: np.ndarray) -> QuantWeight:
        """Give ``tensor``'s weight the scale ``scale`` (its scale initializer's shape;
        written with the integers). Only for a scale read by this weight alone."""
        qw = self.weights[tensor]
        if not qw.scale_initializer:
            raise ValueError(f"the scale of {tensor} is shared; it cannot be refitted")
        scale = np.asarray(scale, np.float32).reshape(qw.scale.shape)
        if not np.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(f"refitted scale of {tensor} is not finite and positive")
        self.weights[tensor] = dataclasses.replace(qw, scale=scale)
        self.refit.add(tensor)
        return self.weights[tensor]

    def reduced_range(self, tensor: str) -> int | None:
        """``max |q|`` over the input's integers of ``tensor`` where they use at most
        half their type's range (``quantize_static``'s ``reduce_range``: 7-bit values
        in int8), else None (also for nonzero zero points). A refitted scale keeps
        the integers within it, so that 7-bit weights stay 7-bit."""
        qw = self.weights[tensor]
        if np.any(qw.zero_point != 0):
            return None
        init = next(t for t in self.qdq_model.graph.initializer if t.name == qw.initializer)
        used = int(np.abs(numpy_helper.to_array(init).astype(np.int64)).max(initial=0))
        return used if 0 < used <= (qw.qrange[1] + 1) // 2 else None

    def snapshot(self) -> tuple[dict[str, QuantWeight], set[str]]:
        return dict(self.weights), set(self.refit)

    def restore(self, saved: tuple[dict[str, QuantWeight], set[str]]) -> None:
        self.weights, self.refit = dict(saved[0]), set(saved[1])

    def project(self, tensor: str, value: np.ndarray) -> np.ndarray:
        """``value`` on ``tensor``'s grid; the float ``value`` is kept as the result's
        shadow (:meth:`shadow`) while the result is alive."""
        qw = self.weights.get(tensor)
        if qw is None:
            return value
        out = qw.project(value).astype(value.dtype, copy=False)
        key = id(out)
        self._shadows[key] = (weakref.ref(out, lambda _: self._shadows.pop(key, None)),
                              np.array(value, copy=True))
        return out

    def shadow(self, value: np.ndarray) -> np.ndarray | None:
        """The float value that :meth:`project` rounded to ``value`` (this very array),
        or None (not a projection, or one of another run)."""
        entry = self._shadows.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def integer_values(self, floats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Integer initializer values for refined float tensors (others ignored), and
        the refitted scales of those tensors."""
        out = {qw.initializer: qw.quantize(floats[t])
               for t, qw in self.weights.items() if t in floats}
        out.update({self.weights[t].scale_initializer: self.weights[t].scale
                    for t in self.refit if t in floats})
        return out

    def patched(self, floats: dict[str, np.ndarray]) -> onnx.ModelProto:
        """The QDQ model with the integer initializers of ``floats`` (float view
        names); dtype, shape, zero points and nodes unchanged, scales too unless
        refitted (:meth:`set_scale`, ``--requantize-scales``)."""
        from ..output.patch import with_initializers  # noqa: PLC0415

        return with_initializers(self.qdq_model, self.integer_values(floats))

    def describe(self) -> list[dict[str, Any]]:
        return [{"tensor": t, "initializer": qw.initializer, "type": qw.type_name,
                 "bits": qw.bits, "granularity": qw.granularity}
                for t, qw in self.weights.items()]


def _weight_dq(node: onnx.NodeProto, inits: dict[str, TensorProto],
               uses: dict[str, int]) -> QuantWeight | None:
    """The :class:`QuantWeight` of a ``DequantizeLinear`` of initializers, if it is one
    onnxfbp can write back into (its integer initializer read by this node only)."""
    if not is_qdq_op(node.op_type, node.domain) or len(node.output) != 1:
        return None
    names = list(node.input) + [""] * (3 - len(node.input))
    q_name, s_name, zp_name = names[:3]
    if q_name not in inits or s_name not in inits or (zp_name and zp_name not in inits):
        return None
    q_init = inits[q_name]
    if q_init.data_type not in INT_RANGES or uses.get(q_name, 0) != 1:
        return None
    scale = numpy_helper.to_array(inits[s_name]).astype(np.float32)
    zp = (numpy_helper.to_array(inits[zp_name]).astype(np.int64) if zp_name
          else np.zeros(scale.shape, np.int64))
    shape = tuple(int(d) for d in q_init.dims)
    axis: int | None = None
    block = _attr(node, "block_size", 0)
    if scale.ndim > 0 and scale.size > 1 or block:
        axis = _attr(node, "axis", 1) % max(len(shape), 1)
    if not np.isfinite(scale).all() or (scale <= 0).any():
        return None
    own_scale = s_name if uses.get(s_name, 0) == 1 else ""
    return QuantWeight(q_name, node.output[0], node.name, q_init.data_type, shape, scale, zp,
                       axis, block, own_scale)


def float_view(model: onnx.ModelProto) -> tuple[onnx.ModelProto, QuantMap]:
    """The model with each weight ``DequantizeLinear(q, s, zp)`` of initializers
    replaced by a float initializer (its output name, value ``(q - zp) * s``), and
    the map back. A model without such nodes is returned as is (an empty map)."""
    qmap = QuantMap(model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    found = [(node, qw) for node in g.node
             if (qw := _weight_dq(node, inits, uses)) is not None]
    if not found:
        return model, qmap
    view = copy.deepcopy(model)
    drop = {id(node) for node, _ in found}
    kept_nodes = [n for n, orig in zip(view.graph.node, g.node, strict=True)
                  if id(orig) not in drop]
    del view.graph.node[:]
    view.graph.node.extend(kept_nodes)
    dead = {qw.initializer for _, qw in found}
    live = [t for t in view.graph.initializer if t.name not in dead]
    del view.graph.initializer[:]
    view.graph.initializer.extend(live)
    for _, qw in found:
        value = qw.dequantize(numpy_helper.to_array(inits[qw.initializer]))
        view.graph.initializer.append(numpy_helper.from_array(value, qw.tensor))
        qmap.weights[qw.tensor] = qw
    # scales / zero points no longer read by any node are dropped from the view
    read = {name for n in view.graph.node for name in n.input}
    outputs = {o.name for o in view.graph.output}
    live = [t for t in view.graph.initializer
            if t.name in read or t.name in outputs or t.name in qmap.weights]
    del view.graph.initializer[:]
    view.graph.initializer.extend(live)
    inputs = [i for i in view.graph.input if i.name not in dead]
    del view.graph.input[:]
    view.graph.input.extend(inputs)
    return view, qmap


def fused_qdq(node: Any, producer: dict[str, Any], values: dict[str, np.ndarray]
              ) -> tuple[str, dict[str, Any], str, list[str]] | None:
    """An activation's ``DequantizeLinear(QuantizeLinear(x, s, zp), s, zp)`` (gs nodes)
    as the straight-through ``Clip(x, (qmin - zp) s, (qmax - zp) s)``: targets pass
    unchanged inside the clip range and not outside it (its vjp). Per-tensor pairs
    with the same scale and zero point only; returns (op, attributes, x, the
    QuantizeLinear's name) or None."""
    if not is_qdq_op(node.op, node.domain) or not node.inputs:
        return None
    q = producer.get(node.inputs[0].name)
    if q is None or not is_qdq_op(q.op, q.domain, "QuantizeLinear"):
        return None

    def const(n: Any, i: int) -> np.ndarray | None:
        if len(n.inputs) <= i or not n.inputs[i].name:
            return None
        t = n.inputs[i]
        v = values.get(t.name)
        if v is None and hasattr(t, "values"):
            v = np.asarray(t.values)
        return None if v is None else np.asarray(v)

    s_dq, s_q, zp_dq, zp_q = const(node, 1), const(q, 1), const(node, 2), const(q, 2)
    if s_dq is None or s_q is None or s_dq.size != 1 or not np.array_equal(s_dq, s_q):
        return None
    zp = zp_q if zp_q is not None else np.zeros((), np.uint8)
    if zp_dq is not None and not np.array_equal(zp_dq, zp):
        return None
    type_of = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int16): TensorProto.INT16, np.dtype(np.uint16): TensorProto.UINT16}
    data_type = type_of.get(np.asarray(zp).dtype)
    if data_type is None:
        return None
    _, lo, hi = INT_RANGES[data_type]
    s, z = float(s_dq.reshape(())), float(np.asarray(zp).reshape(()))
    return "Clip", {"min": (lo - z) * s, "max": (hi - z) * s}, q.inputs[0].name, [q.name]
