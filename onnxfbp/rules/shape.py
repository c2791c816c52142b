"""Index maps: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Identity, Dropout,
Concat.

They move entries without changing them, so the inverse is exact:
``x* = P^-1 t`` (reshape back, inverse permutation, split along the concat
axis). Each is linear with ``P^T = P^-1``.
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
