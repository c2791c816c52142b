"""The cluster form of the default ``minibatch`` schedule.

The schedule is :class:`onnxfbp.schedules.minibatch.Minibatch` itself: the same
split, the same sequence of mini-batches (drawn on the driver with the run's
generator), the same preconditioner sample, per-layer trust region, Polyak
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

Where no convolution is refined the steps' sums are the single-process sums up
to float32 summation order, so the weights follow the single-process run. A
convolution's rows are taken at ``step_positions`` random output positions: one
process draws them once for the whole batch, a shard for its slice with its own
seeded generator, so the steps match in distribution, not draw for draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..fit.head import SEED_SALT
from ..fit.solve import PreconditionerSums
from ..schedules.minibatch import Minibatch
from . import steps
from .engine import ClusterState, ShardData

__all__ = ["ClusterMinibatch"]

_PRECOND, _STEP = 5, 6  # seed tags of the two kinds of task


class ClusterMinibatch(Minibatch):
    """:class:`Minibatch` whose passes over samples run on the shards of a cluster."""

    def _engine(self) -> tuple[ClusterState, ShardData]:
        state, data = self.state, self.ctx.data
        assert isinstance(state, ClusterState) and isinstance(data, ShardData)
        return state, data

    def _seed(self, tag: int, *more: int) -> list[int]:
        return [self.state.config.split.seed, SEED_SALT, tag, *more]

    def precondition_sums(self, data: Any, sample: np.ndarray, total: int,
                          rng: np.random.Generator) -> dict[str, PreconditionerSums]:
        """Each shard's rows of ``sample``, joined in shard order."""
        engine, shards = self._engine()
        names = [layer.name for layer in self.layers]

        def once() -> list[dict[str, PreconditionerSums]]:
            values = engine._values()
            return engine.timed("precondition", [
                (steps.precondition_task, engine.model_ref, engine.settings, values,
                 shards.shards[k], local, names, total, self._seed(_PRECOND, k))
                for k, local in shards.split(np.sort(sample))])

        merged: dict[str, PreconditionerSums] = {}
        for part in engine._again(once):
            for key, sums in part.items():
                into = merged.setdefault(key, PreconditionerSums(sums.dual, engine.xp))
                if sums.gram is not None:
                    into.gram = sums.gram if into.gram is None else into.gram + sums.gram
                into.chunks.extend(sums.chunks)
                into.count += sums.count
        return merged

    def batch_crosses(
        self, step: int, idx: np.ndarray, path: list[int], needed: list[str]
    ) -> tuple[dict[str, Any] | None, list[str]]:
        """The step's sums from the shards' slices of ``idx`` (see the module doc)."""
        engine, shards = self._engine()
        names = [layer.name for layer in self.layers]
        skip = sorted(self.skipped)

        def once() -> list[steps.StepPart]:
            values = engine._values()
            return engine.timed("steps", [
                (steps.step_task, engine.model_ref, engine.settings, values, shards.shards[k],
                 local, names, skip, len(idx), self._seed(_STEP, step, k))
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
        for _, part, _ in parts:  # shard order
            for key, cross in part.items():
                c = engine.xp.asarray(cross, dtype=engine.xp.float64)
                crosses[key] = crosses[key] + c if key in crosses else c
        return crosses, needed
