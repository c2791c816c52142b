"""Full-pass sweeps: least-squares solves of the refined layers against label
targets carried back through the inverse rules (:mod:`onnxfbp.fit.normal`).

- ``sequential``: back to front, one layer per pass; each sees the updates after it;
- ``jacobi``: all layers from one pass; the joint update is scaled by the best of
  a few step sizes on held-out data.

Either way an update is kept only if the held-out score improves; sweeps repeat
while one gains at least ``min_sweep_gain`` held-out accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..fit.normal import LayerSums, RidgeMemory, accumulate, solve_layer
from ..graph.plan import Layer
from ..output.results import LayerReport
from .state import ModelState, RunContext, nodes_after

__all__ = ["Sweeps", "run_sweeps", "sweepable"]


@dataclass
class Sweeps:
    """The layers a sweep visits and the path nodes to each (``downstream``)."""

    layers: list[Layer]
    downstream: dict[str, list[int]]


def sweepable(state: ModelState, layer: Layer) -> bool:
    """A dense layer with at most ``sweep_max_inputs`` inputs whose target reaches
    it without a Conv inverse, through inverse rules only, and whose weight no
    other layer reads: worth a full-pass sweep after the minibatch run."""
    if layer.kind != "dense" or layer.shared \
            or nodes_after(state.plan, layer.output, False, True) is None:
        return False
    return state.block(layer).weights().shape[1] <= state.config.minibatch.sweep_max_inputs


def narrow_sweeps(state: ModelState) -> Sweeps:
    """The sweepable layers, their targets carried back without Conv inverses."""
    narrow = [layer for layer in state.layers if sweepable(state, layer)]
    return Sweeps(narrow, {
        layer.name: nodes_after(state.plan, layer.output, False, True) or [] for layer in narrow
    })


def run_sweeps(state: ModelState, ctx: RunContext, first: int, sweeps: Sweeps) -> None:
    """Up to ``sweeps`` full-pass sweeps over ``sweeps.layers`` (jacobi or
    sequential), numbered from ``first``; stop when one stops paying."""
    cfg = state.config.sweep
    memory = RidgeMemory()
    for k in range(cfg.sweeps):
        correct_before = ctx.score.correct
        if state.config.schedule == "sequential":
            improved = _sequential(state, ctx, memory, first + k, sweeps)
        else:
            improved = _jacobi(state, ctx, memory, first + k, sweeps)
        gain = (ctx.score.correct - correct_before) / len(ctx.val_idx)
        if not improved or (k > 0 and gain < cfg.min_sweep_gain):
            break  # converged: another sweep costs a full pass for (almost) nothing


def _sequential(
    state: ModelState, ctx: RunContext, memory: RidgeMemory, sweep: int, sweeps: Sweeps
) -> bool:
    """Back to front, one layer at a time; each sees the updates after it."""
    improved = False
    for layer in sweeps.layers:
        started = time.perf_counter()
        st = accumulate(state, ctx, [layer], sweeps.downstream)[layer.name]
        new_w, report = solve_layer(state, memory, sweep, layer, st)
        if new_w is not None:
            saved = dict(state.values)
            state.set_weights(layer, st.block, new_w)
            loss, correct, _ = state.scores(ctx.data, ctx.val_idx)
            if ctx.accept(state, loss, correct):
                report.accepted, report.reason = True, "held-out score improved"
                report.outcome = "kept"
                improved = True
            else:
                state.values = saved
                report.reason = "held-out score did not improve; reverted"
                report.outcome = "reverted"
            report.heldout_accuracy = state.task.accuracy(correct, len(ctx.val_idx))
        report.seconds = time.perf_counter() - started
        ctx.record(report)
    return improved


Solved = tuple[Layer, LayerSums, np.ndarray, LayerReport]


def _apply(state: ModelState, members: list[Solved], alpha: float) -> None:
    for layer, st, new_w, _ in members:
        state.set_weights(layer, st.block, st.w0 + alpha * (new_w - st.w0))


def _jacobi(
    state: ModelState, ctx: RunContext, memory: RidgeMemory, sweep: int, sweeps: Sweeps
) -> bool:
    """All layers from one pass; the joint update is scaled by the best of a few
    step sizes on held-out data, and kept only if it improves."""
    started = time.perf_counter()
    layers = sweeps.layers
    stats = accumulate(state, ctx, layers, sweeps.downstream)
    solved: list[Solved] = []
    for layer in layers:
        st = stats[layer.name]
        new_w, report = solve_layer(state, memory, sweep, layer, st)
        if new_w is not None:
            solved.append((layer, st, new_w, report))
        ctx.reports.append(report)
    saved = dict(state.values)
    # Candidates: the joint update at each step size, and the output layer alone
    # (deep updates sometimes hurt where the head alone helps).
    candidates: list[tuple[str, float, list[Solved]]] = [
        (f"joint update kept at step {alpha}", alpha, solved)
        for alpha in state.config.sweep.jacobi_steps
    ]
    if len(solved) > 1 and solved[0][0] is layers[0]:
        candidates.append(("output layer alone kept", 1.0, solved[:1]))
    best: tuple[int, float, int] | None = None
    for k, (_, alpha, members) in enumerate(candidates):
        state.values = dict(saved)
        _apply(state, members, alpha)
        loss, correct, _ = state.scores(ctx.data, ctx.val_idx)
        if ctx.accept(state, loss, correct, commit=False) and (
            best is None or correct > best[2] or (correct == best[2] and loss < best[1])
        ):
            best = (k, loss, correct)
    state.values = dict(saved)
    if best is not None:
        k, loss, correct = best
        reason, alpha, members = candidates[k]
        _apply(state, members, alpha)
        for *_, report in members:
            report.accepted, report.reason, report.outcome = True, reason, "kept"
            report.heldout_accuracy = state.task.accuracy(correct, len(ctx.val_idx))
        ctx.score.better(loss, correct)
    for *_, report in solved:
        if not report.accepted:
            report.reason = "not part of the kept update; reverted"
            report.outcome = "reverted"
        report.seconds = (time.perf_counter() - started) / max(len(layers), 1)
        ctx.announce(report)
    return best is not None
