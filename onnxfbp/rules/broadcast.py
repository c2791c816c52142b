"""Copies, selections and sums: Split, Expand, Tile, Where (constant condition),
ReduceSum, ReduceL2, Einsum.

Linearized only, except ReduceSum: its inverse spreads the residual evenly,
``x* = x0 + broadcast(t - o0) / count`` (the minimum-norm change). The others
have no inverse here; the sweep schedules stop at them.

Reverse steps ``J^T r`` (NumPy and ONNX alike):

- Split: the outputs' residuals concatenated along the axis (zeros for an
  output no residual reaches);
- Expand: ``r`` summed over the broadcast axes; Tile: ``r`` summed over the
  copies; Where ``(c, X, Y)``: ``r`` where ``c`` to ``X``, elsewhere to ``Y``
  (each summed over its broadcast axes);
- ReduceSum: ``r`` broadcast back; ReduceL2 ``o = sqrt(sum x^2)``: ``x r / o``
  (0 where ``o = 0``);
- Einsum of operands ``A_1 .. A_k`` (``k <= 2``, explicit output, no repeated
  index within an operand, every index of an operand also in the output or the
  other operand): the Einsum of ``r`` and the other operand to ``A_j``'s indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, decode, register, unbroadcast, xp_of
from .pool import _expand, reduce_axes

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

_REDUCE = {"keepdims": 1, "axes": None, "noop_with_empty_axes": 0}


def _operand(node: NodeView, xs: Sequence[Array], index: int) -> Array:
    if index in node.static:
        return xp_of(xs[0]).asarray(node.static[index])
    return xs[node.dynamic.index(index)]


def split_sizes(node: NodeView, size: int, outputs: int) -> list[int]:
    """Split's output sizes along its axis: the ``split`` input (opset 13) or
    attribute, else equal parts (the last one smaller, opset 18)."""
    sizes = node.attr("split")
    if 1 in node.static and np.asarray(node.static[1]).size:
        sizes = np.asarray(node.static[1]).ravel().tolist()
    if sizes:
        return [int(s) for s in sizes]
    n = int(node.attr("num_outputs") or outputs)
    part = -(-size // n)
    return [min(part, size - k * part) for k in range(n)]


@register
class SplitRule(InverseRule):
    """Split into several outputs (``forward`` returns the list)."""

    op_types = ("Split",)
    defaults = {"Split": {"axis": 0, "split": None, "num_outputs": None}}
    multi_output = True

    def check(self, node: NodeView) -> str | None:
        if node.n_inputs > 1 and 1 not in node.static:
            return "split sizes must be constant"
        return super().check(node)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> list[Array]:
        x = xs[0]
        axis = int(node.attr("axis")) % x.ndim
        sizes = split_sizes(node, x.shape[axis], int(node.attr("num_outputs") or 0) or 2)
        cuts = np.cumsum(sizes)[:-1].tolist()
        return list(xp_of(x).split(x, cuts, axis=axis))

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        x = xs[0]
        xp = xp_of(x)
        axis = int(node.attr("axis")) % x.ndim
        sizes = split_sizes(node, x.shape[axis], len(r))
        parts = []
        for size, rk in zip(sizes, r, strict=True):
            shape = list(x.shape)
            shape[axis] = size
            parts.append(xp.zeros(shape, dtype=x.dtype) if rk is None else rk.astype(x.dtype))
        return [xp.concatenate(parts, axis=axis)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        rs: list[str | None] = r  # type: ignore[assignment]
        x_shape = b.shape(xs[0])
        axis = int(node.attr("axis")) % len(x_shape)
        if axis == 0 and None in rs:
            return None  # zeros along the symbolic batch axis
        sizes = split_sizes(node, x_shape[axis], len(rs))
        parts = []
        for size, rk in zip(sizes, rs, strict=True):
            if rk is None:
                rest = [size if i == axis else s for i, s in enumerate(x_shape)][1:]
                batch = b.op("Slice", [b.shape_of(xs[0]), b.const([0], np.int64),
                                       b.const([1], np.int64)])
                rk = b.zeros(b.op("Concat", [batch, b.const(rest, np.int64)], axis=0))
            parts.append(rk)
        return [b.op("Concat", parts, axis=axis)]


@register
class ExpandRule(InverseRule):
    """Expand (numpy broadcasting to a shape)."""

    op_types = ("Expand",)

    def check(self, node: NodeView) -> str | None:
        return None  # the shape may be computed at run time; only data flows back

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        x = xs[0]
        shape = tuple(int(s) for s in np.asarray(node.const(1)).ravel())
        target = np.broadcast_shapes(tuple(x.shape), shape)
        return xp_of(x).broadcast_to(x, target).copy()

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        x = xs[0]
        return [unbroadcast(r, tuple(x.shape), xp_of(r).sum).astype(x.dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.unbroadcast(r, b.shape(o), b.shape(xs[0]))]


@register
class TileRule(InverseRule):
    """Tile by constant repeats."""

    op_types = ("Tile",)

    def check(self, node: NodeView) -> str | None:
        if 1 not in node.static:
            return "repeats must be constant"
        return super().check(node)

    def _reps(self, node: NodeView) -> list[int]:
        return [int(v) for v in np.asarray(node.const(1)).ravel()]

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).tile(xs[0], self._reps(node))

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        x = xs[0]
        reps = self._reps(node)
        inter = [d for pair in zip(reps, x.shape, strict=True) for d in pair]
        summed = r.reshape(inter).sum(axis=tuple(range(0, 2 * x.ndim, 2)))
        return [summed.astype(x.dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        reps = self._reps(node)
        if reps[0] != 1:
            return None  # copies along the symbolic batch axis
        inter = [1, -1] + [d for pair in zip(reps[1:], x_shape[1:], strict=True) for d in pair]
        folded = b.op("Reshape", [r, b.const(inter, np.int64)])
        axes = b.const(list(range(0, 2 * len(x_shape), 2)), np.int64)
        return [b.op("ReduceSum", [folded, axes], keepdims=0)]


@register
class WhereRule(InverseRule):
    """Where ``(c, X, Y)`` with a constant condition ``c``."""

    op_types = ("Where",)

    def check(self, node: NodeView) -> str | None:
        if 0 not in node.static:
            return "the condition is computed from the input (no derivative through it)"
        return None

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        return tuple(i for i in node.dynamic if i in (1, 2))

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        xp = xp_of(xs[0])
        c = xp.asarray(node.const(0)).astype(bool)
        return xp.where(c, _operand(node, xs, 1), _operand(node, xs, 2))

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        xp = xp_of(r)
        c = xp.asarray(node.const(0)).astype(bool)
        out = []
        for index, x in zip(node.dynamic, xs, strict=True):
            d = xp.where(c, r, 0.0) if index == 1 else xp.where(c, 0.0, r)
            d = xp.broadcast_to(d, r.shape)
            out.append(unbroadcast(d, tuple(x.shape), xp.sum).astype(x.dtype, copy=False))
        return out

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        cond = b.op("Cast", [b.static(0)], to=9)  # BOOL
        zero = b.op("Mul", [r, b.const(0.0)])
        out = []
        for index, name in zip(node.dynamic, xs, strict=True):
            pick = [r, zero] if index == 1 else [zero, r]
            d = b.op("Where", [cond, *pick])
            out.append(b.unbroadcast(d, b.shape(o), b.shape(name)))
        return out


def _kept_shape(x_shape: tuple[int, ...], axes: tuple[int, ...]) -> list[int]:
    """The reduced output's shape with the reduced axes kept (batch symbolic)."""
    return [1 if i in axes else (-1 if i == 0 else s) for i, s in enumerate(x_shape)]


class _Sum(InverseRule):
    def check(self, node: NodeView) -> str | None:
        if node.attr("noop_with_empty_axes"):
            return "noop_with_empty_axes is not supported"
        if node.n_inputs > 1 and 1 not in node.static:
            return "axes must be constant"
        return super().check(node)


@register
class ReduceSumRule(_Sum):
    """ReduceSum (axes an attribute, or an input from opset 13)."""

    op_types = ("ReduceSum",)
    defaults = {"ReduceSum": _REDUCE}
    linear = True

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return self.apply_linear(node, xs[0])

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        axes, keep = reduce_axes(node, x.ndim)
        return x.sum(axis=axes, keepdims=keep)

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        axes, keep = reduce_axes(node, len(x_shape))
        return xp_of(y).broadcast_to(_expand(y, axes, keep), x_shape)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        axes, _ = reduce_axes(node, len(x_shape))
        spread = b.op("Reshape", [r, b.const(_kept_shape(x_shape, axes), np.int64)])
        return [b.op("Expand", [spread, b.shape_of(xs[0])])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        x0 = xs[0]
        axes, keep = reduce_axes(node, x0.ndim)
        count = int(np.prod([x0.shape[a] for a in axes]))
        return [(x0 + _expand(t - o0, axes, keep) / count).astype(x0.dtype)]


@register
class ReduceL2Rule(_Sum):
    """ReduceL2 ``o = sqrt(sum x^2)``."""

    op_types = ("ReduceL2",)
    defaults = {"ReduceL2": _REDUCE}

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        axes, keep = reduce_axes(node, xs[0].ndim)
        return xp_of(xs[0]).sqrt((xs[0] * xs[0]).sum(axis=axes, keepdims=keep))

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        xp, x = xp_of(r), xs[0]
        axes, keep = reduce_axes(node, x.ndim)
        norm = xp.sqrt((x.astype(xp.float64) ** 2).sum(axis=axes, keepdims=True))
        scale = _expand(r, axes, keep) / xp.maximum(norm, 1e-30)
        return [(x * scale).astype(x.dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        axes, _ = reduce_axes(node, len(x_shape))
        kept = b.const(_kept_shape(x_shape, axes), np.int64)
        norm = b.op("Max", [b.op("Reshape", [b.act(o), kept]), b.const(1e-30)])
        scale = b.op("Div", [b.op("Reshape", [r, kept]), norm])
        return [b.op("Mul", [b.act(xs[0]), scale])]


def einsum_terms(node: NodeView) -> tuple[list[str], str] | None:
    """The operands' and the output's subscripts of an explicit Einsum equation
    without ellipsis, or None."""
    eq = decode(node.attr("equation")).replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    return lhs.split(","), out


@register
class EinsumRule(InverseRule):
    """Einsum of one or two operands (see the module docstring for the forms)."""

    op_types = ("Einsum",)
    defaults = {"Einsum": {"equation": ""}}

    def check(self, node: NodeView) -> str | None:
        terms = einsum_terms(node)
        if terms is None:
            return "only explicit Einsum equations without '...' are supported"
        ins, out = terms
        if len(ins) > 2 or any(len(set(t)) != len(t) for t in ins):
            return "Einsum with more than two operands or a repeated index"
        for k in node.dynamic:
            others = "".join(t for j, t in enumerate(ins) if j != k) + out
            if any(c not in others for c in ins[k]):
                return "an Einsum index summed within one operand"
        return None

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        return tuple(node.dynamic)

    def _equation(self, node: NodeView, k: int) -> tuple[str, list[int]]:
        """The equation of operand ``k``'s reverse step: ``r`` first, then the other
        operand (its input index in the list)."""
        ins, out = einsum_terms(node)  # type: ignore[misc]
        others = [j for j in range(len(ins)) if j != k]
        return ",".join([out, *(ins[j] for j in others)]) + "->" + ins[k], others

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        ins, out = einsum_terms(node)  # type: ignore[misc]
        ops = [_operand(node, xs, j) for j in range(len(ins))]
        return xp_of(xs[0]).einsum(",".join(ins) + "->" + out, *ops)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        xp = xp_of(r)
        out = []
        for k, x in zip(node.dynamic, xs, strict=True):
            eq, others = self._equation(node, k)
            ops = [xp.asarray(_operand(node, xs, j), dtype=r.dtype) for j in others]
            out.append(xp.einsum(eq, r, *ops).astype(x.dtype, copy=False))
        return out

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        out = []
        for k in node.dynamic:
            eq, others = self._equation(node, k)
            ops = [b.static(j) if j in node.static else b.act(xs[node.dynamic.index(j)])
                   for j in others]
            out.append(b.op("Einsum", [r, *ops], equation=eq))
        return out
