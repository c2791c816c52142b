"""Normal equations of the refined layers against label targets, and their
ridge solves (the jacobi and sequential sweeps).

One streamed pass (:func:`accumulate`) sets the label target
``t = z + target_step (onehot - softmax z)`` on the logits, carries it back to
every layer's output through the inverse rules, and adds each layer's rows to
its normal equations, for the training and the held-out split apart.
:func:`solve_layer` then solves ``W = argmin ||X W - T||^2 + lam ||W - W0||^2``
for a grid of ``lam`` and keeps the one with the lowest held-out residual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..data import LabelledData
from ..graph.plan import Layer
from ..output.results import LayerReport
from ..reverse.arrays import reverse
from ..run.backend import to_numpy
from ..schedules.state import ModelState, RunContext
from .layers import LayerBlock
from .solve import NormalEquations, RidgeChoice, choose_ridge

__all__ = ["LayerSums", "RidgeMemory", "accumulate", "add_rows", "new_sums", "solve_layer"]


@dataclass
class LayerSums:
    """One layer's block, starting weights and streamed sums (train, held-out)."""

    block: LayerBlock
    w0: np.ndarray
    train: NormalEquations
    val: NormalEquations


class RidgeMemory:
    """The ``lam`` each layer chose last: later sweeps search around it."""

    def __init__(self) -> None:
        self.chosen: dict[str, float] = {}

    def grid(self, layer: Layer, d: int, first: tuple[float, ...]) -> tuple[float, ...]:
        previous = self.chosen.get(layer.name)
        if previous is None and d > 1024:  # a large Gram: each Cholesky costs seconds
            return tuple(sorted(first)[-2:])
        if previous is None:
            return first
        if d > 1024:  # one Cholesky of a large Gram costs seconds: keep the choice
            return (previous,)
        return (previous / 4, previous, previous * 4)


def accumulate(
    state: ModelState,
    ctx: RunContext,
    layers: list[Layer],
    downstream: dict[str, list[int]],
) -> dict[str, LayerSums]:
    """One streamed pass: normal equations of every layer in ``layers`` against
    targets carried back from the labels through the current weights (paths:
    ``downstream``). A state that computes them elsewhere (``cluster_sums``: the
    shards of a Dask cluster, :mod:`onnxfbp.cluster`) returns the same sums."""
    on_cluster = getattr(state, "cluster_sums", None)
    if on_cluster is not None:
        return on_cluster(ctx, layers, downstream)
    stats = new_sums(state, layers)
    add_rows(state, stats, layers, downstream,
             [(0, ctx.data, ctx.train_idx), (1, ctx.data, ctx.val_idx)], ctx.rng)
    return stats


def new_sums(state: ModelState, layers: list[Layer]) -> dict[str, LayerSums]:
    """Empty sums of ``layers`` at the current weights."""
    xp = state.xp
    views = state.views()
    stats: dict[str, LayerSums] = {}
    for layer in layers:
        block = state.block(layer, views)
        w0 = block.weights()
        g, d, k = w0.shape
        stats[layer.name] = LayerSums(
            block, w0, NormalEquations(g, d, k, xp), NormalEquations(g, d, k, xp)
        )
    return stats


def add_rows(
    state: ModelState,
    stats: dict[str, LayerSums],
    layers: list[Layer],
    downstream: dict[str, list[int]],
    splits: list[tuple[int, LabelledData, np.ndarray]],
    rng: np.random.Generator,
) -> None:
    """Add the rows of the samples ``idx`` of each ``(split, data, idx)`` (0:
    training, 1: held-out) to ``stats``, batch by batch."""
    cfg = state.config.sweep
    views = state.views()
    path, needed = state.reverse_plan(layers, downstream)
    ft = time.perf_counter()
    for split, data, split_idx in splits:
        for x, y in data.batches(split_idx, state.config.run.batch_size):
            acts = state.forward(x, needed, on_device=True)
            t_logits = state.label_target(acts, y, cfg.target_step)
            sums, counts = reverse(state.plan, acts, t_logits, path, views, cfg.mu)
            for layer in layers:
                if layer.output not in sums:
                    raise RuntimeError(f"no target reached {layer.output}")
                target = acts[layer.output] + sums[layer.output] / counts[layer.output]
                st = stats[layer.name]
                rows, trows = st.block.rows(acts[layer.input], target, rng, cfg.positions)
                (st.train if split == 0 else st.val).add(rows, trows)
    state.clock.forward += time.perf_counter() - ft


def _report(sweep: int, layer: Layer, st: LayerSums, choice: RidgeChoice,
            new_w: np.ndarray) -> LayerReport:
    per_row = max(st.val.rows, 1)
    return LayerReport(
        sweep=sweep,
        name=layer.name,
        op=layer.op,
        weight_shape=list(np.asarray(st.block.view.const(1)).shape),
        accepted=False,
        reason="",
        lam=None if choice.lam == float("inf") else choice.lam,
        relative_change=float(
            np.linalg.norm(new_w - st.w0) / max(float(np.linalg.norm(st.w0)), 1e-12)
        ),
        residual_before=choice.residual_before / per_row,
        residual_after=choice.residual / per_row,
    )


def solve_layer(
    state: ModelState, memory: RidgeMemory, sweep: int, layer: Layer, st: LayerSums
) -> tuple[np.ndarray | None, LayerReport]:
    """Solve one layer; the new weights (None if not finite) and its report."""
    started = time.perf_counter()
    grid = memory.grid(layer, st.w0.shape[1], state.config.sweep.ridge_grid)
    choice = choose_ridge(st.train, st.val, state.xp.asarray(st.w0), grid)
    if choice.lam != float("inf"):
        memory.chosen[layer.name] = choice.lam
    state.clock.solve += time.perf_counter() - started
    new_w = to_numpy(choice.weights)
    report = _report(sweep, layer, st, choice, new_w)
    if choice.lam == float("inf") or not np.isfinite(new_w).all():
        report.reason = f"no finite solution ({choice.why or 'non-finite weights'}); " \
            "layer left unchanged"
        report.outcome = "skipped"
        return None, report
    return new_w, report
