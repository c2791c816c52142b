"""Element-wise activations and the softmax family.

Each inverse is exact on the function's reachable range; a target outside it
is first clamped into the range (the closest reachable output), and where the
function is flat the current input is moved only as far as needed:

- Relu:       x* = t where t > 0, else min(x0, 0)
- LeakyRelu:  x* = t where t >= 0, else t / alpha
- PRelu:      x* = t where t >= 0, else t / slope (slope != 0), else min(x0, 0)
- Sigmoid:    x* = log(t / (1 - t)),  t clamped to [eps, 1 - eps]
- Tanh:       x* = artanh(t),         t clamped to [-1 + eps, 1 - eps]
- Clip:       x* = t inside (lo, hi); min(x0, lo) where t <= lo; max(x0, hi) where t >= hi
- Softmax:    x* = log t + c,  c per row so that mean(x*) = mean(x0) (shift is free)
- LogSoftmax: x* = t + c,      same shift

Reverse steps ``J^T r`` (NumPy and ONNX alike): Relu ``r [x0 > 0]``, LeakyRelu /
PRelu ``r`` or ``alpha r`` by the sign of ``x0``, Sigmoid ``r o0 (1 - o0)``, Tanh
``r (1 - o0^2)``, Clip ``r [lo < x0 < hi]``, Softmax ``o0 (r - sum(o0 r))``,
LogSoftmax ``r - exp(o0) sum(r)`` (sums along the axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

EPS = 1e-4


@register
class ReluRule(InverseRule):
    """``o = max(x, 0)``; ``x* = t`` where ``t > 0``, else ``min(x0, 0)``."""

    op_types = ("Relu",)
    elementwise = True
    sparse_reads = "output"  # o0 > 0 exactly where x0 > 0

    def slope(self, node: NodeView, x: Array) -> Array:
        return x > 0

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        return [(r * self.slope(node, xs[0])).astype(xs[0].dtype, copy=False)]

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        return None

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        return r * self.slope(node, _at(fwd, pos))

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        if o in b.premasked:
            return [r]  # masked by the MaxPool it feeds
        # Mul by a 0/1 mask: Where is slower on large maps
        mask = b.op("Greater", [b.act(xs[0]), b.const(0.0)])
        return [b.op("Mul", [r, b.as_float(mask)])]

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).maximum(xs[0], 0)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        return [xp.where(t > 0, t, xp.minimum(xs[0], 0)).astype(xs[0].dtype)]


@register
class LeakyReluRule(InverseRule):
    """``o = x`` if ``x >= 0`` else ``alpha x``; ``x* = t`` or ``t / alpha``."""

    op_types = ("LeakyRelu",)
    defaults = {"LeakyRelu": {"alpha": 0.01}}
    elementwise = True
    sparse_reads = "output"  # o0 >= 0 exactly where x0 >= 0 (alpha > 0)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        x, alpha = xs[0], node.attr("alpha")
        return xp_of(x).where(x >= 0, x, alpha * x)

    def slope(self, node: NodeView, x: Array) -> Array:
        return xp_of(x).where(x >= 0, 1.0, float(node.attr("alpha")))

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        return None if float(node.attr("alpha")) > 0 else "alpha <= 0"

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        o0 = _at(fwd, pos)
        return xp_of(r).where(o0 >= 0, r, float(node.attr("alpha")) * r)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        mask = b.op("GreaterOrEqual", [b.act(xs[0]), b.const(0.0)])
        alpha = float(node.attr("alpha"))
        return [b.op("Where", [mask, r, b.op("Mul", [r, b.const(alpha)])])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp, alpha = xp_of(t), node.attr("alpha")
        if alpha <= 0:
            return [xp.where(t > 0, t, xp.minimum(xs[0], 0)).astype(xs[0].dtype)]
        return [xp.where(t >= 0, t, t / alpha).astype(xs[0].dtype)]


@register
class PReluRule(InverseRule):
    """``o = x`` if ``x >= 0`` else ``slope x`` (slope a constant, broadcast)."""

    op_types = ("PRelu",)
    elementwise = True

    def check(self, node: NodeView) -> str | None:
        return None if 1 in node.static else "slope must be constant"

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        xp = xp_of(xs[0])
        slope = xp.asarray(node.const(1), dtype=xs[0].dtype)
        return xp.where(xs[0] >= 0, xs[0], slope * xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        return xp.where(x >= 0, 1.0, xp.asarray(node.const(1), dtype=x.dtype))

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        mask = b.op("GreaterOrEqual", [b.act(xs[0]), b.const(0.0)])
        return [b.op("Where", [mask, r, b.op("Mul", [r, b.static(1)])])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        slope = xp.broadcast_to(xp.asarray(node.const(1), dtype=t.dtype), t.shape)
        safe = xp.where(slope > 0, slope, 1)
        neg = xp.where(slope > 0, t / safe, xp.minimum(xs[0], 0))
        return [xp.where(t >= 0, t, neg).astype(xs[0].dtype)]


@register
class SigmoidRule(InverseRule):
    """``o = 1 / (1 + e^-x)``; ``x* = logit(clamp(t, eps, 1 - eps))``."""

    op_types = ("Sigmoid",)
    elementwise = True

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        xp = xp_of(xs[0])
        return 1.0 / (1.0 + xp.exp(-xs[0]))

    def slope(self, node: NodeView, x: Array) -> Array:
        s = self.forward(node, [x])
        return s * (1.0 - s)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        y = b.act(o)
        return [b.op("Mul", [r, b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        tc = xp.clip(t, EPS, 1 - EPS)
        return [xp.log(tc / (1 - tc)).astype(xs[0].dtype)]


@register
class TanhRule(InverseRule):
    """``o = tanh x``; ``x* = artanh(clamp(t, -1 + eps, 1 - eps))``."""

    op_types = ("Tanh",)
    elementwise = True

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).tanh(xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        return 1.0 - xp_of(x).tanh(x) ** 2

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        y = b.act(o)
        return [b.op("Mul", [r, b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        return [xp.arctanh(xp.clip(t, -1 + EPS, 1 - EPS)).astype(xs[0].dtype)]


def clip_bounds(node: NodeView) -> tuple[float, float]:
    """Clip's ``(lo, hi)``: attributes before opset 11, constant inputs after."""
    lo = node.attr("min")
    hi = node.attr("max")
    if 1 in node.static and node.static[1].size:
        lo = float(np.asarray(node.static[1]).reshape(-1)[0])
    if 2 in node.static and node.static[2].size:
        hi = float(np.asarray(node.static[2]).reshape(-1)[0])
    return float(lo), float(hi)


@register
class ClipRule(InverseRule):
    """``o = min(max(x, lo), hi)``; exact inside, one-sided where saturated."""

    op_types = ("Clip",)
    defaults = {"Clip": {"min": -np.inf, "max": np.inf}}  # attributes before opset 11
    elementwise = True

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        lo, hi = clip_bounds(node)
        return xp_of(xs[0]).clip(xs[0], lo, hi)

    def slope(self, node: NodeView, x: Array) -> Array:
        lo, hi = clip_bounds(node)
        return (x > lo) & (x < hi)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.op("Mul", [r, b.inside(b.act(xs[0]), *clip_bounds(node))])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp, x0 = xp_of(t), xs[0]
        lo, hi = clip_bounds(node)
        out = xp.where(t <= lo, xp.minimum(x0, lo), t)
        out = xp.where(t >= hi, xp.maximum(x0, hi), out)
        return [out.astype(x0.dtype)]


def _softmax_axis(node: NodeView, ndim: int) -> int:
    """Softmax's axis: ONNX's default is -1 from opset 13, 1 before."""
    default = -1 if node.opset >= 13 else 1
    axis = int(node.attr("axis", default))
    return axis % ndim


@register
class SoftmaxRule(InverseRule):
    """Softmax / LogSoftmax over ``axis``. Before opset 13 the input is coerced to
    2-D at ``axis``; targets use the same view. Inverse: ``log t`` (or ``t``) plus
    the free per-row shift that keeps the row mean of ``x0``."""

    op_types = ("Softmax", "LogSoftmax")

    def _rows(self, node: NodeView, x: Array) -> tuple[Array, int]:
        axis = _softmax_axis(node, x.ndim)
        if node.opset < 13:
            return x.reshape(int(np.prod(x.shape[:axis])), -1), 1
        return x, axis

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        xp = xp_of(xs[0])
        x, axis = self._rows(node, xs[0])
        z = x - x.max(axis=axis, keepdims=True)
        logp = z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
        out = logp if node.op_type == "LogSoftmax" else xp.exp(logp)
        return out.reshape(xs[0].shape)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """Softmax ``p (r - sum(p r))``; LogSoftmax ``r - p sum(r)`` (rows along axis)."""
        xp = xp_of(r)
        x, axis = self._rows(node, xs[0])
        rr, _ = self._rows(node, r)
        z = x.astype(xp.float64)
        p = xp.exp(z - z.max(axis=axis, keepdims=True))
        p /= p.sum(axis=axis, keepdims=True)
        if node.op_type == "Softmax":
            d = p * (rr - (p * rr).sum(axis=axis, keepdims=True))
        else:
            d = rr - p * rr.sum(axis=axis, keepdims=True)
        return [d.reshape(xs[0].shape).astype(xs[0].dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        rank = len(b.shape(xs[0]))
        axis = _softmax_axis(node, rank)
        y = b.act(o)
        coerced = node.opset < 13 and axis != rank - 1  # rows span the axes from axis on
        if coerced:  # as 2-D rows (Flatten at axis), then back to the input's shape
            r, y, axis = b.op("Flatten", [r], axis=axis), b.op("Flatten", [y], axis=axis), 1
        axes = b.const([axis], np.int64)
        if node.op_type == "Softmax":
            dot = b.op("ReduceSum", [b.op("Mul", [r, y]), axes], keepdims=1)
            d = b.op("Mul", [y, b.op("Sub", [r, dot])])
        else:
            total = b.op("ReduceSum", [r, axes], keepdims=1)
            d = b.op("Sub", [r, b.op("Mul", [b.op("Exp", [y]), total])])
        return [b.op("Reshape", [d, b.shape_of(xs[0])]) if coerced else d]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        tr, axis = self._rows(node, t)
        x0, _ = self._rows(node, xs[0])
        logits = xp.log(xp.clip(tr, 1e-12, None)) if node.op_type == "Softmax" else tr
        shift = x0.mean(axis=axis, keepdims=True) - logits.mean(axis=axis, keepdims=True)
        return [(logits + shift).reshape(xs[0].shape).astype(xs[0].dtype)]


def _at(fwd: Array | None, pos: np.ndarray) -> Array:
    """``fwd`` (N, C, H, W) at the flat spatial positions ``pos``: (N, C, len(pos))."""
    assert fwd is not None
    xp = xp_of(fwd)
    return xp.take(fwd.reshape(*fwd.shape[:2], -1), xp.asarray(pos), axis=2)
