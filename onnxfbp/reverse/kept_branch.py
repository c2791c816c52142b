"""The deepest convolution's residual at its kept output positions only.

A convolution's step reads its residual ``R`` at ``step_positions`` output
positions per batch (:meth:`LayerBlock.rows`), but a dense reverse pass
computes ``R`` at every position first. For the deepest convolution ``L`` of
a plain CNN that is most of the pass: on the shared MNIST CNN conv1's branch
(conv2's adjoint and a MaxPool's index/unpool pair) takes 11 of the compiled
pass's 13.5 ms per 100 samples, to give 16 (now 48) of conv1's 784 positions.

:class:`KeptBranch` covers a chain from ``L``'s output to the next
convolution ``M`` in which every tensor has one reader and is not a graph
output, whose every node has a sparse form in the op table
(:meth:`InverseRule.sparse_vjp`: ``J^T r`` at a few spatial positions, the same
math as its dense ``vjp``; today Relu, LeakyRelu with ``alpha > 0``, inference
BatchNormalization, Identity, Dropout and MaxPool with disjoint windows),
ending at ``M``, a 2-D ``Conv`` with stride 1 and one group, whose output
residual ``r_M`` the dense pass computes anyway (its sparse form: one im2col
row of ``r_M`` per kept position in the transposed geometry, times the
flipped kernel).

Positions map forward through the chain (:meth:`InverseRule.land`: a pool takes
``p`` to its window ``q = p // s``; a position past the last whole window gets
no residual), then the residual is computed
backward at those positions only, for every sample and channel: M's adjoint
once per distinct landed position, the pool's first maximum once per window.
The values equal those of the dense pass at the same positions
(``tests/test_kept_branch``). :meth:`KeptBranch.draw` picks the positions as
whole windows of the chain's first pool, so that they share those rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..fit.layers import kept_positions
from ..graph.plan import Plan, PlanNode
from ..rules import RULES, Array, NodeView, fills
from ..rules.linear import ConvGeometry
from ..rules.pool import pool_geometry, window_taps

__all__ = ["KeptBranch"]


@dataclass(frozen=True)
class _Step:
    """One node of the chain: ``op``, the node's name, the forward tensor its
    sparse form reads (``""``: none), the spatial size of its input, and for a
    pool (a step that moves positions) its window geometry."""

    op: str
    node: str
    tensor: str = ""
    grid: tuple[int, int] = (0, 0)
    pool: ConvGeometry | None = None


@dataclass(frozen=True)
class KeptBranch:
    """The chain from a convolution's output ``start`` to the next convolution's
    output ``source`` (see the module docstring)."""

    start: str  # the deepest convolution's output
    source: str  # M's output: its residual comes from the dense pass
    conv: str  # M's node name
    conv_grid: tuple[int, int]  # M's input size
    steps: tuple[_Step, ...]  # forward order

    @property
    def activations(self) -> list[str]:
        """Forward tensors the branch reads."""
        return sorted({s.tensor for s in self.steps if s.tensor})

    @property
    def grid(self) -> tuple[int, int]:
        """Spatial size of ``start``."""
        return self.steps[0].grid if self.steps else self.conv_grid

    def draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, int]:
        """Kept positions of ``start``'s grid for one step (flat, sorted), and the
        number of positions they are drawn from.

        With a MaxPool in the chain: whole windows of it, about ``2 count``
        positions (``ceil(2 count / window area)`` windows; positions outside every
        window get no residual and are not drawn). Per sample and channel a
        window's residual is on its first maximum only, and all its positions share
        one row of M's adjoint. On the shared CNN (2 x 2 pool) 24 whole windows
        cost half the adjoint rows of 48 scattered positions (which fall in 48
        windows) and put a residual on twice as many rows per channel; seeds 0-7,
        rotated / noisy MNIST 0.9581 / 0.9696 against 0.9582 / 0.9693 with 48
        scattered positions, the branch 8.9 instead of 11.4 ms per step (12
        windows: 6.1 ms, 0.9575 / 0.9680). The rows of the layer itself grow
        with the positions, hence about ``2 count`` of them for any window size.
        Without a pool: ``count`` positions drawn one by one."""
        h, w = self.grid
        pools = [s for s in self.steps if s.pool is not None]
        if not pools:
            keep = kept_positions(rng, h * w, count)
            return (np.arange(h * w) if keep is None else keep), h * w
        pool = pools[0]  # the steps before it keep the grid
        assert pool.pool is not None
        (kh, kw), (oh, ow) = pool.pool.kernel, pool.pool.out_size(*pool.grid)
        wanted = max(1, -(-2 * count // (kh * kw)))
        picked = rng.choice(oh * ow, size=min(wanted, oh * ow), replace=False)
        keep = np.sort(window_taps(pool.pool, pool.grid, picked // ow, picked % ow).reshape(-1))
        return keep, oh * ow * kh * kw

    @staticmethod
    def find(plan: Plan, start: str, shapes: Mapping[str, tuple[int, ...]]) -> KeptBranch | None:
        """The branch from ``start`` (a convolution's output), or None where the
        chain has a node without a sparse form (or a form it does not cover: a
        pool whose windows overlap, a next convolution with strides or groups), a
        second reader or a graph output."""
        readers: dict[str, int] = {}
        for n in plan.model.graph.node:
            for name in set(n.input):
                readers[name] = readers.get(name, 0) + 1
        outputs = {o.name for o in plan.model.graph.output}
        by_input: dict[str, PlanNode] = {}
        for node in plan.nodes:
            for j in node.data_inputs:
                by_input.setdefault(node.inputs[j], node)
        steps: list[_Step] = []
        tensor = start
        while True:
            pn = by_input.get(tensor)
            if pn is None or readers.get(tensor) != 1 or tensor in outputs:
                return None
            if tensor not in shapes or len(shapes[tensor]) != 4 or pn.data_inputs != (0,):
                return None
            rule = RULES.get(pn.op)
            if (rule is None or not fills(rule, "sparse_vjp")
                    or len([o for o in pn.outputs if o]) != 1
                    or rule.sparse_check(pn.view, shapes[tensor]) is not None):
                return None
            grid = (int(shapes[tensor][2]), int(shapes[tensor][3]))
            if pn.op == "Conv":
                if 1 not in pn.static_names:
                    return None
                return KeptBranch(start, pn.outputs[0], pn.name, grid, tuple(steps))
            reads = {"input": tensor, "output": pn.outputs[0], "": ""}[rule.sparse_reads]
            pool = pool_geometry(pn.view, shapes[tensor]) if fills(rule, "land") else None
            steps.append(_Step(pn.op, pn.name, reads, grid, pool))
            tensor = pn.outputs[0]

    def residual(
        self, acts: Mapping[str, Array], r_source: Array, views: Mapping[str, NodeView],
        keep: np.ndarray,
    ) -> Array:
        """``-dL/d start`` at the flat positions ``keep`` of its grid: (N, C, len(keep)),
        from the dense residual ``r_source`` at M's output (N, O, H', W')."""
        # forward: where each kept position lands, step by step
        pos = np.asarray(keep, np.int64)
        trail = []  # (step, positions on its input grid)
        for step in self.steps:
            trail.append((step, pos))
            pos = RULES[step.op].land(views[step.node], step.grid, pos)[0]
        # backward: M's adjoint at the landed positions, then the chain in reverse
        r = RULES["Conv"].sparse_vjp(views[self.conv], r_source, pos, self.conv_grid, None)
        for step, at in reversed(trail):
            fwd = acts[step.tensor] if step.tensor else None
            r = RULES[step.op].sparse_vjp(views[step.node], r, at, step.grid, fwd)
        return r
