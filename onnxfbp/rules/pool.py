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

Reverse steps ``J^T r`` (NumPy and ONNX alike): MaxPool, GlobalMaxPool and
ReduceMax route each window's (group's) residual to its first maximum
(row-major, as onnxruntime's MaxPool indices); AveragePool spreads ``r / count``
over each window (ONNX: ``ConvTranspose`` with a ones kernel per channel);
GlobalAveragePool and ReduceMean ``r / count`` expanded to the input shape. At a
few input positions of a MaxPool with disjoint windows (:meth:`MaxPoolRule.sparse_vjp`):
a position gets its window's residual where it is the window's first maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of
from .linear import WINDOW_DEFAULTS, ConvGeometry, conv_geometry, transposed_conv, windows

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

POOL_DEFAULTS: dict[str, Any] = {**WINDOW_DEFAULTS, "ceil_mode": 0, "storage_order": 0,
                                 "count_include_pad": 0, "kernel_shape": []}
REDUCE_DEFAULTS: dict[str, Any] = {"axes": None, "keepdims": 1, "noop_with_empty_axes": 0}


def pool_geometry(node: NodeView, shape: tuple[int, ...]) -> ConvGeometry:
    """The window geometry of a 2-D pooling node on an input of ``shape``."""
    kernel = tuple(node.attr("kernel_shape"))
    return conv_geometry(
        node, (shape[2], shape[3]), (kernel[0], kernel[1]), bool(node.attr("ceil_mode"))
    )


def window_taps(
    g: ConvGeometry, grid: tuple[int, int], qi: np.ndarray, qj: np.ndarray
) -> np.ndarray:
    """The flat positions on the input ``grid`` of the windows ``(qi, qj)`` of a pool
    without dilation, (Q, kh * kw) in window order, clipped to the grid."""
    (kh, kw), (sh, sw), (h, w) = g.kernel, g.strides, grid
    rows = np.minimum((qi * sh)[:, None] + np.arange(kh), h - 1)  # Q, kh
    cols = np.minimum((qj * sw)[:, None] + np.arange(kw), w - 1)  # Q, kw
    return (rows[:, :, None] * w + cols[:, None, :]).reshape(len(qi), -1)


def first_max_at(x: Array, g: ConvGeometry, pos: np.ndarray) -> Array:
    """1 where the flat position ``pos`` of ``x``'s grid (N, C, H, W) is the first
    maximum of its window (disjoint windows, no dilation), per sample and channel:
    (N, C, len(pos)). One reduction per window, however many positions lie in it;
    the window's taps are gathered at once and reduced slice by slice (an
    ``argmax`` over windows of 4 took twice as long)."""
    xp = xp_of(x)
    (kh, kw), (sh, sw), (h, width) = g.kernel, g.strides, x.shape[2:]
    i, j = pos // width, pos % width
    qi, qj = i // sh, j // sw
    _, first_in, spread = np.unique(
        qi * (width + 1) + qj, return_index=True, return_inverse=True)
    taps = window_taps(g, (h, width), qi[first_in], qj[first_in]).T  # K, Q
    n, c = x.shape[:2]
    offsets = np.arange(c)[:, None, None] * (h * width) + taps  # C, K, Q
    values = xp.take(x.reshape(n, -1), xp.asarray(offsets.reshape(-1)), axis=1)
    values = values.reshape(n, c, *taps.shape)
    top = values[:, :, 0]
    for k in range(1, len(taps)):
        top = xp.maximum(top, values[:, :, k])
    first = xp.full(top.shape, len(taps) - 1, dtype=xp.int32)
    for k in reversed(range(len(taps) - 1)):
        first = xp.where(values[:, :, k] == top, k, first)
    first = xp.take(first, xp.asarray(spread.reshape(-1)), axis=2)  # N, C, P
    at = np.minimum(i - qi * sh, kh - 1) * kw + np.minimum(j - qj * sw, kw - 1)
    return (first == xp.asarray(at, dtype=xp.int32)).astype(x.dtype)


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
    defaults = {"MaxPool": POOL_DEFAULTS}
    sparse_reads = "input"

    def check(self, node: NodeView) -> str | None:
        if len(node.attr("kernel_shape")) != 2:
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

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        if len(x_shape) != 4 or int(node.attr("storage_order")):
            return "storage order"
        g = pool_geometry(node, x_shape)
        disjoint = (all(k <= s for k, s in zip(g.kernel, g.strides, strict=True))
                    and not any(g.pads) and tuple(g.dilations) == (1, 1))
        return None if disjoint else "overlapping, padded or dilated windows"

    def land(
        self, node: NodeView, grid: tuple[int, int], pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """A position lands on its window ``q = p // s``; it lands nowhere past the
        last whole window or between windows (kernel < stride)."""
        g = pool_geometry(node, (1, 1, *grid))
        (sh, sw), (oh, ow) = g.strides, g.out_size(*grid)
        i, j = pos // grid[1], pos % grid[1]
        qi, qj = i // sh, j // sw
        valid = (qi < oh) & (qj < ow) & (i - qi * sh < g.kernel[0]) & (j - qj * sw < g.kernel[1])
        return np.minimum(qi, oh - 1) * ow + np.minimum(qj, ow - 1), valid

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        assert fwd is not None
        xp = xp_of(r)
        valid = self.land(node, grid, pos)[1]
        g = pool_geometry(node, fwd.shape)
        return r * xp.asarray(valid, dtype=r.dtype) * first_max_at(fwd, g, pos)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        """``MaxPool`` indices of ``x0``, then ``MaxUnpool`` of ``r`` (``ScatterElements``,
        with ``add`` where windows overlap, where MaxUnpool is avoided); a Relu read
        only by the MaxPool is masked here, on the pooled grid."""
        x_shape = b.shape(xs[0])
        if len(x_shape) != 4 or int(node.attr("storage_order")):
            return None
        g = pool_geometry(node, x_shape)
        (kh, kw), (h, w) = g.kernel, x_shape[2:]
        oh, ow = b.shape(o)[2:]
        if b.relu_fed(xs[0]):
            # MaxPool(Relu(c)): the routed entry has c > 0 exactly when the window's max
            # o0 > 0, so the Relu's mask applies here, on the 4x smaller pooled grid.
            positive = b.op("Greater", [b.act(o), b.const(0.0)])
            r = b.op("Mul", [r, b.as_float(positive)])
            b.premasked.add(xs[0])
        _, indices = b.op_n(
            "MaxPool", [b.act(xs[0])], 2, kernel_shape=list(g.kernel), strides=list(g.strides),
            dilations=list(g.dilations), pads=list(g.pads),
            ceil_mode=int(node.attr("ceil_mode")),
        )
        disjoint = (all(k <= st for k, st in zip(g.kernel, g.strides, strict=True))
                    and not any(g.pads)
                    and (oh - 1) * g.strides[0] + kh <= h and (ow - 1) * g.strides[1] + kw <= w)
        if disjoint and "MaxUnpool" not in b.avoid:
            # Windows neither overlap nor leave the input: each entry gets one residual.
            return [b.op("MaxUnpool", [r, indices, b.shape_of(xs[0])],
                         kernel_shape=list(g.kernel), strides=list(g.strides))]
        # The indices count over the whole flattened tensor (batch and channels too).
        flat = b.const([-1], np.int64)
        zeros = b.zeros(b.op("Shape", [b.op("Reshape", [b.act(xs[0]), flat])]))
        routed = b.op(
            "ScatterElements",
            [zeros, b.op("Reshape", [indices, flat]), b.op("Reshape", [r, flat])],
            axis=0, **({} if disjoint else {"reduction": "add"}),
        )
        return [b.op("Reshape", [routed, b.shape_of(xs[0])])]

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
    defaults = {"AveragePool": POOL_DEFAULTS}
    linear = True

    def check(self, node: NodeView) -> str | None:
        if len(node.attr("kernel_shape")) != 2:
            return "only 2-D pooling is supported"
        return None

    def divisor(
        self, node: NodeView, shape: tuple[int, ...], g: ConvGeometry, xp: object
    ) -> Array:
        """Entries averaged per window: ``kh kw``, or (count_include_pad=0) the
        unpadded ones, (1, 1, oh, ow)."""
        ones = xp.ones((1, 1, shape[2], shape[3]), dtype=np.float64)  # type: ignore[attr-defined]
        if node.attr("count_include_pad"):
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

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        if len(x_shape) != 4:
            return None
        g = pool_geometry(node, x_shape)
        divisor = np.asarray(self.divisor(node, x_shape, g, np), dtype=np.float64)
        channels = x_shape[1]
        share = b.op("Mul", [r, b.const(1.0 / divisor)])
        ones = b.const(np.ones((channels, 1, *g.kernel)))
        return transposed_conv(b, share, ones, g, x_shape, b.shape(o), channels)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        x0, r, xp = xs[0], t - o0, xp_of(t)
        g = pool_geometry(node, x0.shape)
        vals = xp.ascontiguousarray(xp.broadcast_to(r[..., None, None], (*r.shape, *g.kernel)))
        spread = _scatter_windows(vals, x0.shape, g, "add")
        cover = _scatter_windows(xp.ones_like(vals), x0.shape, g, "add")
        return [(x0 + spread / xp.maximum(cover, 1)).astype(x0.dtype)]


def reduce_axes(node: NodeView, ndim: int) -> tuple[tuple[int, ...], bool]:
    """Reduced axes (sorted, non-negative) and keepdims of a global pool or a
    Reduce op (``axes`` an attribute, or an input from opset 18; none: all)."""
    if node.op_type.startswith("Global"):
        return tuple(range(2, ndim)), True
    axes = node.attr("axes")
    if axes is None and 1 in node.static and np.asarray(node.static[1]).size:
        axes = np.asarray(node.static[1]).ravel().tolist()
    keep = bool(node.attr("keepdims"))
    if not axes:
        return tuple(range(ndim)), keep
    return tuple(sorted(int(a) % ndim for a in axes)), keep


def _expand(y: Array, axes: tuple[int, ...], keep: bool) -> Array:
    """``y`` with the reduced ``axes`` restored as size 1 (where keepdims dropped them)."""
    if not keep:
        for a in axes:
            y = xp_of(y).expand_dims(y, a)
    return y


class _Reduce(InverseRule):
    """Shared by the reductions: defaults and the ``noop_with_empty_axes`` check."""

    def check(self, node: NodeView) -> str | None:
        if node.op_type.startswith("Reduce") and node.attr("noop_with_empty_axes"):
            return "noop_with_empty_axes is not supported"
        return super().check(node)


@register
class MeanReduceRule(_Reduce):
    """GlobalAveragePool and ReduceMean: ``x* = x0 + broadcast(t - o0)``."""

    op_types = ("GlobalAveragePool", "ReduceMean")
    defaults = {"ReduceMean": REDUCE_DEFAULTS}
    linear = True

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return self.apply_linear(node, xs[0])

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        axes, keep = reduce_axes(node, x.ndim)
        return x.mean(axis=axes, keepdims=keep)

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        axes, keep = reduce_axes(node, len(x_shape))
        count = int(np.prod([x_shape[a] for a in axes]))
        return xp_of(y).broadcast_to(_expand(y, axes, keep) / count, x_shape)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        axes, _ = reduce_axes(node, len(x_shape))
        kept = [1 if i in axes else (-1 if i == 0 else size) for i, size in enumerate(x_shape)]
        count = int(np.prod([x_shape[i] for i in axes]))
        spread = b.op("Reshape", [r, b.const(kept, np.int64)])  # restores dropped axes
        return [b.op("Expand", [b.op("Mul", [spread, b.const(1.0 / count)]),
                                b.shape_of(xs[0])])]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        axes, keep = reduce_axes(node, xs[0].ndim)
        return [(xs[0] + _expand(t - o0, axes, keep)).astype(xs[0].dtype)]


def _groups(x0: Array, axes: tuple[int, ...]) -> tuple[Array, list[int], tuple[int, ...]]:
    """``x0`` with the reduced axes moved last and flattened: (rest..., group), the
    permutation and the moved shape (for :func:`_ungroup`)."""
    rest = [a for a in range(x0.ndim) if a not in axes]
    perm = rest + list(axes)
    moved = x0.transpose(perm)
    return moved.reshape(*moved.shape[: len(rest)], -1), perm, tuple(moved.shape)


def _ungroup(v: Array, perm: list[int], moved: tuple[int, ...]) -> Array:
    return v.reshape(moved).transpose(np.argsort(perm).tolist())


@register
class MaxReduceRule(_Reduce):
    """GlobalMaxPool and ReduceMax: the arg-max entry of each reduced group takes the
    target, every other entry becomes ``min(x0, t)``; exact: ``f(x*) = t``."""

    op_types = ("GlobalMaxPool", "ReduceMax")
    defaults = {"ReduceMax": REDUCE_DEFAULTS}

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        axes, keep = reduce_axes(node, xs[0].ndim)
        return xs[0].max(axis=axes, keepdims=keep)

    def _first(self, node: NodeView, x0: Array, t: Array) -> tuple[Array, ...]:
        """Per group: the first maximum (one-hot), ``t`` as a column, and the layout."""
        xp = xp_of(x0)
        axes, keep = reduce_axes(node, x0.ndim)
        flat, perm, moved = _groups(x0, axes)
        tf = _expand(t, axes, keep).transpose(perm).reshape(*flat.shape[:-1], 1)
        first = flat.argmax(axis=-1)[..., None] == xp.arange(flat.shape[-1])
        return flat, first, tf, perm, moved

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """Each group's residual on its first maximum."""
        flat, first, rf, perm, moved = self._first(node, xs[0], r)
        d = xp_of(r).where(first, rf, 0).astype(xs[0].dtype)
        return [_ungroup(d, perm, moved)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        """The reduced axes moved last and flattened, ``ArgMax``, ``ScatterElements``,
        moved back."""
        rank = len(b.shape(xs[0]))
        axes, keep = reduce_axes(node, rank)
        if 0 in axes:
            return None  # the batch axis stays symbolic
        rest = [a for a in range(rank) if a not in axes]
        perm = rest + list(axes)
        moved = b.op("Transpose", [b.act(xs[0])], perm=perm)
        flat = b.op("Reshape", [moved, b.const([0] * len(rest) + [-1], np.int64)])
        first = b.op("ArgMax", [flat], axis=-1, keepdims=1)
        r_rows = b.op("Transpose", [r], perm=perm) if keep else r
        r_rows = b.op("Reshape", [r_rows, b.const([0] * len(rest) + [1], np.int64)])
        zeros = b.zeros(b.op("Shape", [flat]))
        routed = b.op("ScatterElements", [zeros, first, r_rows], axis=-1)
        back = b.op("Reshape", [routed, b.op("Shape", [moved])])
        return [b.op("Transpose", [back], perm=np.argsort(perm).tolist())]

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        x0 = xs[0]
        flat, first, tf, perm, moved = self._first(node, x0, t.astype(x0.dtype))
        new = xp_of(t).where(first, tf, xp_of(t).minimum(flat, tf))
        return [_ungroup(new, perm, moved).astype(x0.dtype)]
