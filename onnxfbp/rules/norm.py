"""InstanceNormalization and GroupNormalization (inference): per sample, the
entries of a group (InstanceNormalization: one channel's spatial map;
GroupNormalization: ``C / G`` channels' maps) are normalized,
``z = (x - m) / s`` with ``s = sqrt(var + eps)``, then scaled and shifted per
channel (GroupNormalization before opset 21: per group).

Linearized only (no inverse here; the sweep schedules stop at them). Reverse
step w.r.t. the input, as LayerNormalization's over each group:
``J^T r = (u - mean(u) - z mean(u z)) / s`` with ``u = g r``, means over the
group's entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder


@register
class GroupNormRule(InverseRule):
    """InstanceNormalization / GroupNormalization with constant scale and bias."""

    op_types = ("InstanceNormalization", "GroupNormalization")
    defaults = {"InstanceNormalization": {"epsilon": 1e-5},
                "GroupNormalization": {"epsilon": 1e-5, "stash_type": 1}}

    def check(self, node: NodeView) -> str | None:
        if not {1, 2} <= set(node.static):
            return "scale and bias must be constant"
        return super().check(node)

    def _groups(self, node: NodeView, channels: int) -> int:
        if node.op_type == "InstanceNormalization":
            return channels
        return int(node.attrs["num_groups"])

    def _per_channel(self, node: NodeView, index: int, channels: int) -> np.ndarray:
        """Scale (1) or bias (2) per channel (GroupNormalization before opset 21:
        per group, repeated over its channels)."""
        v = np.asarray(node.const(index), dtype=np.float64).reshape(-1)
        if v.size != channels:
            v = np.repeat(v, channels // v.size)
        return v

    def _parts(self, node: NodeView, x: Array) -> tuple[Array, Array, Array, Array]:
        """(z, s, g, b): z and s grouped (N, G, -1); g, b per channel (1, C, 1...)."""
        xp = xp_of(x)
        n, c = x.shape[:2]
        grouped = x.astype(xp.float64).reshape(n, self._groups(node, c), -1)
        m = grouped.mean(axis=2, keepdims=True)
        s = xp.sqrt(((grouped - m) ** 2).mean(axis=2, keepdims=True)
                    + float(node.attr("epsilon")))
        shape = (1, c) + (1,) * (x.ndim - 2)
        g = xp.asarray(self._per_channel(node, 1, c)).reshape(shape)
        b = xp.asarray(self._per_channel(node, 2, c)).reshape(shape)
        return (grouped - m) / s, s, g, b

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        z, _, g, b = self._parts(node, xs[0])
        return (z.reshape(xs[0].shape) * g + b).astype(xs[0].dtype)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        x = xs[0]
        z, s, g, _ = self._parts(node, x)
        u = (r * g).reshape(z.shape)
        d = u - u.mean(axis=2, keepdims=True) - z * (u * z).mean(axis=2, keepdims=True)
        return [(d / s).reshape(x.shape).astype(x.dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        c = x_shape[1]
        grouped = b.const([0, self._groups(node, c), -1], np.int64)
        ones = [1] * (len(x_shape) - 2)

        def mean(v: str) -> str:
            return b.op("ReduceMean", [v], axes=[2], keepdims=1)

        x = b.op("Reshape", [b.act(xs[0]), grouped])
        centered = b.op("Sub", [x, mean(x)])
        spread = b.op("Sqrt", [b.op("Add", [mean(b.op("Mul", [centered, centered])),
                                            b.const(float(node.attr("epsilon")))])])
        z = b.op("Div", [centered, spread])
        g = b.const(self._per_channel(node, 1, c).reshape(c, *ones))
        u = b.op("Reshape", [b.op("Mul", [r, g]), grouped])
        d = b.op("Sub", [b.op("Sub", [u, mean(u)]), b.op("Mul", [z, mean(b.op("Mul", [u, z]))])])
        return [b.op("Reshape", [b.op("Div", [d, spread]), b.shape_of(xs[0])])]
