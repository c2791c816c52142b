"""Smooth element-wise ops met inside attention, GELU and normalization blocks:
Sqrt, Erf, Exp, Log, Neg, Reciprocal, Abs, Pow with a constant scalar exponent,
and Cast between float types.

They are linearized only (the default schedule's reverse step); none has an
inverse here, so the sweep schedules stop at them.

Reverse step ``J^T r = r f'(x0)`` (NumPy and ONNX alike): Sqrt ``r / (2 o0)``,
Erf ``r 2 / sqrt(pi) e^{-x^2}``, Exp ``r o0``, Log ``r / x``, Neg ``-r``,
Reciprocal ``-r o0^2``, Abs ``r sign(x)``, Pow ``r p x^{p - 1}``; Cast between
float types ``r`` (in the input's float type). A Cast to an integer or boolean
type has no derivative: the walk stops there and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper

from . import Array, InverseRule, NodeView, register, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _erf(x: Array) -> Array:
    if xp_of(x) is np:
        from scipy.special import erf  # noqa: PLC0415

        return erf(x)
    from cupyx.scipy.special import erf as cupy_erf  # noqa: PLC0415

    return cupy_erf(x)


class _Smooth(InverseRule):
    """An element-wise op with its forward, slope and ONNX reverse step."""

    elementwise = True

    def emit_slope(self, b: AdjointBuilder, node: NodeView, x: str, o: str) -> str:
        raise node.missing("onnx adjoint emitter")

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.op("Mul", [r, self.emit_slope(b, node, xs[0], o)])]


@register
class SqrtRule(_Smooth):
    op_types = ("Sqrt",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).sqrt(xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        root = xp.sqrt(xp.maximum(x, 0))
        return xp.where(root > 0, 0.5 / xp.where(root > 0, root, 1.0), 0.0)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        y = b.act(o)
        positive = b.op("Greater", [y, b.const(0.0)])
        safe = b.op("Where", [positive, y, b.const(1.0)])
        d = b.op("Div", [r, b.op("Mul", [safe, b.const(2.0)])])
        return [b.op("Mul", [d, b.as_float(positive)])]


@register
class ErfRule(_Smooth):
    op_types = ("Erf",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return _erf(xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        return 2.0 / np.sqrt(np.pi) * xp_of(x).exp(-x * x)

    def emit_slope(self, b: AdjointBuilder, node: NodeView, x: str, o: str) -> str:
        xv = b.act(x)
        e = b.op("Exp", [b.op("Neg", [b.op("Mul", [xv, xv])])])
        return b.op("Mul", [e, b.const(2.0 / np.sqrt(np.pi))])


@register
class ExpRule(_Smooth):
    op_types = ("Exp",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).exp(xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        return xp_of(x).exp(x)

    def emit_slope(self, b: AdjointBuilder, node: NodeView, x: str, o: str) -> str:
        return b.act(o)


@register
class LogRule(_Smooth):
    op_types = ("Log",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).log(xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        return 1.0 / x

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.op("Div", [r, b.act(xs[0])])]


@register
class NegRule(_Smooth):
    op_types = ("Neg",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return -xs[0]

    def slope(self, node: NodeView, x: Array) -> Array:
        return -xp_of(x).ones_like(x)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.op("Neg", [r])]


@register
class ReciprocalRule(_Smooth):
    op_types = ("Reciprocal",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return 1.0 / xs[0]

    def slope(self, node: NodeView, x: Array) -> Array:
        return -1.0 / (x * x)

    def emit_slope(self, b: AdjointBuilder, node: NodeView, x: str, o: str) -> str:
        y = b.act(o)
        return b.op("Neg", [b.op("Mul", [y, y])])


@register
class AbsRule(_Smooth):
    op_types = ("Abs",)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return xp_of(xs[0]).abs(xs[0])

    def slope(self, node: NodeView, x: Array) -> Array:
        return xp_of(x).sign(x)

    def emit_slope(self, b: AdjointBuilder, node: NodeView, x: str, o: str) -> str:
        return b.op("Sign", [b.act(x)])


@register
class PowRule(_Smooth):
    """``x ** p`` with a constant scalar exponent ``p``."""

    op_types = ("Pow",)

    def check(self, node: NodeView) -> str | None:
        if node.dynamic != (0,) or 1 not in node.static:
            return "the exponent must be a constant"
        if np.asarray(node.static[1]).size > 1:
            return "the exponent must be a scalar"
        return None

    def _p(self, node: NodeView) -> float:
        return float(np.asarray(node.const(1)).reshape(-1)[0])

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        x = xs[0]
        return (x ** xp_of(x).asarray(self._p(node), dtype=x.dtype)).reshape(x.shape)

    def slope(self, node: NodeView, x: Array) -> Array:
        p = self._p(node)
        if p == 0:
            return xp_of(x).zeros_like(x)
        return p * x ** (p - 1) if p != 1 else xp_of(x).ones_like(x)

    def emit_slope(self, b: AdjointBuilder, node: NodeView, x: str, o: str) -> str:
        p = self._p(node)
        if p == 1:
            return b.const(1.0)
        return b.op("Mul", [b.op("Pow", [b.act(x), b.const(p - 1)]), b.const(p)])


@register
class CastRule(InverseRule):
    """Cast between float types: the identity on the values (``J^T r = r``)."""

    op_types = ("Cast",)
    defaults = {"Cast": {"saturate": 1}}

    def check(self, node: NodeView) -> str | None:
        to = int(node.attrs.get("to", 0))
        if to not in _FLOAT_TYPES:
            name = TensorProto.DataType.Name(to) if to in TensorProto.DataType.values() else to
            return f"Cast to {name} (not a float type) has no derivative"
        return super().check(node)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        dtype = helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
        return xs[0].astype(dtype)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        return [r.astype(xs[0].dtype, copy=False)]

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [r]  # the reverse graph runs in one float type
