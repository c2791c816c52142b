"""The default schedule: every layer together, one regularized least-squares
step per mini-batch.

Each layer's Gram ``C = X^T X / rows`` (bias column included) is estimated once
from ``precond_samples`` training samples and factored with damping
``lam = damping * mean diag(C)``. Then, for each mini-batch of ``n`` samples,
the logits residual ``onehot(y) - softmax(z)`` is carried back through every
node's linearized rule (:meth:`InverseRule.vjp`), giving each layer the target
residual ``R = -dL/dz_l`` at its output, and every layer takes the step

    W <- W + lr (C + lam I)^-1 X^T R / n,

the minimizer of ``||X dW - lr R||^2 / n + lam ||dW||^2`` with the Gram from the
larger sample (for a convolution ``X`` are im2col rows at ``step_positions``
output positions, the same for every sample of the batch, ``X^T R`` scaled back
to all positions; the Gram's rows take ``gram_positions`` per sample). The steps
are averaged (Polyak averaging, exponential with ``beta = average``),

    W_avg <- beta W_avg + (1 - beta) W,

and every ``1 / checks_per_epoch`` epoch the held-out split scores ``W_avg``
(``W`` when ``average`` is 0) while the steps go on from ``W``. A better score
is kept as the result; a blow-up (held-out loss above 1.5x the best or not
finite, or a step's logits not finite: then at once) goes back to the kept
weights with half the step; ``patience`` checks or blow-ups with neither a
better score nor a lower held-out loss end the schedule.

Where the deepest layer is a convolution whose branch to the next one allows
it, its residual is computed at its kept positions only
(:mod:`onnxfbp.reverse.kept_branch`), from the next convolution's residual; with a
MaxPool in that branch its positions are whole pool windows
(:meth:`KeptBranch.draw`). The residuals are carried back by the compiled
reverse pass where it compiles (:mod:`onnxfbp.reverse.select`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..events import Message, StepBackedOff, StepChecked
from ..fit.solve import Preconditioner, PreconditionerSums
from ..fit.targets import label_target
from ..graph.plan import Layer
from ..output.results import LayerReport
from ..reverse.arrays import reverse
from ..reverse.select import KeptRoute, choose_reverse, kept_route
from ..rules import Array
from ..run.backend import to_numpy
from .state import ModelState, RunContext

__all__ = ["Minibatch", "train_minibatch"]


def train_minibatch(state: ModelState, ctx: RunContext) -> bool:
    """Run the schedule on ``state.layers``; whether a held-out gain was kept."""
    return Minibatch(state, ctx).run()


class Minibatch:
    """One run of the schedule (see the module doc): its weights, their running
    average, the kept best and the step scale."""

    def __init__(self, state: ModelState, ctx: RunContext) -> None:
        self.state, self.ctx = state, ctx
        self.cfg = state.config.minibatch
        self.layers: list[Layer] = state.layers
        views = state.views()
        self.blocks = {layer.name: state.block(layer, views) for layer in self.layers}
        xp = state.xp
        self.weights: dict[str, Any] = {
            name: xp.asarray(block.weights()) for name, block in self.blocks.items()}
        self.w_start = {name: to_numpy(w).copy() for name, w in self.weights.items()}
        self.kept_values = dict(state.values)
        self.kept_weights = dict(self.weights)
        self.averaged: dict[str, Array] = {}  # from the first step on; updated in place
        self.lr = self.cfg.lr
        self.best_loss = ctx.score.loss
        self.improved = False
        self.stale = 0
        self.route: KeptRoute | None = None
        self.adjoint: Any = None

    # ------------------------------------------------------------ preconditioner

    def precondition(self) -> dict[str, Preconditioner]:
        """Each layer's damped Gram from ``precond_samples`` training samples."""
        state, ctx, cfg = self.state, self.ctx, self.cfg
        train_idx = ctx.train_idx
        sample = (
            np.sort(ctx.rng.choice(train_idx, cfg.precond_samples, replace=False))
            if len(train_idx) > cfg.precond_samples
            else train_idx
        )
        sums: dict[str, PreconditionerSums] = {}
        ft = time.perf_counter()
        io_names = sorted({n for layer in self.layers for n in (layer.input, layer.output)})
        for x, _ in ctx.data.batches(sample, state.config.run.batch_size):
            acts = state.forward(x, io_names, on_device=True)
            for layer in self.layers:
                xr, _ = self.blocks[layer.name].rows(
                    acts[layer.input], acts[layer.output], ctx.rng, cfg.gram_positions
                )
                if layer.name not in sums:  # rows expected in all: keep them if fewer than d
                    expected = xr.shape[1] / len(x) * len(sample)
                    sums[layer.name] = PreconditionerSums(xr.shape[2] > expected, state.xp)
                sums[layer.name].add(xr)
        state.clock.forward += time.perf_counter() - ft
        st = time.perf_counter()
        precond = {name: Preconditioner.from_sums(s, cfg.damping) for name, s in sums.items()}
        state.clock.solve += time.perf_counter() - st
        return precond

    # ------------------------------------------------------------ the loop

    def run(self) -> bool:
        """The steps and checks; leaves the kept weights in the state and reports."""
        state, ctx, cfg = self.state, self.ctx, self.cfg
        started = time.perf_counter()
        precond = self.precondition()
        path, needed = state.reverse_plan(self.layers)
        size = max(1, cfg.step_batch)
        per_epoch = -(-len(ctx.train_idx) // size)
        total = max(1, int(np.ceil(cfg.epochs * per_epoch)))
        check_every = max(1, -(-per_epoch // max(1, cfg.checks_per_epoch)))
        queue = np.zeros(0, np.int64)
        step = 0
        for step in range(1, total + 1):
            if not len(queue):
                queue = ctx.rng.permutation(ctx.train_idx)
            idx, queue = np.sort(queue[:size]), queue[size:]
            x, y = ctx.data.take(idx)
            ft = time.perf_counter()
            views = state.views()
            acts = state.forward(x, needed, on_device=True)
            z = acts[state.plan.logits].reshape(len(y), -1)
            if step > 1 and not bool(state.xp.isfinite(z).all()):
                # the last step blew the weights up: back now, not at the next check
                # (each step until then would be NaN)
                self.back_off(step, "logits not finite; back to the kept weights")
                if self.stale >= cfg.patience:
                    break
                continue
            t_logits = label_target(z, state.xp.asarray(y), 1.0).reshape(
                acts[state.plan.logits].shape)
            if step == 1:
                needed = self.choose_route(acts, path, views, needed)
            residuals = self.residuals(acts, t_logits, views)
            state.clock.forward += time.perf_counter() - ft
            st = time.perf_counter()
            self.take_step(acts, residuals, views, precond, len(y))
            state.clock.solve += time.perf_counter() - st
            if step % check_every and step != total:
                continue
            self.check(step, total)
            if self.stale >= cfg.patience:
                break
        state.values = self.kept_values
        self.report(step, size, time.perf_counter() - started)
        return self.improved

    def choose_route(
        self, acts: dict[str, Any], path: list[int], views: dict[str, Any], needed: list[str]
    ) -> list[str]:
        """On the first batch: the kept branch, the reverse pass (compiled or arrays);
        returns the tensors later forward passes must give."""
        state = self.state
        self.route = kept_route(state.plan, self.layers, acts, path)
        if self.route.branch is not None:
            state.kept_branch = self.layers[-1].name
        choice = choose_reverse(
            state.plan, self.route, acts, views, state.providers, state.config.run.threads,
            state.xp, self.cfg.compiled_reverse)
        state.reverse_pass = choice.describe()
        if choice.graph is None:
            if self.cfg.compiled_reverse:
                self.ctx.progress(Message(f"reverse pass in {choice.module}: {choice.reason}"))
            return needed
        self.adjoint = choice.graph
        branch = self.route.branch
        return sorted({state.plan.logits, *choice.graph.activations,
                       *(layer.input for layer in self.layers),
                       *(branch.activations if branch is not None else ())})

    def residuals(self, acts: dict[str, Any], t_logits: Any, views: dict[str, Any]) -> Any:
        """``-dL/dz`` at every tensor the steps read, for this batch."""
        assert self.route is not None
        logits = self.state.plan.logits
        if self.adjoint is not None:
            r_logits = (t_logits - acts[logits]).astype(acts[logits].dtype)
            return self.adjoint.run(acts, r_logits, views)
        residuals, _ = reverse(self.state.plan, acts, t_logits, self.route.path, views,
                               self.state.config.sweep.mu, linearized=True)
        return residuals

    def take_step(
        self, acts: dict[str, Any], residuals: Any, views: dict[str, Any],
        precond: dict[str, Preconditioner], n: int,
    ) -> None:
        """One preconditioned step of every layer, and the running average."""
        state, cfg, xp = self.state, self.cfg, self.state.xp
        assert self.route is not None
        branch, deepest, beta = self.route.branch, self.layers[-1], cfg.average
        for layer in self.layers:
            block = self.blocks[layer.name]
            if branch is not None and layer is deepest:
                keep, positions = branch.draw(self.ctx.rng, cfg.step_positions)
                out = branch.residual(acts, residuals[branch.source], views, keep)
                xr, rr = block.rows_at(acts[layer.input], out, keep, branch.grid, True)
            else:
                out = residuals[layer.output]  # shaped like the layer's output
                xr, rr = block.rows(acts[layer.input], out, self.ctx.rng, cfg.step_positions, True)
                positions = int(np.prod(out.shape[2:])) if layer.kind == "conv" else 1
            kept = xr.shape[1] // n if layer.kind == "conv" else 1
            cross = xp.matmul(xr.transpose(0, 2, 1), rr).astype(xp.float64)
            cross *= positions / max(kept, 1) / n
            w = self.weights[layer.name] + self.lr * precond[layer.name].apply(cross)
            self.weights[layer.name] = w
            if layer.name in self.averaged:
                mean = self.averaged[layer.name]
                mean *= beta
                mean += (1 - beta) * w
            else:
                self.averaged[layer.name] = w.copy()
            state.set_weights(layer, block, to_numpy(w))

    def check(self, step: int, total: int) -> None:
        """Score the averaged steps on the held-out split; keep, go on or back off."""
        state, ctx = self.state, self.ctx
        stepping = dict(state.values)  # the steps go on from here
        scored = self.averaged  # with beta 0, the last step itself
        for layer in self.layers:
            state.set_weights(layer, self.blocks[layer.name], to_numpy(scored[layer.name]))
        loss, correct, _ = state.scores(ctx.data, ctx.val_idx)
        if not np.isfinite(loss) or loss > 1.5 * self.best_loss:
            self.back_off(step, "held-out loss rose")
        else:
            if ctx.accept(state, loss, correct):
                self.kept_values = dict(state.values)
                self.kept_weights = {name: w.copy() for name, w in scored.items()}
                self.best_loss, self.improved, self.stale = min(self.best_loss, loss), True, 0
            else:  # still learning while the held-out loss falls, even if accuracy stalls
                self.stale = 0 if loss < 0.995 * self.best_loss else self.stale + 1
                self.best_loss = min(self.best_loss, loss)
            state.values = stepping
        n = len(ctx.val_idx)
        ctx.progress(StepChecked(step, total, correct / n, loss / n))

    def back_off(self, step: int, why: str) -> None:
        """A blow-up: back to the kept weights, half the step, one stale count."""
        self.state.values, self.weights = dict(self.kept_values), dict(self.kept_weights)
        self.averaged = {}
        self.lr /= 2
        self.stale += 1
        self.ctx.progress(StepBackedOff(step, why, self.lr))

    def report(self, steps: int, size: int, seconds: float) -> None:
        """One report per layer: the kept weights' change, or reverted."""
        cfg, ctx = self.cfg, self.ctx
        if not self.improved:
            outcome = "no held-out gain; reverted"
        elif cfg.average:
            outcome = "best held-out score of the averaged steps kept"
        else:
            outcome = "best held-out score kept"
        for layer in self.layers:
            w_new = to_numpy(self.kept_weights[layer.name])
            start = self.w_start[layer.name]
            change = float(np.linalg.norm(w_new - start)) / max(float(np.linalg.norm(start)), 1e-12)
            ctx.record(LayerReport(
                sweep=0,
                name=layer.name,
                op=layer.op,
                weight_shape=list(np.asarray(self.blocks[layer.name].view.const(1)).shape),
                accepted=self.improved,
                reason=f"minibatch schedule, {steps} steps of {size}: {outcome}",
                lam=cfg.damping,
                relative_change=change if self.improved else 0.0,
                heldout_accuracy=ctx.score.correct / len(ctx.val_idx),
                seconds=seconds / len(self.layers),
            ))
