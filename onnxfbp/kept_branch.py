"""The deepest convolution's residual at its kept output positions only.

A convolution's step reads its residual ``R`` at ``step_positions`` output
positions per batch (:meth:`LayerBlock.rows`), but a dense reverse pass
computes ``R`` at every position first. For the deepest convolution ``L`` of
a plain CNN that is most of the pass: on the shared MNIST CNN conv1's branch
(conv2's adjoint and a MaxPool's index/unpool pair) takes 11 of the compiled
pass's 13.5 ms per 100 samples, to give 16 (now 48) of conv1's 784 positions.

:class:`KeptBranch` covers a chain from ``L``'s output to the next
convolution ``M`` in which every tensor has one reader and is not a graph
output, with nodes

- ``Relu``, ``LeakyRelu`` (``alpha > 0``): ``J^T r = r [o0 > 0]``, ``r`` or
  ``alpha r`` by the sign of ``o0``;
- ``BatchNormalization`` (inference form): ``J^T r = r g / sqrt(v + eps)`` per
  channel;
- ``Identity``, ``Dropout``: ``J^T r = r``;
- ``MaxPool`` with disjoint windows (kernel <= strides, no padding, no
  dilation): ``J^T r`` puts ``r[q]`` on the first maximum of window ``q``;
- ending at ``M``, a 2-D ``Conv`` with stride 1 and one group, whose output
  residual ``r_M`` the dense pass computes anyway:

      J^T r_M [n, c, i, j] = sum_{o, a, b} W[o, c, a, b]
                             r_M[n, o, i + p_t - a d_h, j + p_l - b d_w]

  (terms outside ``r_M`` are zero): at a kept position this is one im2col
  row of ``r_M`` in the transposed geometry (pads ``d (k - 1) - p``) times
  ``W`` flipped in space with its channel axes swapped.

Positions map forward through the chain (a pool takes ``p`` to its window
``q = p // s`` and remembers where in the window ``p`` sits; a position past
the last whole window gets no residual), then the residual is computed
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

from .graph import Plan, PlanNode
from .layers import gather_patches, kept_positions
from .rules import Array, NodeView, xp_of
from .rules.linear import ConvGeometry, ConvRule
from .rules.pool import pool_geometry

__all__ = ["KeptBranch"]

PASS_THROUGH = ("Identity", "Dropout")


@dataclass(frozen=True)
class _Step:
    """One node of the chain: ``op``, the node's name, and the forward tensor it
    reads (``Relu``/``LeakyRelu``: its output; ``MaxPool``: its input)."""

    op: str
    node: str
    tensor: str = ""  # (none for the others)
    grid: tuple[int, int] = (0, 0)  # spatial size of the step's input
    window: tuple[int, int] = (1, 1)  # MaxPool kernel
    stride: tuple[int, int] = (1, 1)  # MaxPool strides
    pooled: tuple[int, int] = (0, 0)  # MaxPool output size
    alpha: float = 0.0  # LeakyRelu slope

    def window_taps(self, qi: np.ndarray, qj: np.ndarray) -> np.ndarray:
        """MaxPool: the flat positions on the step's input grid of the windows
        ``(qi, qj)``, (Q, kh * kw) in window order, clipped to the grid."""
        (kh, kw), (sh, sw), (h, w) = self.window, self.stride, self.grid
        rows = np.minimum((qi * sh)[:, None] + np.arange(kh), h - 1)  # Q, kh
        cols = np.minimum((qj * sw)[:, None] + np.arange(kw), w - 1)  # Q, kw
        return (rows[:, :, None] * w + cols[:, None, :]).reshape(len(qi), -1)


@dataclass(frozen=True)
class KeptBranch:
    """The chain from a convolution's output ``start`` to the next convolution's
    output ``source`` (see the module docstring)."""

    start: str  # the deepest convolution's output
    source: str  # M's output: its residual comes from the dense pass
    conv: str  # M's node name
    conv_geometry: ConvGeometry  # M's geometry on its input
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
        pools = [s for s in self.steps if s.op == "MaxPool"]
        if not pools:
            keep = kept_positions(rng, h * w, count)
            return (np.arange(h * w) if keep is None else keep), h * w
        pool = pools[0]  # the steps before it keep the grid
        (kh, kw), (oh, ow) = pool.window, pool.pooled
        wanted = max(1, -(-2 * count // (kh * kw)))
        picked = rng.choice(oh * ow, size=min(wanted, oh * ow), replace=False)
        keep = np.sort(pool.window_taps(picked // ow, picked % ow).reshape(-1))
        return keep, oh * ow * kh * kw

    @staticmethod
    def find(plan: Plan, start: str, shapes: Mapping[str, tuple[int, ...]]) -> KeptBranch | None:
        """The branch from ``start`` (a convolution's output), or None where the
        chain has another node, a second reader, a graph output, a pool whose
        windows overlap or a next convolution with strides or groups."""
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
            found = by_input.get(tensor)
            if found is None or readers.get(tensor) != 1 or tensor in outputs:
                return None
            pn = found
            if tensor not in shapes or len(shapes[tensor]) != 4 or pn.data_inputs != (0,):
                return None
            grid = (int(shapes[tensor][2]), int(shapes[tensor][3]))
            view = pn.view
            if pn.op == "Conv":
                g = ConvRule().geometry(view, shapes[tensor])
                if g.group != 1 or tuple(g.strides) != (1, 1) or 1 not in pn.static_names:
                    return None
                return KeptBranch(start, pn.outputs[0], pn.name, g, grid, tuple(steps))
            if pn.op in ("Relu", "LeakyRelu"):
                alpha = float(view.attr("alpha", 0.01)) if pn.op == "LeakyRelu" else 0.0
                if pn.op == "LeakyRelu" and alpha <= 0:
                    return None
                steps.append(_Step(pn.op, pn.name, pn.outputs[0], grid, alpha=alpha))
            elif pn.op == "BatchNormalization":
                if len([o for o in pn.outputs if o]) != 1 or view.attr("training_mode", 0):
                    return None
                steps.append(_Step(pn.op, pn.name, "", grid))
            elif pn.op in PASS_THROUGH:
                steps.append(_Step(pn.op, pn.name, "", grid))
            elif pn.op == "MaxPool":
                if int(view.attr("storage_order", 0)):
                    return None
                g = pool_geometry(view, shapes[tensor])
                disjoint = (all(k <= s for k, s in zip(g.kernel, g.strides, strict=True))
                            and not any(g.pads) and tuple(g.dilations) == (1, 1))
                if not disjoint:
                    return None
                pooled = g.out_size(*grid)
                steps.append(_Step(pn.op, pn.name, tensor, grid, g.kernel, g.strides, pooled))
            else:
                return None
            tensor = pn.outputs[0]

    def residual(
        self, acts: Mapping[str, Array], r_source: Array, views: Mapping[str, NodeView],
        keep: np.ndarray,
    ) -> Array:
        """``-dL/d start`` at the flat positions ``keep`` of its grid: (N, C, len(keep)),
        from the dense residual ``r_source`` at M's output (N, O, H', W')."""
        xp = xp_of(r_source)
        # forward: where each kept position lands, step by step
        pos, valid = np.asarray(keep, np.int64), np.ones(len(keep), bool)
        trail = []  # (step, positions on its input grid, whether they lie in a window)
        for step in self.steps:
            if step.op != "MaxPool":
                trail.append((step, pos, valid))
                continue
            width = step.grid[1]
            (sh, sw), (oh, ow) = step.stride, step.pooled
            i, j = pos // width, pos % width
            qi, qj = i // sh, j // sw
            # past the last whole window, or between windows (kernel < stride)
            valid = valid & (qi < oh) & (qj < ow)
            valid &= (i - qi * sh < step.window[0]) & (j - qj * sw < step.window[1])
            trail.append((step, pos, valid))
            pos = np.minimum(qi, oh - 1) * ow + np.minimum(qj, ow - 1)
        # backward: M's adjoint at the landed positions, then the chain in reverse
        w = xp.asarray(views[self.conv].const(1), dtype=r_source.dtype)  # (O, C, kh, kw)
        g = self.conv_geometry
        transposed = ConvGeometry(g.kernel, (1, 1), g.dilations, g.adjoint_pads())
        c = w.shape[1]
        n = r_source.shape[0]
        # positions that share a window land on one position of M's input: one row each
        landed, spread = np.unique(pos, return_inverse=True)
        patches = gather_patches(r_source, transposed, landed, self.conv_grid)  # N, U, O, k k
        flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)  # C, (O k k)
        r = (patches.reshape(n * len(landed), -1) @ flipped.T).reshape(n, len(landed), c)
        r = xp.take(r.transpose(0, 2, 1), xp.asarray(spread.reshape(-1)), axis=2)  # N, C, P
        for step, at, inside in reversed(trail):
            if step.op == "MaxPool":
                r = r * xp.asarray(inside, dtype=r.dtype) * self._first_max(
                    acts[step.tensor], step, at)
            elif step.op in ("Relu", "LeakyRelu"):
                o0 = xp.take(acts[step.tensor].reshape(n, acts[step.tensor].shape[1], -1),
                             xp.asarray(at), axis=2)
                r = r * (o0 > 0) if step.op == "Relu" else xp.where(o0 >= 0, r, step.alpha * r)
            elif step.op == "BatchNormalization":
                view = views[step.node]
                gamma, var = (xp.asarray(view.const(i), dtype=xp.float64) for i in (1, 4))
                scale = gamma / xp.sqrt(var + float(view.attr("epsilon", 1e-5)))
                r = r * scale.astype(r.dtype)[None, :, None]
        return r

    @staticmethod
    def _first_max(x: Array, step: _Step, pos: np.ndarray) -> Array:
        """1 where the position ``pos`` (flat, on the pool's input grid) is the first
        maximum of its window, per sample and channel: (N, C, P). The window's
        taps are gathered at once and reduced slice by slice (an ``argmax`` over
        windows of 4 took twice as long)."""
        xp = xp_of(x)
        (kh, kw), (sh, sw), width = step.window, step.stride, step.grid[1]
        i, j = pos // width, pos % width
        qi, qj = i // sh, j // sw
        # one reduction per window, however many kept positions lie in it
        _, first_in, spread = np.unique(
            qi * (width + 1) + qj, return_index=True, return_inverse=True)
        taps = step.window_taps(qi[first_in], qj[first_in]).T  # K, Q
        n, c = x.shape[:2]
        offsets = np.arange(c)[:, None, None] * (x.shape[2] * x.shape[3]) + taps  # C, K, Q
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
