"""Pooling and reductions: MaxPool, AveragePool, GlobalAveragePool, ReduceMean,
GlobalMaxPool, ReduceMax.

- MaxPool: each window's arg-max entry takes the window's target (averaged if
  windows overlap); every other entry becomes ``min(x0, t)`` so that it does
  not exceed the target maximum.
- AveragePool (windows of k entries): the minimum-norm input change that moves
  a window mean by ``r`` adds ``r`` to each of its entries; overlapping windows
  average their contributions.
- GlobalAveragePool / ReduceMean: ``x* = x0 + broadcast(r)`` (minimum norm).
- GlobalMaxPool / ReduceMax: the group's (first) arg-max takes ``t``, the other
  entries ``min(x0, t)``; the output is then exactly ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of
from .linear import ConvGeometry, conv_geometry, windows


def pool_geometry(node: NodeView, shape: tuple[int, ...]) -> ConvGeometry:
    """The window geometry of a 2-D pooling node on an input of ``shape``."""
    kernel = tuple(node.attr("kernel_shape"))
    return conv_geometry(
        node, (shape[2], shape[3]), (kernel[0], kernel[1]), bool(node.attr("ceil_mode", 0))
    )


def _scatter_windows(values: Array, x_shape: tuple[int, ...], g: ConvGeometry, op: str) -> Array:
    """Put per-window values (N, C, oh, ow, kh, kw) back on the padded input grid,
    combined by ``op`` (``add`` or ``min``); returns the unpadded grid."""
    xp = xp_of(values)
    n, c, h, w = x_shape
    pt, pl, pb, pr = g.pads
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    oh, ow = values.shape[2:4]
    fill = 0.0 if op == "add" else np.inf
    out = xp.full((n, c, h + pt + pb, w + pl + pr), fill, dtype=values.dtype)
    for i in range(kh):
        for j in range(kw):
            sl = (slice(None), slice(None), slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
                  slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))
            if op == "add":
                out[sl] += values[..., i, j]
            else:
                out[sl] = xp.minimum(out[sl], values[..., i, j])
    return out[:, :, pt : pt + h, pl : pl + w]


def _tiled_maxpool_inverse(t: Array, x0: Array, kh: int, kw: int) -> Array:
    """MaxPool inverse for non-overlapping windows (stride = kernel, no padding):
    the same rule, computed on a (N, C, oh, ow, kh*kw) view without scatters."""
    xp = xp_of(t)
    n, c, h, w = x0.shape
    oh, ow = t.shape[2], t.shape[3]
    core = x0[:, :, : oh * kh, : ow * kw].reshape(n, c, oh, kh, ow, kw)
    flat = core.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, kh * kw)
    arg = flat.argmax(axis=-1)
    onehot = arg[..., None] == xp.arange(kh * kw)
    tt = t[..., None].astype(x0.dtype)
    new = xp.where(onehot, tt, xp.minimum(flat, tt))
    new = new.reshape(n, c, oh, ow, kh, kw).transpose(0, 1, 2, 4, 3, 5)
    out = x0.copy()
    out[:, :, : oh * kh, : ow * kw] = new.reshape(n, c, oh * kh, ow * kw)
    return out


@register
class MaxPoolRule(InverseRule):
    """2-D MaxPool: arg-max entries take the target, others ``min(x0, t)``."""

    op_types = ("MaxPool",)

    def check(self, node: NodeView) -> str | None:
        if len(node.attr("kernel_shape", [])) != 2:
            return "only 2-D pooling is supported"
        return None

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        g = pool_geometry(node, xs[0].shape)
        return windows(xs[0], g, -np.inf).max(axis=(4, 5))

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """Each window's residual goes to its first maximal entry (row-major, as
        onnxruntime's MaxPool indices and backprop frameworks choose among ties);
        overlapping windows add up."""
        x0 = xs[0]
        xp = xp_of(r)
        g = pool_geometry(node, x0.shape)
        kh, kw = g.kernel
        n, c, h, w = x0.shape
        oh, ow = r.shape[2], r.shape[3]
        tiled = g.strides == g.kernel and g.dilations == (1, 1) and not any(g.pads)
        if not tiled or oh * kh > h or ow * kw > w:
            win = windows(x0, g, -np.inf)
            flat = win.reshape(*win.shape[:4], kh * kw)
            onehot = (flat.argmax(axis=-1)[..., None] == xp.arange(kh * kw)).reshape(win.shape)
            routed = xp.where(onehot, r[..., None, None], 0).astype(r.dtype)
            return [_scatter_windows(routed, x0.shape, g, "add").astype(x0.dtype, copy=False)]
        # Tiled windows, one strided tap at a time in row-major order: a tap takes the
        # residual where it holds the maximum and no earlier tap of its window did.
        out = xp.zeros_like(x0)
        taken = xp.zeros(r.shape, dtype=bool)
        for i in range(kh):
            for j in range(kw):
                hit = x0[:, :, i : oh * kh : kh, j : ow * kw : kw] == o0
                hit &= ~taken
                taken |= hit
                out[:, :, i : oh * kh : kh, j : ow * kw : kw] = hit * r
        return [out]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        x0 = xs[0]
        g = pool_geometry(node, x0.shape)
        kh, kw = g.kernel
        if g.strides == g.kernel and g.dilations == (1, 1) and not any(g.pads):
            return [_tiled_maxpool_inverse(t, x0, kh, kw)]
        win = windows(x0, g, -np.inf)
        flat = win.reshape(*win.shape[:4], kh * kw)
        arg = flat.argmax(axis=-1)
        onehot = (arg[..., None] == xp.arange(kh * kw)).reshape(win.shape)
        tw = xp.broadcast_to(t[..., None, None], win.shape)
        sums = _scatter_windows(xp.where(onehot, tw, 0).astype(t.dtype), x0.shape, g, "add")
        counts = _scatter_windows(onehot.astype(t.dtype), x0.shape, g, "add")
        caps = _scatter_windows(xp.ascontiguousarray(tw), x0.shape, g, "min")
        rest = xp.minimum(x0, caps)
        # An entry shared by overlapping windows may not exceed any of their targets.
        out = xp.where(counts > 0, xp.minimum(sums / xp.maximum(counts, 1), caps), rest)
        return [out.astype(x0.dtype)]


@register
class AveragePoolRule(InverseRule):
    """2-D AveragePool; linear, so the adjoint identity is checked too."""

    op_types = ("AveragePool",)
    linear = True

    def check(self, node: NodeView) -> str | None:
        if len(node.attr("kernel_shape", [])) != 2:
            return "only 2-D pooling is supported"
        return None

    def divisor(
        self, node: NodeView, shape: tuple[int, ...], g: ConvGeometry, xp: object
    ) -> Array:
        """Entries averaged per window: ``kh kw``, or (count_include_pad=0) the
        unpadded ones, (1, 1, oh, ow)."""
        ones = xp.ones((1, 1, shape[2], shape[3]), dtype=np.float64)  # type: ignore[attr-defined]
        if node.attr("count_include_pad", 0):
            return float(g.kernel[0] * g.kernel[1])
        return windows(ones, g, 0.0).sum(axis=(4, 5))

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return self.apply_linear(node, xs[0])

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        g = pool_geometry(node, x.shape)
        div = self.divisor(node, x.shape, g, xp)
        return (windows(x, g, 0.0).sum(axis=(4, 5)) / div).astype(x.dtype)

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        xp = xp_of(y)
        g = pool_geometry(node, x_shape)
        div = self.divisor(node, x_shape, g, xp)
        vals = xp.broadcast_to((y / div)[..., None, None], (*y.shape, *g.kernel))
        return _scatter_windows(xp.ascontiguousarray(vals).astype(y.dtype), x_shape, g, "add")

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        x0 = xs[0]
        g = pool_geometry(node, x0.shape)
        r = t - o0
        vals = xp.ascontiguousarray(xp.broadcast_to(r[..., None, None], (*r.shape, *g.kernel)))
        spread = _scatter_windows(vals, x0.shape, g, "add")
        cover = _scatter_windows(xp.ones_like(vals), x0.shape, g, "add")
        return [(x0 + spread / xp.maximum(cover, 1)).astype(x0.dtype)]


def _reduce_axes(node: NodeView, ndim: int) -> tuple[int, ...]:
    if node.op_type == "GlobalAveragePool":
        return tuple(range(2, ndim))
    axes = node.attr("axes")
    if axes is None and 1 in node.static:
        axes = [int(a) for a in np.asarray(node.static[1]).ravel()]
    if axes is None:
        return tuple(range(ndim))
    return tuple(sorted(int(a) % ndim for a in axes))


@register
class MeanReduceRule(InverseRule):
    """GlobalAveragePool and ReduceMean: ``x* = x0 + broadcast(t - o0)``."""

    op_types = ("GlobalAveragePool", "ReduceMean")
    linear = True

    def check(self, node: NodeView) -> str | None:
        if node.op_type == "ReduceMean" and node.attr("noop_with_empty_axes", 0):
            return "noop_with_empty_axes is not supported"
        return None

    def _keep(self, node: NodeView) -> bool:
        return node.op_type == "GlobalAveragePool" or bool(node.attr("keepdims", 1))

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return self.apply_linear(node, xs[0])

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        return x.mean(axis=_reduce_axes(node, x.ndim), keepdims=self._keep(node))

    def _expand(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        axes = _reduce_axes(node, len(x_shape))
        if not self._keep(node):
            for a in axes:
                y = xp_of(y).expand_dims(y, a)
        return y

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        axes = _reduce_axes(node, len(x_shape))
        count = int(np.prod([x_shape[a] for a in axes]))
        y = self._expand(node, y, x_shape)
        return xp_of(y).broadcast_to(y / count, x_shape)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        r = self._expand(node, t - o0, tuple(xs[0].shape))
        return [(xs[0] + r).astype(xs[0].dtype)]


def max_axes(node: NodeView, ndim: int) -> tuple[tuple[int, ...], bool]:
    """Reduced axes and keepdims of GlobalMaxPool / ReduceMax."""
    if node.op_type == "GlobalMaxPool":
        return tuple(range(2, ndim)), True
    axes = node.attr("axes")
    if axes is None and 1 in node.static and np.asarray(node.static[1]).size:
        axes = np.asarray(node.static[1]).ravel().tolist()
    keep = bool(node.attr("keepdims", 1))
    if not axes:
        return tuple(range(ndim)), keep
    return tuple(sorted(int(a) % ndim for a in axes)), keep


@register
class MaxReduceRule(InverseRule):
    """GlobalMaxPool and ReduceMax: the arg-max entry of each reduced group takes the
    target, every other entry becomes ``min(x0, t)``; exact: ``f(x*) = t``."""

    op_types = ("GlobalMaxPool", "ReduceMax")

    def check(self, node: NodeView) -> str | None:
        if node.op_type == "ReduceMax" and node.attr("noop_with_empty_axes", 0):
            return "noop_with_empty_axes is not supported"
        return super().check(node)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        axes, keep = max_axes(node, xs[0].ndim)
        return xs[0].max(axis=axes, keepdims=keep)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp, x0 = xp_of(t), xs[0]
        axes, keep = max_axes(node, x0.ndim)
        if not keep:
            for a in axes:
                t = xp.expand_dims(t, a)
        rest = [a for a in range(x0.ndim) if a not in axes]
        perm = rest + list(axes)
        moved = x0.transpose(perm)
        lead = moved.shape[: len(rest)]
        flat = moved.reshape(*lead, -1)
        tf = t.transpose(perm).reshape(*lead, 1).astype(x0.dtype)
        first = flat.argmax(axis=-1)[..., None] == xp.arange(flat.shape[-1])
        new = xp.where(first, tf, xp.minimum(flat, tf)).reshape(moved.shape)
        return [new.transpose(np.argsort(perm).tolist()).astype(x0.dtype)]
