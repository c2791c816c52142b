"""What runs on a Dask worker for the cluster form of the ``minibatch`` schedule
(:mod:`onnxfbp.cluster.minibatch`): one task per shard that holds samples of
the step's mini-batch.

The worker keeps one :class:`~onnxfbp.schedules.minibatch.Minibatch` per model
state and layer set (its blocks, the reverse route and compiled reverse pass,
chosen on its first batch, as one process chooses them on its first step) and
computes, for its slice of the batch, exactly what the single-process step
computes for the whole batch: the forward pass, the summed cross-entropy (the
blow-up test), the label targets carried back, and each layer's ``X^T R`` scaled
as :meth:`Minibatch.crosses` scales it (divided by the whole batch's size) at
the convolution positions one process draws (every slice starts from the
driver's generator; the draws depend on shapes only), so that the driver's sum
over the slices is the single-process step's ``X^T R``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from .worker import ShardRef, busy

__all__ = ["StepPart", "precondition_task", "step_task"]

_RUNS: dict[tuple[int, tuple[str, ...]], Any] = {}

# a slice's result: summed loss (nan: logits not finite), X^T R per leader, the
# reverse pass the worker chose (its description, the kept-branch layer), and the
# generator after the step's position draws
StepPart = tuple[float, dict[str, np.ndarray], tuple[str | None, str | None],
                 np.random.Generator]


def _schedule(state: Any, names: list[str], skip: list[str]) -> Any:
    """This process's schedule object for ``state`` and layers ``names``."""
    from ..data import from_arrays  # noqa: PLC0415
    from ..schedules.minibatch import Minibatch  # noqa: PLC0415
    from ..schedules.state import RunContext, Score  # noqa: PLC0415

    key = (id(state), tuple(names))
    run: Any = _RUNS.get(key)
    if run is None or run.state is not state:
        by_name = {layer.name: layer for layer in state.plan.refinable}
        state.layers = [by_name[n] for n in names]
        empty = np.zeros(0, np.int64)
        ctx = RunContext(from_arrays(np.zeros((0, 1), np.float32), empty, "none"), empty,
                         empty, np.random.default_rng(0), Score(0.0, 0), lambda event: None)
        run = Minibatch(state, ctx)  # with its reverse plan: path and needed tensors
        run.path, run.needed = state.reverse_plan(run.layers)
        _RUNS.clear()
        _RUNS[key] = run
    run.skipped = {name: "skipped on the driver" for name in skip}
    return run


def _draw_rounds(run: Any, acts: dict[str, Any], rng: np.random.Generator, rounds: int,
                 positions: int) -> np.random.Generator:
    """A copy of ``rng`` advanced by ``rounds`` batches' position draws of the
    preconditioner's rows (the draws depend on the maps' shapes only: replayed
    on one sample of ``acts``)."""
    rng = copy.deepcopy(rng)
    one = {name: a[:1] for name, a in acts.items()}
    for _ in range(rounds):
        for layer in run.layers:
            run.blocks[layer.name].rows(one[layer.input], one[layer.output], rng, positions)
    return rng


def precondition_task(
    model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray], ref: ShardRef,
    local: np.ndarray, order: np.ndarray, names: list[str], total: int,
    rng: np.random.Generator,
) -> tuple[tuple[dict[str, Any], np.random.Generator], float]:
    """:meth:`Minibatch.precondition_rows` of rows ``local`` of the shard, whose
    places in the whole sample are ``order``: each batch of ``run.batch_size``
    places draws its conv positions from ``rng`` advanced past the batches before
    it, as one process draws them. Also ``rng`` advanced past all batches."""
    with busy(model, settings, values, ref) as (state, data, seconds):
        run = _schedule(state, names, [])
        size, positions = state.config.run.batch_size, run.cfg.gram_positions
        batch = np.asarray(order) // size
        sums: dict[str, Any] = {}
        acts: dict[str, Any] = {}
        for j in np.unique(batch):
            x, _ = data.take(local[batch == j])
            acts = state.forward(x, run.io_names(), on_device=True)
            run.precondition_rows(sums, acts, len(x),
                                  _draw_rounds(run, acts, rng, int(j), positions), total)
        after = _draw_rounds(run, acts, rng, -(-total // size), positions)
    return (sums, after), seconds()


def step_task(
    model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray], ref: ShardRef,
    local: np.ndarray, names: list[str], skip: list[str], batch: int, rng: np.random.Generator,
) -> tuple[StepPart, float]:
    """The step's sums of rows ``local`` of the shard (see the module doc); conv
    positions drawn from ``rng`` (the driver's generator: every slice draws the
    positions one process draws for the whole batch)."""
    from ..fit.targets import cross_entropy, label_target  # noqa: PLC0415
    from ..run.backend import to_numpy  # noqa: PLC0415

    with busy(model, settings, values, ref) as (state, data, seconds):
        run = _schedule(state, names, skip)
        xp, logits = state.xp, state.plan.logits
        x, y = data.take(local)
        views = state.views()
        acts = state.forward(x, run.needed, on_device=True)
        z = acts[logits].reshape(len(y), -1)
        route = (state.reverse_pass, state.kept_branch)
        if not bool(xp.isfinite(z).all()):
            return (float("nan"), {}, route, rng), seconds()
        loss = float(cross_entropy(z, xp.asarray(y))[0])
        t_logits = label_target(z, xp.asarray(y), 1.0).reshape(acts[logits].shape)
        if run.route is None:
            run.needed = run.choose_route(acts, run.path, views, run.needed)
        residuals = run.residuals(acts, t_logits, views)
        crosses = run.crosses(acts, residuals, views, rng, len(y), batch)
        out = {name: to_numpy(c) for name, c in crosses.items()}
    route = (state.reverse_pass, state.kept_branch)
    return (loss, out, route, rng), seconds()
