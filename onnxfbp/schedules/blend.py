"""The blend back toward the input model: the least of the change that keeps its gain.

After the schedule, every changed initializer ``W1`` is blended with its input
value ``W0`` along the straight line between them (weight-space interpolation,
as in WiSE-FT, Wortsman et al. 2022):

    W(a) = W0 + a (W1 - W0),   a in blend_grid and 1.

Each part of the change costs the original domain, and the held-out split of the
new data cannot see that cost, so the rule is the least change that the full one
does not clearly beat: the smallest ``a`` whose held-out predictions lose to
those of the best blend by less than the sign test of
:func:`onnxfbp.fit.head.no_clear_win` (the exact one-sided sign test at
``min_z`` standard errors), and that still beats the input model's held-out
score.

With retain data, a blend counts only if it keeps the retain bound
(:class:`Retain`), and the minibatch schedule's best held-out weights
regardless of that bound (``RunContext.unbound``) are blended too: where every step of the schedule
broke the bound, some fraction of its best change may keep it.

Classifiers only (the sign test counts samples right and wrong); the other tasks
keep the schedule's result as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..events import Message
from ..fit.head import no_clear_win
from ..output.results import LayerReport
from .state import ModelState, RunContext, Score

__all__ = ["Blend", "blend_back", "choose"]


@dataclass
class Blend:
    """One candidate: ``a`` of the change toward ``source`` (kept / unbound)."""

    source: str
    a: float
    loss: float
    correct: int
    preds: np.ndarray
    values: dict[str, np.ndarray]

    def beats(self, other: Blend) -> bool:
        return Score(other.loss, other.correct).better(self.loss, self.correct, commit=False)


def _candidates(state: ModelState, ctx: RunContext, source: str,
                end: dict[str, np.ndarray], grid: list[float]) -> list[Blend]:
    """The blends toward ``end`` that keep the retain bound (all, without retain data)."""
    start = state.original
    changed = [k for k in end if not np.array_equal(end[k], start[k])]
    if not changed:
        return []
    out = []
    for a in grid:
        values = dict(end)
        for k in changed:
            values[k] = state.quant.project(k, (start[k] + a * (end[k] - start[k])).astype(
                start[k].dtype))
        state.values = values
        loss, correct, preds = state.scores(ctx.data, ctx.val_idx)
        if np.isfinite(loss) and (ctx.retain is None or ctx.retain.holds(state, ctx.data)):
            out.append(Blend(source, a, loss, correct, preds, values))
    return out


def blend_back(state: ModelState, ctx: RunContext, before: Score) -> Blend | None:
    """Blend the schedule's change back toward the input weights (see the module
    doc); leaves the chosen blend in ``state.values``, ``ctx.score`` and
    ``ctx.blend`` and returns it (None: the schedule's result stays as it is)."""
    grid = sorted({float(a) for a in state.config.retain.blend_grid if 0 < a < 1} | {1.0})
    if len(grid) == 1 or not state.task.classification:
        return None
    kept = dict(state.values)
    found = _candidates(state, ctx, "kept", kept, grid)
    if ctx.unbound is not None:
        found += _candidates(state, ctx, "unbound", ctx.unbound, grid)
    state.values = kept
    picked = choose(found, _input(before), ctx.data.labels(ctx.val_idx), state.config.head.min_z)
    if picked is None:
        return None
    chosen, best = picked
    if chosen.source == "kept" and chosen.a == 1.0:
        return None
    state.values = chosen.values
    ctx.score = Score(chosen.loss, chosen.correct)
    _report(state, ctx, chosen, best)
    return chosen


def choose(found: list[Blend], before: Blend, y: np.ndarray,
           min_z: float) -> tuple[Blend, Blend] | None:
    """``(chosen, best)`` among the blends ``found`` that beat ``before``: ``best``
    the highest held-out score, ``chosen`` the smallest ``a`` of its source that
    ``best`` does not clearly beat on labels ``y``; None if none beats ``before``."""
    better = [b for b in found if b.beats(before)]
    if not better:
        return None
    best = better[0]
    for b in better[1:]:
        if b.beats(best):
            best = b
    chosen = min((b for b in better if b.source == best.source
                  and (b is best or no_clear_win(b.preds, best.preds, y, min_z))),
                 key=lambda b: b.a)
    return chosen, best


def _input(before: Score) -> Blend:
    return Blend("input", 0.0, before.loss, before.correct, np.zeros(0), {})


def _report(state: ModelState, ctx: RunContext, chosen: Blend, best: Blend) -> None:
    """Say what the blend kept, per changed layer and in one line."""
    n = len(ctx.val_idx)
    what = ("of the change" if chosen.source == "kept"
            else "of the best change regardless of the retain bound")
    line = (f"blend: {chosen.a:g} {what} kept (held-out {chosen.correct / n:.4f}; "
            f"the best blend, {best.a:g}, {best.correct / n:.4f} does not win clearly)"
            if chosen is not best else
            f"blend: {chosen.a:g} {what} kept (held-out {chosen.correct / n:.4f})")
    ctx.progress(Message(line))
    ctx.blend = {"a": chosen.a, "of": chosen.source, "heldout_accuracy": chosen.correct / n,
                 "best_a": best.a, "best_heldout_accuracy": best.correct / n}
    for layer in state.layers:
        init = layer.weight.initializer
        w0, w1 = state.original[init], chosen.values[init]
        if np.array_equal(w0, w1):
            continue
        change = float(np.linalg.norm(w1 - w0)) / max(float(np.linalg.norm(w0)), 1e-12)
        ctx.reports.append(LayerReport(
            sweep=0, name=layer.name, op=layer.op, weight_shape=list(w0.shape), accepted=True,
            reason=line, relative_change=change, heldout_accuracy=chosen.correct / n,
            outcome="kept"))
