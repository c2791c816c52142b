"""Affine element-wise ops: Add, Sub, Mul, Div, BatchNormalization; and
LayerNormalization.

With one constant operand ``c`` the inverse is exact:

- Add: x* = t - c          Sub: x* = t + c (x - c) or c - t (c - x)
- Mul: x* = t / c          Div: x* = t * c (x / c)
- BatchNormalization (inference): o = g (x - m) / sqrt(v + eps) + b,
  x* = (t - b) sqrt(v + eps) / g + m   (channels with g = 0 keep x0)

- LayerNormalization over the trailing axes from ``axis``:
  o = g (x - m(x)) / s(x) + b with s = sqrt(var + eps); keeping the row mean m0
  and scale s0 of x0, x* = m0 + s0 (t - b) / g (entries with g = 0 keep x0). For a
  reachable t this is exact; a row whose output would end up farther from t
  than its current output keeps x0.

With two activations (residual Add, Sub) the residual r = t - o0 is split
evenly, the minimum-norm solution: x1* = x1 + r/2, x2* = x2 +- r/2 (summed over
broadcast axes when an operand was broadcast). A product or quotient of two
activations (squeeze-excitation gates, attention) and a constant divided by an
activation have no inverse here, only their vjp (the default schedule).

Reverse steps ``J^T r`` (NumPy and ONNX alike): Add ``r``, Sub ``r`` / ``-r``,
Mul ``a b``: ``b r`` and ``a r``, Div ``a / b``: ``r / b`` and ``-r a / b^2``
(summed over broadcast axes); BatchNormalization
``r g / sqrt(v + eps)`` per channel; LayerNormalization
``(u - mean(u) - z mean(u z)) / s`` with ``u = g r`` over the normalized axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, register, unbroadcast, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder


def _operand(node: NodeView, xs: Sequence[Array], index: int) -> Array:
    """Input ``index``: from ``xs`` (dynamic inputs, in order) or the constants."""
    if index in node.static:
        return xp_of(xs[0]).asarray(node.static[index], dtype=xs[0].dtype)
    return xs[node.dynamic.index(index)]


def _split_residual(r: Array, xs: Sequence[Array], sign: float) -> list[Array]:
    """Minimum-norm ``(d0, d1)`` with ``d0 + sign * d1 = r`` under broadcasting.

    With ``x0`` full-size and ``x1`` broadcast over groups of ``m`` outputs:
    ``d1 = sign * sum_group(r) / (m + 1)`` and ``d0 = r - broadcast(sign * d1)``;
    ``m = 1`` (equal shapes) gives half each. If neither operand is full-size,
    each takes the mean of its share (no overshoot, not minimum-norm).
    """
    xp = xp_of(r)
    full = tuple(r.shape)
    order = (0, 1) if tuple(xs[0].shape) == full else (1, 0)
    big, small = order
    if tuple(xs[big].shape) != full:
        half = r / 2
        d0 = unbroadcast(half, tuple(xs[0].shape), xp.mean)
        d1 = sign * unbroadcast(half, tuple(xs[1].shape), xp.mean)
        return [xs[0] + d0.astype(xs[0].dtype), xs[1] + d1.astype(xs[1].dtype)]
    m = r.size // max(xs[small].size, 1)
    # d_small before its sign
    share = unbroadcast(r, tuple(xs[small].shape), xp.sum) / (m + 1)
    d_big = r - xp.broadcast_to(share, full)
    deltas = {
        big: d_big if big == 0 else sign * d_big,
        small: share if small == 0 else sign * share,
    }
    return [xs[i] + deltas[i].astype(xs[i].dtype) for i in (0, 1)]


@register
class BinaryAffineRule(InverseRule):
    """Add / Sub / Mul / Div where at least one operand is an activation."""

    op_types = ("Add", "Sub", "Mul", "Div")

    def check(self, node: NodeView) -> str | None:
        return None  # every form has its vjp

    def check_inverse(self, node: NodeView) -> str | None:
        if len(node.dynamic) == 2 and node.op_type in ("Mul", "Div"):
            return f"{node.op_type} of two activations is not invertible here"
        if node.op_type == "Div" and node.dynamic == (1,):
            return "Div of a constant by an activation is not invertible here"
        return None

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        return tuple(node.dynamic)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        a, b = _operand(node, xs, 0), _operand(node, xs, 1)
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a / b}[node.op_type]

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """``J^T r``: both operands of a residual Add get ``r`` (Sub: ``-r`` for the
        second); Mul ``a b``: ``r b`` to ``a`` and ``r a`` to ``b``; Div ``a / b``:
        ``r / b`` to ``a``, ``-r a / b^2`` to ``b`` (each operand a constant or an
        activation); summed over the axes an operand was broadcast along."""
        xp = xp_of(r)
        op = node.op_type
        out = []
        for index, x0 in zip(node.dynamic, xs, strict=True):
            if op in ("Add", "Sub"):
                d = -r if (op == "Sub" and index == 1) else r
            elif op == "Mul":
                d = r * xp.asarray(_operand(node, xs, 1 - index), dtype=r.dtype)
            elif index == 0:
                d = r / xp.asarray(_operand(node, xs, 1), dtype=r.dtype)
            else:
                a = xp.asarray(_operand(node, xs, 0), dtype=r.dtype)
                d = -r * a / xp.asarray(x0, dtype=r.dtype) ** 2
            out.append(unbroadcast(d, tuple(x0.shape), xp.sum).astype(x0.dtype, copy=False))
        return out

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        """As :meth:`vjp`; and Div of a constant by an activation ``-r o0 / x1``."""
        op = node.op_type
        out_shape = b.shape(o)

        def operand(index: int) -> str:
            if index in node.static:
                return b.static(index)
            return b.act(xs[node.dynamic.index(index)])

        deltas = []
        for index, name in zip(node.dynamic, xs, strict=True):
            if op == "Add" or (op == "Sub" and index == 0):
                d = r
            elif op == "Sub":
                d = b.op("Neg", [r])
            elif op == "Mul":
                d = b.op("Mul", [r, operand(1 - index)])
            elif index == 0:
                d = b.op("Div", [r, operand(1)])
            else:  # d(a / x)/dx = -(a / x) / x
                d = b.op("Neg", [b.op("Div", [b.op("Mul", [r, b.act(o)]), operand(1)])])
            deltas.append(b.unbroadcast(d, out_shape, b.shape(name)))
        return deltas

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        op = node.op_type
        if len(node.dynamic) == 2:  # Add / Sub of two activations: minimum-norm split
            return _split_residual(t - o0, xs, -1.0 if op == "Sub" else 1.0)
        index = node.dynamic[0]
        x0 = xs[0]
        c = xp.asarray(node.static[1 - index], dtype=t.dtype)
        if op == "Add":
            x = t - c
        elif op == "Sub":
            x = t + c if index == 0 else c - t
        elif op == "Mul":
            safe = xp.where(xp.abs(c) > 1e-12, c, 1)
            x = xp.where(xp.abs(c) > 1e-12, t / safe, x0)
        else:  # Div: x / c
            x = t * c
        if x.shape != x0.shape:  # x was broadcast against c: average the targets
            x = x0 + unbroadcast(x - x0, tuple(x0.shape), xp.mean)
        return [x.astype(x0.dtype)]


@register
class BatchNormRule(InverseRule):
    """Inference BatchNormalization: exact per-channel affine inverse."""

    op_types = ("BatchNormalization",)
    defaults = {"BatchNormalization": {"epsilon": 1e-5, "training_mode": 0}}

    def check(self, node: NodeView) -> str | None:
        if not all(i in node.static for i in (1, 2, 3, 4)):
            return "scale, bias, mean and variance must be constant"
        return super().check(node)

    def _affine(self, node: NodeView, x: Array) -> tuple[Array, Array]:
        xp = xp_of(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        g, b, m, v = (xp.asarray(node.const(i), dtype=xp.float64) for i in (1, 2, 3, 4))
        scale = g / xp.sqrt(v + node.attr("epsilon"))
        return scale.reshape(shape), (b - m * scale).reshape(shape)

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        return "training mode" if node.attr("training_mode") else None

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        scale, _ = self._affine(node, r)  # r: (N, C, P), scale: (1, C, 1)
        return r * scale.astype(r.dtype)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        rank = len(b.shape(xs[0]))
        eps = b.const(float(node.attr("epsilon")))
        scale = b.op("Div", [b.static(1), b.op("Sqrt", [b.op("Add", [b.static(4), eps])])])
        scale = b.op("Reshape", [scale, b.const([-1] + [1] * (rank - 2), np.int64)])
        return [b.op("Mul", [r, scale])]

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        scale, shift = self._affine(node, xs[0])
        return (xs[0] * scale + shift).astype(xs[0].dtype)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        scale, _ = self._affine(node, r)
        return [(r * scale).astype(xs[0].dtype, copy=False)]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        scale, shift = self._affine(node, t)
        ok = xp.abs(scale) > 1e-12
        x = xp.where(ok, (t - shift) / xp.where(ok, scale, 1), xs[0])
        return [x.astype(xs[0].dtype)]


@register
class LayerNormRule(InverseRule):
    """LayerNormalization (opset 17): keep each row's mean and scale, invert the affine part."""

    op_types = ("LayerNormalization",)
    defaults = {"LayerNormalization": {"axis": -1, "epsilon": 1e-5}}

    def check(self, node: NodeView) -> str | None:
        if 1 not in node.static or (node.has_input(2) and 2 not in node.static):
            return "scale and bias must be constant"
        return super().check(node)

    def _parts(self, node: NodeView, x: Array) -> tuple[Array, Array, Array, Array]:
        """Normalized x, row mean, row scale, and (g, b) broadcast: (z, m, s, (g, b))."""
        xp = xp_of(x)
        axis = int(node.attr("axis")) % x.ndim
        axes = tuple(range(axis, x.ndim))
        x64 = x.astype(xp.float64)
        m = x64.mean(axis=axes, keepdims=True)
        s = xp.sqrt(((x64 - m) ** 2).mean(axis=axes, keepdims=True)
                    + float(node.attr("epsilon")))
        g = xp.asarray(node.const(1), dtype=xp.float64)
        b = xp.asarray(node.static[2], dtype=xp.float64) if 2 in node.static else xp.zeros(())
        return (x64 - m) / s, m, s, (g, b)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        z, _, _, (g, b) = self._parts(node, xs[0])
        return (z * g + b).astype(xs[0].dtype)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """``(u - mean(u) - z mean(u z)) / s`` with ``u = g r`` over the normalized axes."""
        z, _, s, (g, _) = self._parts(node, xs[0])
        axis = int(node.attr("axis")) % z.ndim
        axes = tuple(range(axis, z.ndim))
        u = r * g
        d = (u - u.mean(axis=axes, keepdims=True) - z * (u * z).mean(axis=axes, keepdims=True))
        return [(d / s).astype(xs[0].dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        rank = len(b.shape(xs[0]))
        axes = list(range(int(node.attr("axis")) % rank, rank))
        if 0 in axes:
            return None  # the batch axis stays symbolic

        def mean(v: str) -> str:
            return b.op("ReduceMean", [v], axes=axes, keepdims=1)

        x = b.act(xs[0])
        centered = b.op("Sub", [x, mean(x)])
        spread = b.op("Sqrt", [b.op("Add", [mean(b.op("Mul", [centered, centered])),
                                            b.const(float(node.attr("epsilon")))])])
        z = b.op("Div", [centered, spread])
        u = b.op("Mul", [r, b.static(1)])
        d = b.op("Sub", [b.op("Sub", [u, mean(u)]), b.op("Mul", [z, mean(b.op("Mul", [u, z]))])])
        return [b.op("Div", [d, spread])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp, x0 = xp_of(t), xs[0]
        z0, m, s, (g, b) = self._parts(node, x0)
        ok = xp.abs(g) > 1e-12
        u = xp.where(ok, (t.astype(xp.float64) - b) / xp.where(ok, g, 1.0), z0)
        x = (m + s * u).astype(x0.dtype)
        # keep x0 in rows where the proposal does not bring the output closer to t
        axis = int(node.attr("axis")) % x0.ndim
        axes = tuple(range(axis, x0.ndim))
        new_err = ((self.forward(node, [x]) - t) ** 2).sum(axis=axes, keepdims=True)
        old_err = ((o0 - t) ** 2).sum(axis=axes, keepdims=True)
        return [xp.where(new_err <= old_err, x, x0)]
