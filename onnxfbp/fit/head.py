"""The output layer to the L2-regularized cross-entropy optimum.

:func:`logistic_path` is the solve; :func:`polish_head` fits it on the training
split and judges it on the held-out split; :func:`head_cross_validated` chooses
its ``lam`` by k-fold cross-validation when too few samples are held out to
steer by.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import stats

from ..data import LabelledData
from ..output.results import EvalResult, LayerReport
from ..run.backend import to_numpy
from ..schedules.state import ModelState, RunContext, Score
from .layers import LayerBlock
from .solve import NonFiniteError, require_finite, spd_inverse
from .targets import cross_entropy

__all__ = ["head_cross_validated", "logistic_path", "polish_head"]

# Seeds are salted: a user who draws their data's augmentations with
# default_rng(seed) and refines with the same seed would otherwise get a held-out
# split that is a function of those draws.
SEED_SALT = 0x0F8B
_SHAPE_ONLY = {"Reshape", "Flatten", "Identity", "Squeeze", "Dropout"}


def logistic_path(
    x: np.ndarray,
    y: np.ndarray,
    w0: np.ndarray,
    fixed: Any,
    grid: tuple[float, ...],
    iterations: int,
    xp: Any = np,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(lam_rel, W)`` for each ``lam_rel`` of ``grid``, strongest first:

        W = argmin sum CE(softmax(x W + fixed), y) + c lam ||W - W0||^2,
        lam = lam_rel mean diag(x^T x)

    by the bound-optimization iteration for multinomial logistic regression
    (Bohning: the softmax Hessian is at most I/2), one inverse per ``lam``:

        W <- argmin ||x W - (x W + 2 (Y - softmax(x W)))||^2 + lam ||W - W0||^2
           = (G + lam I)^-1 (G W + 2 x^T (Y - softmax(x W + fixed)) + lam W0)

    with ``G = x^T x``. The scores are kept transposed, classes by samples, so
    that the softmax's max and sum run across rows of samples.

    Each ``lam`` starts from the previous optimum and stops once the weights
    settle; a ``lam`` whose iteration is not finite is skipped. The Gram, its
    inverse and the weights are float64; the scores and probabilities of each
    iteration float32. The iteration runs in ``xp`` (CuPy on a GPU); ``W`` is
    yielded as a NumPy array. Features or weights that are not finite raise
    :class:`NonFiniteError` before anything is factored."""
    x = xp.asarray(x, dtype=xp.float32)  # once (one copy to a GPU): each product reads it
    x_t = xp.ascontiguousarray(x.T)
    gram = (x_t @ x).astype(xp.float64)
    require_finite(gram, "the output layer's input features")  # also catches overflow
    require_finite(xp.asarray(w0), "the output layer's weights")
    fixed32 = xp.asarray(fixed, dtype=xp.float32)
    fixed32 = fixed32.reshape(-1, 1) if fixed32.ndim else fixed32  # per class: a column
    scale = float(xp.mean(xp.diag(gram))) or 1.0
    onehot_t = xp.ascontiguousarray(xp.eye(w0.shape[1], dtype=xp.float32)[xp.asarray(y)].T)
    w_start = xp.asarray(w0, dtype=xp.float64)
    w = w_start.copy()
    for lam_rel in sorted(grid, reverse=True):
        lam = lam_rel * scale
        inverse = spd_inverse(gram + lam * xp.eye(len(gram)))
        for _ in range(iterations):
            p = w.T.astype(xp.float32) @ x_t  # scores, classes x samples
            p += fixed32
            p -= p.max(axis=0)
            xp.exp(p, out=p)
            p /= p.sum(axis=0)
            xp.subtract(onehot_t, p, out=p)  # (Y - softmax)^T
            pull = (p @ x).T.astype(xp.float64)
            w_next = inverse @ (gram @ w + 2.0 * pull + lam * w_start)
            settled = float(xp.abs(w_next - w).max()) <= 1e-4 * (1.0 + float(xp.abs(w).max()))
            w = w_next
            if settled or not bool(xp.isfinite(w).all()):
                break
        if not bool(xp.isfinite(w).all()):
            w = w_start.copy()
            continue
        yield lam_rel, to_numpy(w)


def head_features(
    state: ModelState, data: LabelledData, splits: list[np.ndarray]
) -> tuple[LayerBlock, np.ndarray, Any, list[np.ndarray]] | None:
    """The output layer's block, current weights ``W0`` (d [+1], k), fixed bias,
    and its input features (a column of ones for the bias) for each index set
    of ``splits``. None unless it is a dense layer on per-sample features that
    feeds the logits through shape-only nodes and whose weight no other layer reads."""
    head = state.layers[0]
    ops = dict((name, op) for name, op, _ in state.plan.all_nodes)
    # an activation Q/DQ pair (planned as Clip under the DequantizeLinear's name)
    # rounds the logits only: the fit is made on the float logits
    if head.kind != "dense" or head.shared or any(
        state.plan.nodes[i].op not in _SHAPE_ONLY
        and ops.get(state.plan.nodes[i].name) != "DequantizeLinear"
        for i in state.downstream[head.name]
    ):
        return None
    started = time.perf_counter()
    block = state.block(head)
    w0 = block.weights()[0]
    on_cluster = getattr(state, "cluster_features", None)  # the shards of a Dask cluster
    feats = [on_cluster(data, idx, head.input, block.has_bias_row) if on_cluster
             else features(state, data, idx, head.input, block.has_bias_row) for idx in splits]
    feats = [f if len(f) else np.zeros((0, w0.shape[0]), np.float32) for f in feats]
    state.clock.forward += time.perf_counter() - started
    if any(f.shape[1] != w0.shape[0] for f in feats):  # leading axes beyond the batch
        return None
    fixed = 0.0 if block.fixed_bias is None else np.asarray(block.fixed_bias)
    return block, w0, fixed, feats


def features(state: ModelState, data: LabelledData, idx: np.ndarray, name: str,
             bias_column: bool) -> np.ndarray:
    """The tensor ``name`` of the samples ``data[idx]``, one float32 row per sample
    (with ``bias_column``, a column of ones appended); (0, 0) for no sample."""
    forward = state.frozen_forward([name])
    parts = []
    for x, _ in data.batches(idx, state.config.run.batch_size):
        h = forward(x)[name].reshape(len(x), -1).astype(np.float32)
        if bias_column:
            h = np.concatenate([h, np.ones((len(h), 1), np.float32)], axis=1)
        parts.append(h)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def head_report(block: LayerBlock, w0: np.ndarray, w: np.ndarray, lam: float) -> LayerReport:
    """The output layer's report for the solve ``W0 -> W`` with ``lam`` (sweep 0)."""
    layer = block.layer
    return LayerReport(
        sweep=0, name=layer.name, op=layer.op,
        weight_shape=list(np.asarray(block.view.const(1)).shape),
        accepted=False, reason="", lam=lam, outcome="reverted",
        relative_change=float(
            np.linalg.norm(w - w0) / max(float(np.linalg.norm(w0)), 1e-12)),
        residual_before=float("nan"), residual_after=float("nan"),
    )


def _skipped(ctx: RunContext, block: LayerBlock, w0: np.ndarray, why: str,
             started: float) -> None:
    """Record the output layer left unchanged because ``why`` (no solve ran)."""
    report = head_report(block, w0[None], w0[None], float("nan"))
    report.lam, report.outcome = None, "skipped"
    report.reason = f"output layer left unchanged: {why}"
    report.seconds = time.perf_counter() - started
    ctx.record(report)


def _capped(idx: np.ndarray, cap: int, pick: np.random.Generator) -> np.ndarray:
    return np.sort(pick.choice(idx, cap, replace=False)) if len(idx) > cap else idx


def polish_head(state: ModelState, ctx: RunContext) -> tuple[bool, EvalResult | None]:
    """Refine the dense output layer to the L2-regularized cross-entropy optimum
    (:func:`logistic_path` on its input features, computed once: only it changes).

    ``lam`` is chosen by held-out cross-entropy among those that keep the retain
    constraint (:meth:`RunContext.accept`, with retain data). The solve jumps to an
    optimum of the new data, and every move away from the input weights costs the
    original domain, so it is kept only if it wins clearly on the held-out split
    (:func:`no_clear_win`) and the held-out score improves; then (``refit``)
    refitted on training and held-out samples together. Returns whether it ran
    (False: not a dense layer feeding the logits through shape-only nodes, or no
    ``lam`` keeps the retain bound) and, after a refit, the held-out result of
    the fit that did not see the held-out samples."""
    if not state.task.classification:
        return _least_squares_head(state, ctx), None
    cfg = state.config.head
    started = time.perf_counter()
    train_idx, val_idx = ctx.train_idx, ctx.val_idx
    # refit with the held-out split only if it is apart from train (tiny data judges
    # on train) and whole (its score before the refit is then the reported one)
    refittable = not np.array_equal(train_idx, val_idx) and len(val_idx) <= cfg.max_rows
    pick = np.random.default_rng([state.config.split.seed, SEED_SALT, 1])
    train_idx = _capped(train_idx, cfg.max_rows, pick)
    val_idx = _capped(val_idx, cfg.max_rows, pick)
    retain = ctx.retain
    splits = [train_idx, val_idx] + ([retain.idx] if retain is not None else [])
    found = head_features(state, ctx.data, splits)
    if found is None:
        return False, None
    block, w0, fixed, (xtr, xva, *xre) = found
    ytr, yva = ctx.data.labels(train_idx), ctx.data.labels(val_idx)

    def retain_preds(w: np.ndarray) -> np.ndarray:
        return (xre[0] @ w + fixed).argmax(axis=1)

    solving = time.perf_counter()
    best: tuple[float, int, np.ndarray, float] | None = None
    solved = None  # the first finite solve, for the report when no lam keeps the retain bound
    try:
        require_finite(xva, "the output layer's held-out input features")
        for lam_rel, w in logistic_path(xtr, ytr, w0, fixed, cfg.l2_grid, cfg.iterations,
                                        state.xp):
            loss, correct = cross_entropy(xva @ w + fixed, yva)
            solved = solved or (lam_rel, w, correct)
            kept = retain is None or retain.kept(retain_preds(w))
            if kept and (best is None or loss < best[0]):
                best = (loss, correct, w, lam_rel)
    except NonFiniteError as err:
        state.clock.solve += time.perf_counter() - solving
        _skipped(ctx, block, w0, str(err), started)
        return True, None
    state.clock.solve += time.perf_counter() - solving
    if best is None and solved is not None:
        lam_rel, w, correct = solved
        report = head_report(block, w0[None], w[None], lam_rel)
        report.heldout_accuracy = correct / len(yva)
        report.reason = ("output layer solved to the logistic-regression optimum; no lam keeps "
                         "the retain accuracy within max_retain_drop; reverted")
        report.seconds = time.perf_counter() - started
        ctx.record(report)
        return False, None
    if best is None:
        return False, None
    loss, correct, w, lam_rel = best
    judged = ((xva @ w0 + fixed).argmax(axis=1), (xva @ w + fixed).argmax(axis=1), yva)
    if len(val_idx) < len(ctx.val_idx):
        # the solve saw a subset of the held-out split: judge it on the whole split,
        # as every other update is (the best score so far is a whole-split count)
        preds_before = state.scores(ctx.data, ctx.val_idx)[2]
        state.set_weights(block.layer, block, w[None])
        loss, correct, preds_after = state.scores(ctx.data, ctx.val_idx)
        state.set_weights(block.layer, block, w0[None])
        judged = (preds_before, preds_after, ctx.data.labels(ctx.val_idx))
    report = head_report(block, w0[None], w[None], lam_rel)
    report.heldout_accuracy = correct / len(judged[2])
    report.reason = "output layer solved to the logistic-regression optimum; "
    estimate = None
    shortfall = no_clear_win(*judged, cfg.min_z)
    if shortfall:
        report.reason += shortfall
    elif ctx.accept(state, loss, correct,
                    retain_preds=retain_preds(w) if retain is not None else None):
        report.accepted, report.reason, report.outcome = True, report.reason + "kept", "kept"
        if cfg.refit and refittable:
            # lam chosen, the held-out samples join the fit (as a CV refit does);
            # the reported held-out score stays that of the fit without them.
            # (The retain held-out samples stay out: the refit must keep them.)
            refit = [w_all for _, w_all in logistic_path(
                np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), w0, fixed,
                (lam_rel,), cfg.iterations, state.xp)]
            if refit and (retain is None or retain.kept(retain_preds(refit[0]))):
                estimate = state.result(loss, correct, (xva @ w + fixed).argmax(axis=1), yva)
                w = refit[0]
                report.reason += f", then refitted on all {len(ytr) + len(yva)} samples"
        state.set_weights(block.layer, block, w[None])
    else:
        report.reason += "held-out score did not improve; reverted"
    report.seconds = time.perf_counter() - started
    ctx.record(report)
    return True, estimate


def no_clear_win(before: np.ndarray, after: np.ndarray, y: np.ndarray, min_z: float) -> str:
    """Why predictions ``after`` do not clearly beat ``before`` on labels ``y``; ""
    if they do. ``wins``: samples right after and wrong before, ``losses`` the
    other way round; under no difference ``wins`` is Binomial(wins + losses, 1/2),
    and a clear win is one as unlikely as ``min_z`` standard errors of a normal,
    ``P(X >= wins) <= Phi(-min_z)`` (the exact one-sided sign test: its normal
    approximation, ``wins - losses >= min_z sqrt(wins + losses)``, lets 2 wins
    and no loss pass at ``min_z`` 1, a chance of 1 in 4)."""
    right_before, right_after = np.asarray(before) == y, np.asarray(after) == y
    wins = int((right_after & ~right_before).sum())
    losses = int((right_before & ~right_after).sum())
    p_max = float(stats.norm.sf(min_z))
    p = float(stats.binom.sf(wins - 1, wins + losses, 0.5)) if wins else 1.0
    if wins > losses and p <= p_max:
        return ""
    return (f"held-out: {wins} samples won, {losses} lost against the current model "
            f"(sign test p {p:.3g}, above {p_max:.3g}: {min_z:g} standard errors); reverted")


def head_cross_validated(
    state: ModelState, ctx: RunContext
) -> tuple[EvalResult, EvalResult] | None:
    """The output layer's logistic-regression optimum (see :func:`logistic_path`)
    with ``lam`` chosen by ``folds``-fold cross-validation on all samples, then
    refitted on all of them. Returns the input model's result on the samples and
    the out-of-fold result of the chosen ``lam`` (each sample predicted by a fit
    that did not see it); the new weights are kept only if the latter is better.
    None if the output layer is not a dense layer on per-sample features."""
    if not state.task.classification:
        return None  # the held-out path (polish_head) serves the other tasks
    cfg = state.config.head
    data, xp = ctx.data, state.xp
    idx = np.arange(len(data))
    found = head_features(state, data, [idx])
    if found is None:
        return None
    block, w0, fixed, (feats,) = found
    if not bool(np.isfinite(feats).all()):
        # the held-out path reports the skip (polish_head): no solve reaches LAPACK
        return None
    labels = data.labels(idx)
    started = time.perf_counter()
    k = min(cfg.folds, len(idx))
    fold = ctx.rng.permutation(len(idx)) % k
    oof = {lam: np.full((len(idx), w0.shape[1]), np.nan) for lam in cfg.l2_grid}
    try:
        for f in range(k):
            fit, held = fold != f, fold == f
            path = logistic_path(feats[fit], labels[fit], w0, fixed, cfg.l2_grid,
                                 cfg.iterations, xp)
            for lam_rel, w in path:
                oof[lam_rel][held] = feats[held] @ w + fixed
    except NonFiniteError:
        return None  # as above: the held-out path reports it
    scored = {lam: cross_entropy(z, labels) for lam, z in oof.items() if np.isfinite(z).all()}
    z0 = feats @ w0 + fixed
    before = state.result(*cross_entropy(z0, labels), z0.argmax(axis=1), labels)
    state.clock.solve += time.perf_counter() - started
    if not scored:
        return before, before
    lam_best = min(scored, key=lambda lam: scored[lam][0])
    loss, correct = scored[lam_best]
    after = state.result(loss, correct, oof[lam_best].argmax(axis=1), labels)
    final = [w for _, w in logistic_path(
        feats, labels, w0, fixed, (lam_best,), cfg.iterations, xp)]
    w_new = final[0] if final else w0
    report = head_report(block, w0[None], w_new[None], lam_best)
    report.heldout_accuracy = after.accuracy
    report.reason = f"output layer, lam by {k}-fold cross-validation; "
    score = Score(before.loss * len(idx), round(before.accuracy * len(idx)))  # type: ignore[operator]
    if final and score.better(loss, correct):
        state.set_weights(block.layer, block, w_new[None])
        report.accepted, report.reason, report.outcome = True, report.reason + "kept", "kept"
    else:
        report.reason += "out-of-fold score not better; reverted"
        after = before
    report.seconds = time.perf_counter() - started
    ctx.record(report)
    return before, after


def _least_squares_head(state: ModelState, ctx: RunContext) -> bool:
    """A regression output layer under the mse loss (no output activation): the
    proximal least-squares optimum

        W = argmin ||X W + fixed - Y||^2 + lam ||W - W0||^2,  lam = lam_rel mean diag(X^T X)

    for each ``lam_rel`` of ``HeadConfig.l2_grid`` on the training split, the one
    with the lowest held-out loss kept if it beats the best score so far (with
    retain data: the lowest among those that keep the retain bound,
    :meth:`RunContext.accept`). Other
    tasks (and other losses) keep the steps of the schedule: returns False."""
    task = state.task
    if task.kind != "regression" or task.loss != "mse" or task.output_kind != "logits":
        return False
    cfg = state.config.head
    started = time.perf_counter()
    pick = np.random.default_rng([state.config.split.seed, SEED_SALT, 1])
    train_idx = _capped(ctx.train_idx, cfg.max_rows, pick)
    val_idx = _capped(ctx.val_idx, cfg.max_rows, pick)
    found = head_features(state, ctx.data, [train_idx, val_idx])
    if found is None:
        return False
    block, w0, fixed, (xtr, xva) = found
    k = w0.shape[1]
    ytr = ctx.data.labels(train_idx).reshape(len(train_idx), k).astype(np.float64)
    yva = ctx.data.labels(val_idx).reshape(len(val_idx), k).astype(np.float64)
    fixed = np.asarray(to_numpy(fixed), np.float64) if fixed is not None else 0.0
    solving = time.perf_counter()
    try:
        xtr64 = np.asarray(xtr, np.float64)
        gram = xtr64.T @ xtr64
        require_finite(gram, "the output layer's input features")
        require_finite(np.asarray(xva, np.float64), "the output layer's held-out input features")
        rhs = xtr64.T @ (ytr - fixed)
        scale = float(np.mean(np.diag(gram))) or 1.0
        solved: list[tuple[float, np.ndarray, float]] = []
        for lam_rel in sorted(cfg.l2_grid, reverse=True):
            lam = lam_rel * scale
            w = spd_inverse(gram + lam * np.eye(len(gram))) @ (rhs + lam * w0)
            r = np.asarray(xva, np.float64) @ w + fixed - yva
            loss = float(0.5 * (r * r).sum())
            if np.isfinite(loss):
                solved.append((loss, w, lam_rel))
    except NonFiniteError as err:
        state.clock.solve += time.perf_counter() - solving
        _skipped(ctx, block, w0, str(err), started)
        return True
    state.clock.solve += time.perf_counter() - solving
    if not solved:
        return False
    # by held-out loss (ties: the larger lam); the first that keeps the retain bound
    solved.sort(key=lambda c: c[0])
    saved = dict(state.values)
    for chosen in solved:
        loss, w, lam_rel = chosen
        state.set_weights(block.layer, block, w[None])  # the retain bound reads them
        kept = ctx.accept(state, loss, 0)
        if kept or ctx.retain is None or not ctx.score.better(loss, 0, commit=False):
            break
        state.values = dict(saved)
    report = head_report(block, w0[None], w[None], lam_rel)
    report.reason = "output layer solved to the least-squares optimum; "
    if kept:
        report.accepted, report.reason, report.outcome = True, report.reason + "kept", "kept"
    else:
        state.values = saved
        report.reason += ("held-out loss did not improve or no lam keeps the retain bound; "
                          "reverted" if ctx.retain is not None
                          else "held-out loss did not improve; reverted")
    report.seconds = time.perf_counter() - started
    ctx.record(report)
    return True
