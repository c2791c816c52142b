"""The default schedule: every layer together, one regularized least-squares
step per mini-batch.

Each layer's Gram ``C = X^T X / rows`` (bias column included) is estimated once
from ``precond_samples`` training samples and factored with damping
``lam = damping * mean diag(C)``. Then, for each mini-batch of ``n`` samples,
the logits residual ``onehot(y) - softmax(z)`` is carried back through every
node's linearized rule (:meth:`InverseRule.vjp`), giving each layer the target
residual ``R = -dL/dz_l`` at its output. Each layer's step direction is

    D = (C + lam I)^-1 X^T R / n,

the minimizer of ``||X D - R||^2 / n + lam ||D||^2`` with the Gram from the
larger sample, and every layer moves the same fraction ``lr`` of its own norm:

    W <- W + lr ||W|| D / ||D||

(a layer whose weights are all zero takes ``lr D``). The residual's scale falls
by each saturating nonlinearity it crosses, so an unnormalized step would move
deep layers of a sigmoid network barely and the layers next to the output much;
the relative step moves every layer alike and bounds each step, however large
the preconditioned direction of, say, a narrow first convolution before parallel
branches. (For a convolution ``X`` are im2col rows at ``step_positions``
output positions, the same for every sample of the batch, ``X^T R`` scaled back
to all positions; the Gram's rows take ``gram_positions`` per sample). The steps
are averaged (Polyak averaging, exponential with ``beta = average``),

    W_avg <- beta W_avg + (1 - beta) W,

and every ``1 / checks_per_epoch`` epoch the held-out split scores ``W_avg``
(``W`` when ``average`` is 0) while the steps go on from ``W``. A better score
is kept as the result; ``patience`` checks with neither a better score nor a
lower held-out loss end the schedule.

A blow-up — a mini-batch loss at the current weights above ``3 ref + 1`` for
``ref`` the running mean of the batch losses, or not finite (then at once), or a
held-out loss above 1.5x the best or not finite (at a check) — goes back to the
kept weights with ``lr`` halved, and the run goes on
with every layer; blow-ups are counted apart from ``patience``, and more than
``halvings`` of them end the schedule. Each layer's report says what happened:
kept, reverted (no held-out gain, with the blow-ups' steps and halvings) or
skipped (its rows were not finite: :class:`NonFiniteError`, no step); a step
whose direction is not finite is not taken, and counted.

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
from ..fit.solve import NonFiniteError, Preconditioner, PreconditionerSums
from ..graph.plan import Layer
from ..output.results import LayerReport
from ..reverse.arrays import reverse
from ..reverse.select import KeptRoute, choose_reverse, kept_route
from ..rules import Array
from ..run.backend import to_numpy
from .state import ModelState, RunContext, Score, whole_groups

__all__ = ["Minibatch", "train_minibatch"]


def train_minibatch(state: ModelState, ctx: RunContext) -> bool:
    """Run the schedule on ``state.layers``; whether a held-out gain was kept."""
    whole = whole_groups(state.layers, state.skipped, True)
    kept = {layer.name for layer in whole}
    for layer in state.layers:
        if layer.name not in kept:  # a shared weight's reader whose partners were cut
            ctx.progress(Message(f"{layer.name}: {state.skipped[layer.name]}; left unchanged"))
    state.layers = whole
    if not whole:
        return False
    # a state whose passes run elsewhere (a cluster) names its form of the schedule
    schedule = getattr(state, "minibatch_schedule", Minibatch)
    return bool(schedule(state, ctx).run())


class Minibatch:
    """One run of the schedule (see the module doc): its weights, their running
    average, the kept best and the step scale."""

    def __init__(self, state: ModelState, ctx: RunContext) -> None:
        self.state, self.ctx = state, ctx
        self.cfg = state.config.minibatch
        self.layers: list[Layer] = state.layers  # whole groups of shared weights
        # layers reading one stored weight take one step together: ``leader`` maps
        # each to the first of its group, whose weights, Gram and step they share
        self.leader: dict[str, str] = {}
        first: dict[str, str] = {}
        for layer in self.layers:
            key = layer.weight.initializer if layer.shared else "\0" + layer.name
            self.leader[layer.name] = first.setdefault(key, layer.name)
        self.members = {lead: [n for n, m in self.leader.items() if m == lead]
                        for lead in first.values()}
        views = state.views()
        self.blocks = {layer.name: state.block(layer, views) for layer in self.layers}
        xp = state.xp
        self.weights: dict[str, Any] = {
            name: xp.asarray(block.weights()) for name, block in self.blocks.items()}
        self.w_start = {name: to_numpy(w).copy() for name, w in self.weights.items()}
        self.kept_values = dict(state.values)
        self.kept_weights = dict(self.weights)
        self.averaged: dict[str, Array] = {}  # from the first step on; updated in place
        self.lr = self.cfg.lr  # halved at each blow-up
        self.best_loss = ctx.score.loss
        self.unbound = Score(ctx.score.loss, ctx.score.correct)
        self.improved = False
        self.stale = 0
        self.halved = 0  # blow-ups so far, each halving the step
        self.diverged: list[int] = []  # the steps at which they happened
        self.nonfinite: dict[str, int] = {}  # steps not taken (direction not finite), per layer
        self.skipped: dict[str, str] = {}  # layers that take no step, and why
        self.batch_loss: float | None = None  # running mean loss of the mini-batches
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
        ft = time.perf_counter()
        sums = self.precondition_sums(ctx.data, sample, len(sample), ctx.rng)
        state.clock.forward += time.perf_counter() - ft
        st = time.perf_counter()
        precond = {}
        for name, layer_sums in sums.items():
            try:
                precond[name] = Preconditioner.from_sums(layer_sums, cfg.damping)
            except NonFiniteError as err:  # the layer takes no step; the others go on
                for member in self.members[name]:
                    self.skipped[member] = f"its input rows: {err}"
                    ctx.progress(Message(f"{member}: {self.skipped[member]}; left unchanged"))
        state.clock.solve += time.perf_counter() - st
        return precond

    def precondition_sums(self, data: Any, sample: np.ndarray, total: int,
                          rng: np.random.Generator) -> dict[str, PreconditionerSums]:
        """Each layer's preconditioner rows of the samples ``sample`` of ``data``,
        in batches of ``run.batch_size`` (``total``: the samples of the whole
        estimate, which decides whether the rows are kept, ``dual``, or their Gram)."""
        sums: dict[str, PreconditionerSums] = {}
        for x, _ in data.batches(sample, self.state.config.run.batch_size):
            acts = self.state.forward(x, self.io_names(), on_device=True)
            self.precondition_rows(sums, acts, len(x), rng, total)
        return sums

    def io_names(self) -> list[str]:
        """The tensors the preconditioner's rows read."""
        return sorted({n for layer in self.layers for n in (layer.input, layer.output)})

    def precondition_rows(self, sums: dict[str, PreconditionerSums], acts: dict[str, Any],
                          n: int, rng: np.random.Generator, total: int) -> None:
        """Add one batch's rows (``n`` samples, activations ``acts``) to ``sums``;
        a convolution's output positions drawn from ``rng`` (once per batch)."""
        state, cfg = self.state, self.cfg
        for layer in self.layers:
            xr, _ = self.blocks[layer.name].rows(
                acts[layer.input], acts[layer.output], rng, cfg.gram_positions
            )
            key = self.leader[layer.name]  # a shared weight: all its readers' rows
            if key not in sums:  # rows expected in all: keep them if fewer than d
                expected = (xr.shape[1] / n * total
                            * len(self.members[key]))
                sums[key] = PreconditionerSums(xr.shape[2] > expected, state.xp)
            sums[key].add(xr)

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
            ft = time.perf_counter()
            crosses, needed = self.batch_crosses(step, idx, path, needed)
            state.clock.forward += time.perf_counter() - ft
            if crosses is None:
                # the last step blew the weights up: back now, not at the next check
                # (each step until then would make it worse)
                if self.halved > cfg.halvings:
                    break
                continue
            st = time.perf_counter()
            self.apply_step(crosses, precond)
            state.clock.solve += time.perf_counter() - st
            if step % check_every and step != total:
                continue
            self.check(step, total)
            if self.stale >= cfg.patience or self.halved > cfg.halvings:
                break
        state.values = self.kept_values
        self.report(step, size, time.perf_counter() - started)
        return self.improved

    def batch_crosses(
        self, step: int, idx: np.ndarray, path: list[int], needed: list[str]
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """Step ``step``'s mini-batch ``idx``: each step's ``X^T R`` (per leader,
        divided by the batch size), or None when its loss shows a blow-up (then
        backed off); and the tensors later forward passes must give."""
        state = self.state
        x, y = self.ctx.data.take(idx)
        views = state.views()
        acts = state.forward(x, needed, on_device=True)
        if self.blew_up(step, acts, y):
            return None, needed
        t_logits = state.label_target(acts, y, 1.0)
        if self.ctx.anchor is not None:
            t_logits = self.ctx.anchor.pull(idx, acts[state.plan.logits], t_logits, 1.0)
        if step == 1:
            needed = self.choose_route(acts, path, views, needed)
        residuals = self.residuals(acts, t_logits, views)
        return self.crosses(acts, residuals, views, self.ctx.rng, len(y), len(y)), needed

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
            state.xp, self.cfg.compiled_reverse and len(state.plan.head_logits) == 1)
        state.reverse_pass = choice.describe()
        if choice.graph is None:
            if self.cfg.compiled_reverse:
                self.ctx.progress(Message(f"reverse pass in {choice.module}: {choice.reason}"))
            return needed
        self.adjoint = choice.graph
        branch = self.route.branch
        return sorted({*state.plan.head_logits, *choice.graph.activations,
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

    def crosses(
        self, acts: dict[str, Any], residuals: Any, views: dict[str, Any],
        rng: np.random.Generator, n: int, batch: int,
    ) -> dict[str, Any]:
        """Each step's ``X^T R`` of ``n`` samples (float64, conv positions scaled back
        to all, divided by ``batch`` and by the readers of a shared weight), per
        leader. Layers reading one stored weight take one step: their ``X^T R``
        averaged, with the Gram of all their rows (the step of the summed least
        squares)."""
        cfg, xp = self.cfg, self.state.xp
        assert self.route is not None
        branch, deepest = self.route.branch, self.layers[-1]
        crosses: dict[str, Any] = {}
        for layer in self.layers:
            if layer.name in self.skipped:
                continue
            block = self.blocks[layer.name]
            if branch is not None and layer is deepest:
                keep, positions = branch.draw(rng, cfg.step_positions)
                out = branch.residual(acts, residuals[branch.source], views, keep)
                xr, rr = block.rows_at(acts[layer.input], out, keep, branch.grid, True)
            else:
                out = residuals[layer.output]  # shaped like the layer's output
                xr, rr = block.rows(acts[layer.input], out, rng, cfg.step_positions, True)
                positions = int(np.prod(out.shape[2:])) if layer.kind == "conv" else 1
            kept = xr.shape[1] // n if layer.kind == "conv" else 1
            cross = xp.matmul(xr.transpose(0, 2, 1), rr).astype(xp.float64)
            cross *= positions / max(kept, 1) / batch / len(self.members[self.leader[layer.name]])
            key = self.leader[layer.name]
            crosses[key] = crosses[key] + cross if key in crosses else cross
        return crosses

    def apply_step(self, crosses: dict[str, Any], precond: dict[str, Preconditioner]) -> None:
        """One preconditioned step of every layer from its ``crosses``, and the
        running average."""
        state, beta = self.state, self.cfg.average
        for layer in self.layers:
            if layer.name not in crosses:
                continue
            w = self.weights[layer.name] + self.relative_step(
                layer.name, precond[layer.name].apply(crosses[layer.name]))
            if layer.name in self.averaged:
                mean = self.averaged[layer.name]
                mean *= beta
                mean += (1 - beta) * w
            else:
                self.averaged[layer.name] = w.copy()
            for member in self.members[layer.name]:
                self.weights[member] = w
                self.averaged[member] = self.averaged[layer.name]
            state.set_weights(layer, self.blocks[layer.name], to_numpy(w))

    def blew_up(self, step: int, acts: dict[str, Any], y: Any) -> bool:
        """Whether this batch's mean loss at the current weights shows a blow-up (not
        finite, or above ``3 ref + 1`` for ``ref`` the running mean of the batch
        losses so far); then back off at once."""
        xp = self.state.xp
        finite = all(bool(xp.isfinite(acts[t]).all()) for t in self.state.plan.head_logits)
        loss = (self.state.batch_score(acts, y)[0] / max(len(y), 1)
                if finite else float("nan"))  # no NaN arithmetic
        return self.loss_blew_up(step, loss)

    def loss_blew_up(self, step: int, loss: float) -> bool:
        """:meth:`blew_up` of a batch whose mean loss is ``loss``."""
        ref = self.batch_loss
        if ref is not None and (not np.isfinite(loss) or loss > 3 * ref + 1):
            shown = f"{loss:.4g}" if np.isfinite(loss) else "not finite"
            self.back_off(step, f"mini-batch loss {shown} (about {ref:.3g} before); "
                                "back to the kept weights")
            return True
        self.batch_loss = loss if ref is None else 0.9 * ref + 0.1 * loss
        return False

    def relative_step(self, name: str, direction: Any) -> Any:
        """``lr ||W|| D / ||D||`` for the layer's direction ``D`` (``lr D`` when ``W``
        is all zero; a zero ``D`` stays zero); zero, and counted, when ``D`` is not
        finite."""
        xp = self.state.xp
        size = float(xp.linalg.norm(direction))
        if not np.isfinite(size):
            self.nonfinite[name] = self.nonfinite.get(name, 0) + 1
            return xp.zeros_like(direction)
        if size == 0.0:
            return direction
        norm = float(xp.linalg.norm(self.weights[name]))
        return direction * (self.lr * norm / size if norm > 0 else self.lr)

    def check(self, step: int, total: int) -> None:
        """Score the averaged steps on the held-out split; keep, go on or back off."""
        state, ctx = self.state, self.ctx
        stepping = dict(state.values)  # the steps go on from here
        # with beta 0, the last step itself; a layer that took no step as it is
        scored = {name: self.averaged.get(name, w) for name, w in self.weights.items()}
        for layer in self.layers:
            state.set_weights(layer, self.blocks[layer.name], to_numpy(scored[layer.name]))
        loss, correct, _ = state.scores(ctx.data, ctx.val_idx)
        if not np.isfinite(loss) or loss > 1.5 * self.best_loss:
            self.back_off(step, "held-out loss rose")
        else:
            if ctx.retain is not None and self.unbound.better(loss, correct):
                ctx.unbound = dict(state.values)  # the best regardless of the retain bound
                ctx.unbound_score = Score(loss, correct)
            if ctx.accept(state, loss, correct):
                self.kept_values = dict(state.values)
                self.kept_weights = {name: w.copy() for name, w in scored.items()}
                self.best_loss, self.improved, self.stale = min(self.best_loss, loss), True, 0
            else:  # still learning while the held-out loss falls, even if accuracy stalls
                self.stale = 0 if loss < 0.995 * self.best_loss else self.stale + 1
                self.best_loss = min(self.best_loss, loss)
            state.values = stepping
        n = len(ctx.val_idx)
        shown = state.task.accuracy(correct, n)
        ctx.progress(StepChecked(step, total, float("nan") if shown is None else shown, loss / n))

    def back_off(self, step: int, why: str) -> None:
        """A blow-up: back to the kept weights with half the step; counted apart
        from ``patience`` (the run goes on with every layer until ``halvings``
        blow-ups)."""
        self.state.values = dict(self.kept_values)
        self.weights = {name: w.copy() for name, w in self.kept_weights.items()}
        self.averaged = {}
        self.lr /= 2
        self.halved += 1
        self.diverged.append(step)
        self.ctx.progress(StepBackedOff(step, why, self.lr))

    def outcome(self, name: str) -> tuple[str, str]:
        """``(outcome, why)`` of layer ``name``: kept, reverted or skipped, in words."""
        cfg = self.cfg
        blowups = ""
        if self.diverged:
            at = ", ".join(str(s) for s in self.diverged)
            blowups = (f"diverged at step{'s' if len(self.diverged) > 1 else ''} {at}; "
                       f"step halved {self.halved} time{'s' if self.halved > 1 else ''}")
            if self.halved > cfg.halvings:
                blowups += f" (more than the {cfg.halvings} allowed: stopped)"
        if name in self.skipped:
            return "skipped", f"{self.skipped[name]}; left unchanged"
        if not self.improved:
            return "reverted", "; ".join(p for p in (blowups, "no held-out gain; reverted") if p)
        kept = ("best held-out score of the averaged steps kept" if cfg.average
                else "best held-out score kept")
        parts = [kept]
        if blowups:
            parts.append(blowups + ", went on with every layer")
        if self.nonfinite.get(name):
            parts.append(f"{self.nonfinite[name]} steps not taken (direction not finite)")
        return "kept", "; ".join(parts)

    def report(self, steps: int, size: int, seconds: float) -> None:
        """One report per layer: the kept weights' change, or reverted / skipped
        and why (blow-ups, halvings, steps not taken)."""
        cfg, ctx = self.cfg, self.ctx
        for layer in self.layers:
            w_new = to_numpy(self.kept_weights[layer.name])
            start = self.w_start[layer.name]
            change = float(np.linalg.norm(w_new - start)) / max(float(np.linalg.norm(start)), 1e-12)
            outcome, why = self.outcome(layer.name)
            ctx.record(LayerReport(
                sweep=0,
                name=layer.name,
                op=layer.op,
                weight_shape=list(np.asarray(self.blocks[layer.name].view.const(1)).shape),
                accepted=outcome == "kept",
                reason=f"minibatch schedule, {steps} steps of {size}: {why}",
                lam=cfg.damping,
                relative_change=change if outcome == "kept" else 0.0,
                heldout_accuracy=self.state.task.accuracy(ctx.score.correct, len(ctx.val_idx)),
                seconds=seconds / len(self.layers),
                outcome=outcome,
                halvings=self.halved,
            ))
        if self.diverged:
            _, why = self.outcome(self.layers[0].name)
            ctx.progress(Message(f"minibatch schedule: {why}"))
