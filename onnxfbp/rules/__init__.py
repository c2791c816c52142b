"""Inverse rules: one per ONNX op, registered in one table.

For a node ``o = f(x)`` with current input ``x0``, current output ``o0`` and a
target output ``t``, a rule's :meth:`InverseRule.inverse` returns a target
input

    x* = argmin_x ||f(x) - t||^2 + mu ||x - x0||^2

in closed form where one exists (exact inverses of index maps and affine maps,
Woodbury for dense layers, conjugate gradients for convolutions). ``mu`` is
relative: each linear rule scales it to its own operator's mean eigenvalue.

Every rule also has a NumPy reference :meth:`InverseRule.forward`, checked
against onnxruntime by the contract tests; linear rules expose the linear part
and its adjoint for the adjoint identity ``<A v, w> = <v, A^T w>``.

:meth:`InverseRule.vjp` is the same reverse step linearized at ``x0``: a small
output residual ``r = t - o0`` becomes the input residual ``J^T r`` (the
adjoint for linear rules, ``f'(x0) r`` for element-wise ones, the small-step
response of :meth:`InverseRule.inverse` otherwise). Carried from the logits
residual ``onehot(y) - softmax(z)`` it gives every layer the target
``z_l - dL/dz_l``, the target of refine's mini-batch schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = [
    "RULES",
    "Array",
    "InverseRule",
    "NodeView",
    "register",
    "rule_for",
]


@dataclass(frozen=True)
class NodeView:
    """What a rule may know of a node: op, attributes and its static input values.

    ``static`` maps input index to the value of inputs that do not depend on the
    graph input (weights, constants); for refinable layers these are the
    *current* weights. ``dynamic`` lists the input indices that carry
    activations.
    """

    op_type: str
    name: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    static: Mapping[int, np.ndarray] = field(default_factory=dict)
    dynamic: tuple[int, ...] = (0,)
    n_inputs: int = 1
    opset: int = 13

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def const(self, index: int) -> np.ndarray:
        return self.static[index]

    def has_input(self, index: int) -> bool:
        return index < self.n_inputs and (index in self.static or index in self.dynamic)


class InverseRule:
    """Base class: subclasses set ``op_types`` and implement forward/inverse."""

    op_types: ClassVar[tuple[str, ...]] = ()
    linear: ClassVar[bool] = False  # has apply_linear / adjoint
    elementwise: ClassVar[bool] = False  # o[i] = f(x[i]): vjp from f'(x0)
    parametric: ClassVar[bool] = False  # owns refinable weights

    def check(self, node: NodeView) -> str | None:
        """``None`` if the rule handles this node, else the reason it declines."""
        extra = set(node.dynamic) - set(self.data_inputs(node))
        if extra:
            return f"input(s) {sorted(extra)} must be constant"
        return None

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        """Input indices through which targets flow (activations)."""
        return (0,)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        raise NotImplementedError

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        """Target for each of ``data_inputs(node)``, in that order."""
        raise NotImplementedError

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """Linearized reverse step: the residual ``r`` at the output carried to each
        of ``data_inputs(node)`` as ``J^T r`` (``J`` the Jacobian at ``x0``).

        Linear rules: the adjoint. Element-wise rules: ``f'(x0) r`` with ``f'`` a
        central difference of :meth:`forward` in float64. Other rules: the response
        of :meth:`inverse` to the small step ``t = o0 + eps r`` divided by ``eps``
        (exact for index maps; for max-pooling the arg-max routing).
        """
        xp = xp_of(r)
        if self.linear:
            return [self.adjoint(node, r, tuple(xs[0].shape)).astype(xs[0].dtype, copy=False)]
        if self.elementwise:
            x = xs[0].astype(xp.float64)
            h = 1e-4 * (1.0 + xp.abs(x))
            slope = (self.forward(node, [x + h]) - self.forward(node, [x - h])) / (2 * h)
            return [(r * slope).astype(xs[0].dtype, copy=False)]
        scale = float(xp.abs(r).max()) if r.size else 0.0
        if scale == 0.0:
            return [xp.zeros_like(x) for x in xs]
        eps = 1e-3 * (float(xp.abs(o0).max()) + 1e-3) / scale
        t = (o0.astype(xp.float64) + eps * r).astype(o0.dtype)
        new = self.inverse(node, t, xs, o0, 1.0)
        return [
            ((n.astype(xp.float64) - x) / eps).astype(x.dtype)
            for n, x in zip(new, xs, strict=True)
        ]

    # Linear rules only: the linear part of f (no bias) and its adjoint.
    def apply_linear(self, node: NodeView, x: Array) -> Array:
        raise NotImplementedError

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        raise NotImplementedError


RULES: dict[str, InverseRule] = {}


def register(cls: type[InverseRule]) -> type[InverseRule]:
    """Class decorator: add a rule to :data:`RULES` under each of its op types."""
    instance = cls()
    for op in cls.op_types:
        if op in RULES:
            raise ValueError(f"two inverse rules for {op}")
        RULES[op] = instance
    return cls


def rule_for(op_type: str) -> InverseRule | None:
    return RULES.get(op_type)


def xp_of(a: Array) -> Any:
    """The array module (numpy or cupy) of ``a``."""
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        import cupy  # noqa: PLC0415

        return cupy
    return np


def unbroadcast(r: Array, target: tuple[int, ...], reduce: Callable[..., Array]) -> Array:
    """Reduce ``r`` over the axes that numpy broadcasting added to reach ``r.shape``."""
    while r.ndim > len(target):
        r = reduce(r, axis=0)
    for axis, size in enumerate(target):
        if size == 1 and r.shape[axis] != 1:
            r = reduce(r, axis=axis, keepdims=True)
    return r


# Import the rule modules so they register themselves.
from . import activation, arithmetic, linear, pool, shape, smooth  # noqa: E402, F401
