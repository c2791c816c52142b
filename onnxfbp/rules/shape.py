"""Index maps: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Identity, Dropout,
Concat, Pad, Slice, Gather (constant indices).

They move entries without changing them, so the inverse is exact:
``x* = P^-1 t`` (reshape back, inverse permutation, split along the concat
axis). Each is linear with ``P^T = P^-1``.

Pad, Slice and Gather copy some input entries (Pad also adds constants, Slice
drops entries, edge/reflect/wrap Pad and Gather may copy one entry several
times). With ``P`` the 0/1 selection matrix, the least-squares inverse is

    x*_i = mean of t over the output copies of x_i,   x*_i = x0_i if x_i has none

(constant Pad: the target is cropped; Slice: dropped entries keep ``x0``). It is
computed from the *index map* (the op applied to ``arange``, constants as -1);
the adjoint of the linear part is the scatter-add ``P^T y``. Slice and constant
Pad copy each entry at most once and use slices instead of an index map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of


@register
class ReshapeLikeRule(InverseRule):
    """Reshape / Flatten / Squeeze / Unsqueeze / Identity / Dropout (inference):
    ``x* = reshape(t, x0.shape)``."""

    op_types = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")
    linear = True

    def check(self, node: NodeView) -> str | None:
        return None  # shape inputs may be computed at run time; only data flows back

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        x = xs[0]
        op = node.op_type
        if op == "Reshape":
            shape = [int(s) for s in np.asarray(node.const(1)).ravel()]
            if not node.attr("allowzero", 0):
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        if op == "Flatten":
            axis = int(node.attr("axis", 1)) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op in ("Squeeze", "Unsqueeze"):
            axes = node.attr("axes")
            if axes is None and 1 in node.static:
                axes = np.asarray(node.static[1]).ravel().tolist()
            if op == "Squeeze":
                axes = [i for i, s in enumerate(x.shape) if s == 1] if axes is None else axes
                return xp_of(x).squeeze(x, axis=tuple(int(a) % x.ndim for a in axes))
            out = x
            ndim = x.ndim + len(axes)
            for a in sorted(int(a) % ndim for a in axes):
                out = xp_of(x).expand_dims(out, a)
            return out
        return x

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        return self.forward(node, [x])

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        return y.reshape(x_shape)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        return [t.reshape(xs[0].shape).astype(xs[0].dtype)]


@register
class TransposeRule(InverseRule):
    """Transpose by ``perm``: ``x* = transpose(t, argsort(perm))``."""

    op_types = ("Transpose",)
    linear = True

    def _perm(self, node: NodeView, ndim: int) -> list[int]:
        perm = node.attr("perm")
        return list(range(ndim))[::-1] if perm is None else [int(p) for p in perm]

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xs[0].transpose(self._perm(node, xs[0].ndim))

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        return self.forward(node, [x])

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        return y.transpose(np.argsort(self._perm(node, y.ndim)).tolist())

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        return [self.adjoint(node, t, tuple(xs[0].shape)).astype(xs[0].dtype)]


@register
class ConcatRule(InverseRule):
    """Concat along ``axis``: each activation input takes its slice of ``t``;
    constant inputs take nothing."""

    op_types = ("Concat",)

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        return tuple(node.dynamic)

    def _parts(self, node: NodeView, xs: Sequence[Array]) -> list[Array]:
        xp = xp_of(xs[0])
        parts = []
        for i in range(node.n_inputs):
            if i in node.static:
                parts.append(xp.asarray(node.static[i], dtype=xs[0].dtype))
            else:
                parts.append(xs[node.dynamic.index(i)])
        return parts

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        parts = self._parts(node, xs)
        return xp_of(xs[0]).concatenate(parts, axis=int(node.attr("axis")))

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        parts = self._parts(node, xs)
        axis = int(node.attr("axis")) % t.ndim
        bounds = np.cumsum([p.shape[axis] for p in parts])[:-1]
        pieces = xp_of(t).split(t, bounds.tolist(), axis=axis)
        return [pieces[i].astype(parts[i].dtype) for i in node.dynamic]


def _decode(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def pad_spec(node: NodeView, ndim: int) -> tuple[list[int], list[int], str, float]:
    """Per-axis pads before / after (negative: crop), the mode and the constant value."""
    if node.opset < 11:
        pads = [int(p) for p in node.attr("pads", [0] * 2 * ndim)]
        value = float(node.attr("value", 0.0))
        axes = list(range(ndim))
    else:
        pads = [int(p) for p in np.asarray(node.const(1)).ravel()]
        value = 0.0
        if 2 in node.static and np.asarray(node.static[2]).size:
            value = float(np.asarray(node.static[2]).ravel()[0])
        axes = list(range(ndim))
        if 3 in node.static and np.asarray(node.static[3]).size:
            axes = [int(a) % ndim for a in np.asarray(node.static[3]).ravel()]
    before, after = [0] * ndim, [0] * ndim
    for j, axis in enumerate(axes):
        before[axis], after[axis] = pads[j], pads[j + len(axes)]
    return before, after, _decode(node.attr("mode", b"constant")), value


def slices(node: NodeView, ndim: int) -> tuple[slice, ...]:
    """Slice's selection as Python slices per axis (attributes before opset 10)."""
    if node.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes = node.attr("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = np.asarray(node.const(1)).ravel().tolist()
        ends = np.asarray(node.const(2)).ravel().tolist()
        axes = list(range(len(starts)))
        if 3 in node.static and np.asarray(node.static[3]).size:
            axes = np.asarray(node.static[3]).ravel().tolist()
        steps = [1] * len(starts)
        if 4 in node.static and np.asarray(node.static[4]).size:
            steps = np.asarray(node.static[4]).ravel().tolist()
    out = [slice(None)] * ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        out[int(axis) % ndim] = slice(int(start), int(end), int(step))
    return tuple(out)


@register
class IndexMapRule(InverseRule):
    """Pad (constant, edge, reflect, wrap), Slice and Gather with constant indices:
    ``x*`` is the mean target over each entry's copies; uncopied entries keep ``x0``."""

    op_types = ("Pad", "Slice", "Gather")
    linear = True

    def check(self, node: NodeView) -> str | None:
        if node.op_type == "Pad":
            mode = _decode(node.attr("mode", b"constant"))
            if mode not in ("constant", "edge", "reflect", "wrap"):
                return f"Pad mode {mode!r} is not supported"
            if node.opset >= 11 and 1 not in node.static:
                return "pads must be constant"
        if node.op_type == "Slice" and node.opset >= 10 and not {1, 2} <= set(node.static):
            return "starts and ends must be constant"
        if node.op_type == "Gather" and 1 not in node.static:
            return "indices must be constant"
        return super().check(node)

    def _map(self, node: NodeView, a: Array, fill: float) -> Array:
        """The op applied to ``a`` (data or an index array), constants set to ``fill``."""
        xp = xp_of(a)
        if node.op_type == "Slice":
            return a[slices(node, a.ndim)]
        if node.op_type == "Gather":
            axis = int(node.attr("axis", 0)) % a.ndim
            idx = np.asarray(node.const(1)).astype(np.int64)
            idx = np.where(idx < 0, idx + a.shape[axis], idx)
            return xp.take(a, xp.asarray(idx), axis=axis)
        before, after, mode, value = pad_spec(node, a.ndim)
        crop = tuple(slice(max(-b, 0), n - max(-e, 0)) for b, e, n in zip(before, after, a.shape,
                                                                            strict=True))
        a = a[crop]
        width = [(max(b, 0), max(e, 0)) for b, e in zip(before, after, strict=True)]
        if mode == "constant":
            return xp.pad(a, width, mode="constant", constant_values=fill)
        return xp.pad(a, width, mode=mode)

    def _one_to_one(
        self, node: NodeView, x_shape: tuple[int, ...]
    ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """For Slice and constant Pad, where each entry is copied at most once: the
        slices of ``x`` that are copied and of the output they land in (no index map)."""
        ndim = len(x_shape)
        if node.op_type == "Slice":
            return slices(node, ndim), (slice(None),) * ndim
        if node.op_type != "Pad":
            return None
        before, after, mode, _ = pad_spec(node, ndim)
        if mode != "constant":
            return None
        crop = tuple(slice(max(-b, 0), n - max(-e, 0))
                     for b, e, n in zip(before, after, x_shape, strict=True))
        kept = [len(range(n)[c]) for c, n in zip(crop, x_shape, strict=True)]
        inner = tuple(slice(max(b, 0), max(b, 0) + k) for b, k in zip(before, kept, strict=True))
        return crop, inner

    def _index(self, node: NodeView, x_shape: tuple[int, ...], xp: object) -> Array:
        n = int(np.prod(x_shape))
        return self._map(node, xp.arange(n, dtype=np.int64).reshape(x_shape), -1)  # type: ignore[attr-defined]

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        value = pad_spec(node, xs[0].ndim)[3] if node.op_type == "Pad" else 0.0
        return self._map(node, xs[0], value)

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        return self._map(node, x, 0.0)

    def _scatter(self, idx: Array, y: Array, size: int) -> tuple[Array, Array]:
        xp = xp_of(y)
        flat, vals = idx.ravel(), y.ravel()
        keep = flat >= 0
        sums = xp.bincount(flat[keep], weights=vals[keep].astype(xp.float64), minlength=size)
        counts = xp.bincount(flat[keep], minlength=size)
        return sums, counts

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        direct = self._one_to_one(node, tuple(x_shape))
        if direct is not None:
            out = xp_of(y).zeros(x_shape, dtype=y.dtype)
            out[direct[0]] = y[direct[1]]
            return out
        idx = self._index(node, tuple(x_shape), xp_of(y))
        sums, _ = self._scatter(idx, y, int(np.prod(x_shape)))
        return sums.reshape(x_shape).astype(y.dtype)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp, x0 = xp_of(t), xs[0]
        direct = self._one_to_one(node, tuple(x0.shape))
        if direct is not None:
            x = x0.copy()
            x[direct[0]] = t[direct[1]]
            return [x]
        idx = self._index(node, tuple(x0.shape), xp)
        sums, counts = self._scatter(idx, t, x0.size)
        x = xp.where(counts > 0, sums / xp.maximum(counts, 1), x0.ravel())
        return [x.reshape(x0.shape).astype(x0.dtype)]
