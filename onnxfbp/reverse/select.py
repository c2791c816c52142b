"""Which reverse pass a minibatch run uses, and why, as a typed result.

The compiled pass (:class:`onnxfbp.reverse.adjoint.AdjointGraph`, one onnxruntime
session) when every node on the path has an ONNX adjoint and onnxruntime runs
it; otherwise the array pass (:mod:`.arrays`, NumPy or CuPy) with the reason.
Before either, the deepest refined convolution's branch may be cut off the path
and computed at its kept positions only (:func:`kept_route`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..graph.plan import Layer, Plan
from ..rules import Array
from .adjoint import EMITTERS, AdjointGraph, AdjointUnavailable
from .kept_branch import KeptBranch

if TYPE_CHECKING:
    from ..schedules.state import ModelState

__all__ = [
    "KeptRoute", "ReverseChoice", "ReverseProbe", "choose_reverse", "compile_reverse", "kept_route",
    "plan_level_choice",
]


@dataclass(frozen=True)
class ReverseChoice:
    """``kind``: ``compiled`` (``graph`` set) or ``arrays`` (NumPy/CuPy, ``module``);
    ``reason``: why not compiled (empty when compiled)."""

    kind: Literal["compiled", "arrays"]
    module: str  # the array module's name: numpy or cupy
    reason: str = ""
    graph: AdjointGraph | None = None

    def describe(self) -> str:
        """The report's ``environment.reverse_pass``: ``onnxruntime`` (on a GPU with
        whether the probe run kept CuPy arrays on the device) or ``numpy (reason)``."""
        if self.graph is None:
            return f"{self.module} ({self.reason})"
        if self.module == "numpy":
            return "onnxruntime"
        return "onnxruntime " + (
            "(CUDA, CuPy in and out)" if self.graph.on_device else "(host copies)")


@dataclass(frozen=True)
class KeptRoute:
    """The reverse path and the tensors whose residuals it must give, with the
    deepest convolution's ``branch`` cut off (None: no such branch)."""

    branch: KeptBranch | None
    path: list[int]
    outputs: list[str]


def kept_route(
    plan: Plan, layers: Sequence[Layer], acts: Mapping[str, Array], path: list[int]
) -> KeptRoute:
    """The deepest refined layer's branch computed at its kept positions only
    (:mod:`onnxfbp.reverse.kept_branch`), if it is a convolution with such a branch, and
    the path without it; else no branch, ``path`` and the layers' outputs."""
    outputs = [layer.output for layer in layers]
    deepest = layers[-1]
    if deepest.kind != "conv" or len(layers) < 2:
        return KeptRoute(None, path, outputs)
    shapes = {name: tuple(value.shape) for name, value in acts.items()}
    branch = KeptBranch.find(plan, deepest.output, shapes)
    if branch is None:
        return KeptRoute(None, path, outputs)
    inside = {step.node for step in branch.steps} | {branch.conv}
    short = [i for i in path if plan.nodes[i].name not in inside]
    outputs = [name for name in outputs if name != deepest.output]
    return KeptRoute(branch, short, sorted({*outputs, branch.source}))


def choose_reverse(
    plan: Plan,
    route: KeptRoute,
    acts: Mapping[str, Array],
    views: Mapping[str, Any],
    providers: list[str],
    threads: int | None,
    xp: Any,
    compiled: bool = True,
) -> ReverseChoice:
    """Compile the reverse pass of ``route`` on the batch ``acts`` unless ``compiled``
    is off; the array pass, with the reason, where it does not compile."""
    module = xp.__name__
    if not compiled:
        return ReverseChoice("arrays", module, "compiled_reverse off")
    try:
        graph = AdjointGraph.build(
            plan, route.path, route.outputs, acts, views, providers, threads, xp)
    except AdjointUnavailable as exc:
        return ReverseChoice("arrays", module, str(exc))
    return ReverseChoice("compiled", module, "", graph)


def plan_level_choice(plan: Plan, path: Sequence[int], compiled: bool = True) -> str:
    """Which pass a run would try, from the plan alone (nothing compiled):
    ``onnxruntime`` if every node on ``path`` has an ONNX adjoint (onnxruntime
    may still decline a form at run time), else ``numpy (no onnx adjoint for OP)``."""
    if not compiled:
        return f"{np.__name__} (compiled_reverse off)"
    for i in reversed(list(path)):  # from the logits back, as the compiler goes
        op = plan.nodes[i].op
        if op not in EMITTERS:
            return f"{np.__name__} (no onnx adjoint for {op})"
    return "onnxruntime"


@dataclass(frozen=True)
class ReverseProbe:
    """The reverse pass of every refined layer compiled on one batch: its forward
    tensors ``acts``, the node views, the path and the graph."""

    acts: dict[str, Any]
    views: dict[str, Any]
    path: list[int]
    graph: AdjointGraph


def compile_reverse(state: ModelState, x: np.ndarray) -> ReverseProbe:
    """Compile the reverse pass of ``state``'s refined layers on the batch ``x``,
    with no kept branch; raises :class:`AdjointUnavailable` if it does not compile."""
    path, needed = state.reverse_plan(state.layers)
    views = state.views()
    acts = state.forward(x, needed, on_device=True)
    graph = AdjointGraph.build(
        state.plan, path, [layer.output for layer in state.layers], acts, views,
        state.providers, state.config.run.threads, state.xp)
    return ReverseProbe(acts, views, path, graph)
