"""The op table: one rule per ONNX op, registered in one table.

Each entry (an :class:`InverseRule` under its op types in :data:`RULES`) holds,
for its ops, in one place:

- ``defaults``: the ONNX attribute defaults, per op type (read through
  :meth:`NodeView.attr` without a default; an attribute read that the table
  does not list is an error, so each default is written once);
- :meth:`InverseRule.forward` (NumPy reference of the op);
- :meth:`InverseRule.vjp` (the analytic linearized reverse step ``J^T r``);
- :meth:`InverseRule.inverse` (the proximal inverse, below), where one exists
  (:meth:`InverseRule.check_inverse` says where not: a product of two
  activations, a Resize; the default schedule needs only ``vjp``);
- optionally :meth:`InverseRule.emit_adjoint` (the same ``J^T r`` as ONNX nodes,
  for :mod:`onnxfbp.reverse.adjoint`) and :meth:`InverseRule.sparse_vjp` (``J^T r`` at a
  few spatial positions only, for :mod:`onnxfbp.reverse.kept_branch`).

A slot a rule does not fill raises :class:`MissingSlot`, naming the slot, the
op, its opset and the node.

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
adjoint for linear rules, ``f'(x0) r`` for element-wise ones, the first
maximum's routing for max-pooling and max-reductions). Carried from the logits
residual ``onehot(y) - softmax(z)`` it gives every layer the target
``z_l - dL/dz_l``, the target of refine's mini-batch schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = [
    "RULES",
    "Array",
    "InverseRule",
    "MissingSlot",
    "NO_DERIVATIVE",
    "NodeView",
    "decode",
    "emitter_for",
    "fills",
    "onnx_default",
    "register",
    "rule_for",
]


class MissingSlot(UnsupportedModelError, NotImplementedError):
    """A slot of the op table (a default, a reverse step, an emitter...) that the
    op's rule does not fill: the message names the slot, op, opset and node. (A
    missing attribute default means the node lacks a required attribute.)"""

    def __init__(self, slot: str, op_type: str, opset: int, node: str) -> None:
        super().__init__(
            f"{op_type} (opset {opset}), node {node!r}: the op table has no {slot}; "
            "check the model with onnx.checker, or report the op to onnxfbp")
        self.slot, self.op_type, self.opset, self.node = slot, op_type, opset, node


_TABLE = object()  # NodeView.attr's "use the op table's default"


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

    def attr(self, key: str, default: Any = _TABLE) -> Any:
        """The attribute ``key``; if the node does not set it, ``default`` or, without
        one, the op table's ONNX default (:class:`MissingSlot` if it lists none)."""
        if key in self.attrs:
            return self.attrs[key]
        if default is not _TABLE:
            return default
        return onnx_default(self.op_type, key, self.opset, self.name)

    def missing(self, slot: str) -> MissingSlot:
        """The error for a slot this node's op does not fill."""
        return MissingSlot(slot, self.op_type, self.opset, self.name)

    def const(self, index: int) -> np.ndarray:
        return self.static[index]

    def has_input(self, index: int) -> bool:
        return index < self.n_inputs and (index in self.static or index in self.dynamic)


class InverseRule:
    """Base class: subclasses set ``op_types`` and fill the slots they have."""

    op_types: ClassVar[tuple[str, ...]] = ()
    # ONNX attribute defaults, per op type: the one place each is written
    defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    linear: ClassVar[bool] = False  # has apply_linear / adjoint
    elementwise: ClassVar[bool] = False  # o[i] = f(x[i]): vjp is r f'(x0)
    parametric: ClassVar[bool] = False  # owns refinable weights
    # sparse_vjp reads the node's forward "input", "output" or nothing ("")
    sparse_reads: ClassVar[str] = ""
    # several outputs (Split): vjp and emit_adjoint get one residual per output
    # (None where no residual reaches that output)
    multi_output: ClassVar[bool] = False

    def check(self, node: NodeView) -> str | None:
        """``None`` if the rule linearizes this node (:meth:`vjp`: targets of the
        default schedule pass it), else the reason it declines: then no derivative
        exists there (integer outputs, indices) or the form is not covered."""
        extra = set(node.dynamic) - set(self.data_inputs(node))
        if extra:
            return f"input(s) {sorted(extra)} must be constant"
        return None

    def check_inverse(self, node: NodeView) -> str | None:
        """``None`` if :meth:`inverse` covers a node that :meth:`check` accepts (the
        sweep schedules carry targets through inverses), else why not."""
        return None if fills(self, "inverse") else f"{node.op_type} has no inverse rule"

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        """Input indices through which targets flow (activations)."""
        return (0,)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        raise node.missing("forward")

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        """Target for each of ``data_inputs(node)``, in that order."""
        raise node.missing("inverse")

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """Linearized reverse step: the residual ``r`` at the output carried to each
        of ``data_inputs(node)`` as ``J^T r`` (``J`` the Jacobian at ``x0``).

        Linear rules: the adjoint. Element-wise rules: ``r f'(x0)`` with ``f'`` from
        :meth:`slope`. Other rules override this."""
        if self.linear:
            return [self.adjoint(node, r, tuple(xs[0].shape)).astype(xs[0].dtype, copy=False)]
        if self.elementwise:
            x = xs[0].astype(xp_of(xs[0]).float64)
            return [(r * self.slope(node, x)).astype(xs[0].dtype, copy=False)]
        raise node.missing("vjp")

    def slope(self, node: NodeView, x: Array) -> Array:
        """Element-wise rules: the derivative ``f'(x)``, entry by entry."""
        raise node.missing("slope")

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        """``J^T r`` as ONNX nodes added to ``b``: ``r`` names the output residual,
        ``xs`` the data inputs, ``o`` the output; returns the residual of each data
        input, or None for a form the emitter does not cover."""
        raise node.missing("onnx adjoint emitter")

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        """``None`` if :meth:`sparse_vjp` covers this node on an input of ``x_shape``,
        else the reason it does not."""
        return "no sparse form"

    def land(
        self, node: NodeView, grid: tuple[int, int], pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Where the flat input positions ``pos`` of the ``grid`` land on the output
        grid, and whether each lands at all (position-wise ops: in place)."""
        return pos, np.ones(len(pos), dtype=bool)

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        """``J^T r`` at the flat positions ``pos`` of the input's spatial ``grid`` only,
        (N, C, len(pos)): ``r`` is the output residual at ``land(pos)`` (N, C,
        len(pos)) for position-wise ops and pools, the whole output residual for a
        convolution; ``fwd`` the forward tensor named by ``sparse_reads``, whole."""
        raise node.missing("sparse form")

    # Linear rules only: the linear part of f (no bias) and its adjoint.
    def apply_linear(self, node: NodeView, x: Array) -> Array:
        raise node.missing("linear part")

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        raise node.missing("adjoint")


RULES: dict[str, InverseRule] = {}

# Ops with no derivative to carry a target through: the walk's boundary reasons.
NO_DERIVATIVE: dict[str, str] = {
    **dict.fromkeys(("ArgMax", "ArgMin"), "its output is an index (no derivative)"),
    "TopK": "its indices output has no derivative",
    **dict.fromkeys(("Shape", "Size"), "its output is a shape (no derivative)"),
    **dict.fromkeys(("NonMaxSuppression", "NonZero"), "its output is a list of indices"),
    **dict.fromkeys(("Round", "Floor", "Ceil", "Sign"),
                    "piecewise constant (zero derivative almost everywhere)"),
    **dict.fromkeys(("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not",
                     "And", "Or", "Xor", "IsNaN", "IsInf"), "its output is boolean"),
    "OneHot": "its input is an index (no derivative)",
}


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


def onnx_default(op_type: str, key: str, opset: int = 0, node: str = "") -> Any:
    """The op table's ONNX default of attribute ``key`` of ``op_type``
    (:class:`MissingSlot` if it lists none)."""
    rule = RULES.get(op_type)
    defaults = rule.defaults.get(op_type, {}) if rule is not None else {}
    if key not in defaults:
        raise MissingSlot(f"default for attribute {key!r}", op_type, opset, node)
    return defaults[key]


def fills(rule: InverseRule, slot: str) -> bool:
    """Whether ``rule`` fills the optional slot ``slot`` (overrides the base's)."""
    return getattr(type(rule), slot) is not getattr(InverseRule, slot)


def emitter_for(op_type: str) -> Callable[..., list[str] | None] | None:
    """The op's ONNX adjoint emitter (:meth:`InverseRule.emit_adjoint`), or None."""
    rule = RULES.get(op_type)
    return rule.emit_adjoint if rule is not None and fills(rule, "emit_adjoint") else None


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


def decode(value: object) -> str:
    """A string attribute (bytes in ONNX) as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


# Import the rule modules so they register themselves.
from . import (  # noqa: E402, F401
    activation,
    arithmetic,
    broadcast,
    convtranspose,
    elementwise,
    linear,
    norm,
    pool,
    resize,
    shape,
    smooth,
)
