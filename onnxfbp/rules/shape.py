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

Reverse steps ``J^T r = P^T r`` (NumPy and ONNX alike): the inverse index map for
the Reshape family and Transpose, ``Split`` for Concat, ``Pad`` with zeros for a
unit-step Slice, ``ScatterElements(add)`` for Gather; for Pad the kept window
(constant), plus each padded entry's residual added back to the entry it copies
(edge, reflect).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, decode, register, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder


@register
class ReshapeLikeRule(InverseRule):
    """Reshape / Flatten / Squeeze / Unsqueeze / Identity / Dropout (inference):
    ``x* = reshape(t, x0.shape)``."""

    op_types = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")
    defaults = {"Reshape": {"allowzero": 0}, "Flatten": {"axis": 1},
                "Squeeze": {"axes": None}, "Unsqueeze": {"axes": None}}
    linear = True

    def check(self, node: NodeView) -> str | None:
        return None  # shape inputs may be computed at run time; only data flows back

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        x = xs[0]
        op = node.op_type
        if op == "Reshape":
            shape = [int(s) for s in np.asarray(node.const(1)).ravel()]
            if not node.attr("allowzero"):
                shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return x.reshape(shape)
        if op == "Flatten":
            axis = int(node.attr("axis")) % max(x.ndim, 1)
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

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.op("Reshape", [r, b.shape_of(xs[0])])]

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        return None if node.op_type in ("Identity", "Dropout") else "changes the shape"

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        return r

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        return [t.reshape(xs[0].shape).astype(xs[0].dtype)]


@register
class TransposeRule(InverseRule):
    """Transpose by ``perm``: ``x* = transpose(t, argsort(perm))``."""

    op_types = ("Transpose",)
    defaults = {"Transpose": {"perm": None}}  # None: reversed axes
    linear = True

    def _perm(self, node: NodeView, ndim: int) -> list[int]:
        perm = node.attr("perm")
        return list(range(ndim))[::-1] if perm is None else [int(p) for p in perm]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        perm = self._perm(node, len(b.shape(xs[0])))
        return [b.op("Transpose", [r], perm=np.argsort(perm).tolist())]

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

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """Each activation input's slice of ``r`` (the same split as :meth:`inverse`)."""
        return self.inverse(node, r, xs, o0, 0.0)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        parts = self._parts(node, xs)
        axis = int(node.attr("axis")) % t.ndim
        bounds = np.cumsum([p.shape[axis] for p in parts])[:-1]
        pieces = xp_of(t).split(t, bounds.tolist(), axis=axis)
        return [pieces[i].astype(parts[i].dtype) for i in node.dynamic]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        axis = int(node.attr("axis")) % len(b.shape(o))
        sizes = []
        for i in range(node.n_inputs):
            if i in node.static:
                sizes.append(int(np.shape(node.static[i])[axis]))
            else:
                sizes.append(b.shape(xs[node.dynamic.index(i)])[axis])
        parts = b.op_n("Split", [r, b.const(sizes, np.int64)], len(sizes), axis=axis)
        return [parts[i] for i in node.dynamic]


def pad_spec(node: NodeView, ndim: int) -> tuple[list[int], list[int], str, float]:
    """Per-axis pads before / after (negative: crop), the mode and the constant value."""
    if node.opset < 11:
        pads = [int(p) for p in node.attr("pads", [0] * 2 * ndim)]
        value = float(node.attr("value"))
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
    return before, after, decode(node.attr("mode")), value


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
    defaults = {"Pad": {"mode": "constant", "value": 0.0}, "Gather": {"axis": 0}}
    linear = True

    def check(self, node: NodeView) -> str | None:
        if node.op_type == "Pad":
            mode = decode(node.attr("mode"))
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
            axis = int(node.attr("axis")) % a.ndim
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

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        emit = {"Pad": _emit_pad, "Slice": _emit_slice, "Gather": _emit_gather}[node.op_type]
        return emit(b, node, r, xs)

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


def _emit_pad(b: AdjointBuilder, node: NodeView, r: str, xs: list[str]) -> list[str] | None:
    """Constant padding: the residual of the kept window (cropped axes get zeros).
    Edge and reflect padding: each padded entry's residual added back to the entry
    it copies, one axis at a time."""
    x_shape = b.shape(xs[0])
    rank = len(x_shape)
    before, after, mode, _ = pad_spec(node, rank)
    if before[0] or after[0]:
        return None
    if mode in ("edge", "reflect"):
        if min(before + after) < 0:
            return None
        for axis in range(1, rank):
            r = _fold_copies(b, r, axis, before[axis], after[axis], x_shape[axis], mode, rank)
            if not r:
                return None
        return [r]
    if mode != "constant":
        return None
    grow = [max(0, -p) for p in before] + [max(0, -p) for p in after]
    if any(grow):
        r = b.op("Pad", [r, b.const(grow, np.int64)])
    starts = [max(0, p) for p in before[1:]]
    ends = [start + size for start, size in zip(starts, x_shape[1:], strict=True)]
    axes = list(range(1, rank))
    return [b.op("Slice", [r, b.const(starts, np.int64), b.const(ends, np.int64),
                           b.const(axes, np.int64)])]


def _fold_copies(
    b: AdjointBuilder, r: str, axis: int, p: int, q: int, n: int, mode: str, rank: int
) -> str:
    """``r`` (``p + n + q`` long on ``axis``) folded back to ``n`` entries: the kept
    window plus, for ``edge``, the ``p`` / ``q`` copies summed onto the first / last
    entry, or, for ``reflect``, the mirrored copies added to entries ``1..p`` and
    ``n-1-q..n-2``. An empty string if the form is not covered (reflect past the
    input's length)."""
    if not p and not q:
        return r
    axes = b.const([axis], np.int64)

    def part(start: int, stop: int, step: int = 1) -> str:
        return b.op("Slice", [r, b.const([start], np.int64), b.const([stop], np.int64), axes,
                              b.const([step], np.int64)])

    def total(start: int, stop: int) -> str:
        return b.op("ReduceSum", [part(start, stop), axes], keepdims=1)

    if mode == "edge":
        if n == 1:
            return total(0, p + n + q)
        pieces = [total(0, p + 1)]
        if n > 2:
            pieces.append(part(p + 1, p + n - 1))
        pieces.append(total(p + n - 1, p + n + q))
        return b.op("Concat", pieces, axis=axis)
    if p > n - 1 or q > n - 1:
        return ""

    def widths(lo: int, hi: int) -> str:
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = lo, hi
        return b.const(pads, np.int64)

    out = part(p, p + n)
    if p:  # r[p-1], ..., r[0] copy x[1], ..., x[p]
        mirrored = part(p - 1, -(2**62), -1)
        out = b.op("Add", [out, b.op("Pad", [mirrored, widths(1, n - 1 - p)])])
    if q:  # r[p+n+q-1], ..., r[p+n] copy x[n-1-q], ..., x[n-2]
        mirrored = part(p + n + q - 1, p + n - 1, -1)
        out = b.op("Add", [out, b.op("Pad", [mirrored, widths(n - 1 - q, 1)])])
    return out


def _emit_slice(b: AdjointBuilder, node: NodeView, r: str, xs: list[str]) -> list[str] | None:
    """Unit steps: ``r`` zero-padded back to the input's extent."""
    x_shape = b.shape(xs[0])
    before, after = [], []
    for axis, (sel, size) in enumerate(zip(slices(node, len(x_shape)), x_shape, strict=True)):
        if axis == 0:  # the batch axis is symbolic: only "all of it" is known to hold
            whole = sel.start in (None, 0) and sel.step in (None, 1) and (
                sel.stop is None or sel.stop >= 2**31 - 1)
            if not whole:
                return None
            before.append(0)
            after.append(0)
            continue
        start, stop, step = sel.indices(size)
        if step != 1:
            return None
        before.append(start)
        after.append(size - max(stop, start))
    return [b.op("Pad", [r, b.const(before + after, np.int64)])]


def _emit_gather(b: AdjointBuilder, node: NodeView, r: str, xs: list[str]) -> list[str] | None:
    """Constant indices along ``axis``: ``r`` added back at them (``ScatterElements``,
    repeated indices sum), the indices flattened and broadcast over ``r``."""
    x_shape = b.shape(xs[0])
    rank = len(x_shape)
    axis = int(node.attr("axis")) % rank
    given = np.asarray(node.const(1))
    index = given.astype(np.int64).ravel() % x_shape[axis]
    if given.ndim == 0:  # one entry along axis (any axis, the batch's too): r lacks it
        flat = b.op("Unsqueeze", [r, b.const([axis], np.int64)])
    elif given.ndim == 1:
        flat = r
    elif axis == 0:
        return None  # several index axes along the symbolic batch axis
    else:
        rows = [0] + list(x_shape[1:axis]) + [index.size] + list(x_shape[axis + 1:])
        flat = b.op("Reshape", [r, b.const(rows, np.int64)])
    spots = b.const(index.reshape([1] * axis + [index.size] + [1] * (rank - axis - 1)),
                    np.int64)
    spots = b.op("Expand", [spots, b.op("Shape", [flat])])
    zeros = b.zeros(b.shape_of(xs[0]))
    return [b.op("ScatterElements", [zeros, spots, flat], axis=axis, reduction="add")]
