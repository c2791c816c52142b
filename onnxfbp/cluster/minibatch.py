"""The cluster form of the default ``minibatch`` schedule.

The schedule is :class:`onnxfbp.schedules.minibatch.Minibatch` itself: the same
split, the same sequence of mini-batches (drawn on the driver with the run's
generator), the same preconditioner sample, relative per-layer steps, Polyak
average, blow-up tests and held-out checks. Only the passes over samples run on
the workers, one task per shard holding samples of the pass
(:mod:`onnxfbp.cluster.steps`):

- the preconditioner: each shard's rows of the ``precond_samples`` sample, their
  float64 Grams added (or their rows joined, ``dual``) in shard order;
- each step: the mini-batch's samples cut into per-shard slices (the samples one
  process would use in that step); each slice gives its summed cross-entropy and
  each layer's ``X^T R`` (divided by the whole batch's size); the driver adds
  them in float64 in shard order, tests the batch loss for a blow-up and takes
  the step exactly as one process does;
- the held-out checks: :meth:`ClusterState.scores` on the shards.

Random draws stay the single-process draws: a convolution's rows are taken at
output positions drawn once per batch from the run's generator, the same for
every sample, so every shard's task starts from a copy of the driver's generator
and draws the positions one process draws for the whole batch (the draws depend
on the maps' shapes only; the preconditioner's batches of ``run.batch_size``
samples are replayed so); the driver's generator then moves on as theirs did.
The steps' sums are therefore the single-process sums up to float32 summation
order, and the weights follow the single-process run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..fit.solve import PreconditionerSums
from ..schedules.minibatch import Minibatch
from . import steps
from .engine import ClusterState, ShardData

__all__ = ["ClusterMinibatch"]

class ClusterMinibatch(Minibatch):
    """:class:`Minibatch` whose passes over samples run on the shards of a cluster."""

    def _engine(self) -> tuple[ClusterState, ShardData]:
        state, data = self.state, self.ctx.data
        assert isinstance(state, ClusterState) and isinstance(data, ShardData)
        return state, data

    def precondition_sums(self, data: Any, sample: np.ndarray, total: int,
                          rng: np.random.Generator) -> dict[str, PreconditionerSums]:
        """Each shard's rows of ``sample`` (drawing the positions one process
        draws), joined in shard order; ``rng`` advanced as one process advances it."""
        engine, shards = self._engine()
        names = [layer.name for layer in self.layers]
        sample = np.sort(sample)
        # each sample's place in the sample: its batch of run.batch_size
        order = np.split(np.arange(len(sample)),
                         np.cumsum([len(local) for _, local in shards.split(sample)])[:-1])

        def once() -> list[tuple[dict[str, PreconditionerSums], np.random.Generator]]:
            values = engine._values()
            return engine.timed("precondition", [
                (steps.precondition_task, engine.model_ref, engine.settings, values,
                 shards.shards[k], local, place, names, total, rng)
                for (k, local), place in zip(shards.split(sample), order, strict=True)])

        parts = engine._again(once)
        merged: dict[str, PreconditionerSums] = {}
        for part, _ in parts:
            for key, sums in part.items():
                into = merged.setdefault(key, PreconditionerSums(sums.dual, engine.xp))
                if sums.gram is not None:
                    into.gram = sums.gram if into.gram is None else into.gram + sums.gram
                into.chunks.extend(sums.chunks)
                into.count += sums.count
        if parts:
            rng.bit_generator.state = parts[0][1].bit_generator.state
        return merged

    def batch_crosses(
        self, step: int, idx: np.ndarray, path: list[int], needed: list[str]
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """The step's sums from the shards' slices of ``idx`` (see the module doc)."""
        engine, shards = self._engine()
        names = [layer.name for layer in self.layers]
        skip = sorted(self.skipped)
        rng = self.ctx.rng

        def once() -> list[steps.StepPart]:
            values = engine._values()
            return engine.timed("steps", [
                (steps.step_task, engine.model_ref, engine.settings, values, shards.shards[k],
                 local, names, skip, len(idx), rng)
                for k, local in shards.split(idx)])

        parts = engine._again(once)
        losses = [p[0] for p in parts]
        loss = (float(sum(losses)) / max(len(idx), 1) if all(np.isfinite(losses))
                else float("nan"))
        if step == 1:
            engine.reverse_pass, engine.kept_branch = parts[0][2]
        if self.loss_blew_up(step, loss):
            return None, needed
        crosses: dict[str, Any] = {}
        for _, part, _, _ in parts:  # shard order
            for key, cross in part.items():
                c = engine.xp.asarray(cross, dtype=engine.xp.float64)
                crosses[key] = crosses[key] + c if key in crosses else c
        drew = [p[3] for p in parts if p[1]]
        if drew:  # the positions one process drew: its generator moves on as theirs did
            rng.bit_generator.state = drew[0].bit_generator.state
        return crosses, needed
