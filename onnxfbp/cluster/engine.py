"""The driver of a cluster refine: the model state whose passes over the data run
on the shards of a Dask cluster.

:class:`ClusterState` is a :class:`ModelState` whose three streamed operations
go to the workers (:mod:`onnxfbp.cluster.worker`), one task per shard:

- ``cluster_sums``: each layer's normal equations ``X^T X``, ``X^T T``, ``|T|^2``
  and row counts, training and held-out apart (:func:`onnxfbp.fit.normal.accumulate`);
- ``scores``: summed held-out cross-entropy, correct count and predictions;
- ``cluster_features``: the output layer's input features of at most
  ``HeadConfig.max_rows`` samples per split (:func:`onnxfbp.fit.head.head_features`);

and the ``minibatch`` schedule's preconditioner rows and steps go to them through
:attr:`ClusterState.minibatch_schedule` (:mod:`onnxfbp.cluster.minibatch`).

Sums reduce on the cluster in float64 along a fixed binary tree over the shards
in their order (the result does not depend on which worker ran what, nor on how
many there are); the driver receives one sum per layer, solves, and the next
step's weights (the refined initializers) are scattered to every worker once.
The driver holds the split's indices and the held-out labels and predictions
(8 bytes a sample), never a sample.

A task of a lost worker is rerun by Dask on another one (up to its
``allowed-failures``); if that fails too, or no worker is left, the run stops
with a one-line :class:`ClusterError` and nothing is written. Ctrl-C cancels the
run's tasks on the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import RefineConfig
from ..data import LabelledData
from ..errors import OnnxfbpError
from ..events import Message, Progress, ShardsDone
from ..fit.head import SEED_SALT
from ..fit.normal import LayerSums, new_sums
from ..graph.plan import Layer
from ..schedules.state import ModelState, RunContext
from . import worker

__all__ = ["ClusterError", "ClusterState", "ShardData"]


class ClusterError(OnnxfbpError):
    """The cluster could not be reached, or lost the workers a run needs."""


class _Lost(ClusterError):
    """A task or its result was lost with a worker (the pass may be rerun)."""


_LOST = ("CancelledError", "FutureCancelledError", "KilledWorker", "CommClosedError",
         "StreamClosedError", "FutureLostError")


def _failed(phase: str, exc: BaseException) -> ClusterError:
    """The one-line error of a pass that failed on the cluster."""
    kind = _Lost if type(exc).__name__ in _LOST else ClusterError
    return kind(f"the cluster failed during {phase}: {type(exc).__name__}: {_why(exc)}; "
                "check the workers (logs, memory) and rerun; nothing was written")


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class ShardData(LabelledData):
    """Labelled data on the workers' storage: shards (:class:`worker.ShardRef`)
    read only by workers. Inputs and labels reach the driver only when asked
    for (a few samples for the report's feature maps; labels of index sets)."""

    def __init__(self, source: str, shards: list[worker.ShardRef], engine: ClusterState) -> None:
        super().__init__(source=source, shard_sizes=[s.size for s in shards])
        self.shards = shards
        self.engine = engine

    def split(self, idx: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``(shard, local rows)`` of the sorted global indices ``idx``, in shard order."""
        idx = np.asarray(idx, dtype=np.int64)
        bounds = np.searchsorted(idx, self._offsets)
        return [(k, idx[bounds[k]:bounds[k + 1]] - self._offsets[k])
                for k in range(len(self.shards)) if bounds[k + 1] > bounds[k]]

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = self.engine.run("take", [
            (worker.take_task, self.shards[k], local) for k, local in self.split(idx)])
        if not parts:
            return np.zeros((0, *self.sample_shape()), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def labels(self, idx: np.ndarray | None = None) -> np.ndarray:
        idx = np.arange(len(self)) if idx is None else idx
        parts = self.engine.run("labels", [
            (worker.labels_task, self.shards[k], local) for k, local in self.split(idx)])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.take(np.zeros(1, np.int64))[0].shape[1:])

    def validate(self, input_shape: list[int | str], n_classes: int | None,
                 labels: str = "classes") -> None:
        key = (tuple(input_shape), n_classes, labels)
        if key in self._validated:
            return
        if labels != "classes":
            raise OnnxfbpError("--dask refines classifiers (integer class labels) for now; "
                               "run regression and dense tasks without --dask")
        if len(self) == 0:
            raise OnnxfbpError(f"{self.source} holds no samples; give at least one "
                               "labelled sample")
        self.engine.timed("validate", [
            (worker.validate_task, ref, list(input_shape), n_classes) for ref in self.shards])
        self._validated.add(key)


class ClusterState(ModelState):
    """A :class:`ModelState` whose passes over :class:`ShardData` run on a cluster."""

    def __init__(self, client: Any, model_path: Any, config: RefineConfig,
                 progress: Progress) -> None:
        super().__init__(model_path, config)
        self.client = client
        self.progress = progress
        self.phases: dict[str, dict[str, float]] = {}
        self.live: list[Any] = []  # futures of the operation under way (cancelled on error)
        self.calls = 0  # sums passes so far: seeds each one's conv position draws
        self.settings = config.to_dict()  # threads None: each worker's Dask nthreads
        started = time.perf_counter()
        _same_onnxfbp(client)
        # the model goes to every worker once; tasks name it by this future
        self.model_ref = client.scatter(self.model.SerializeToString(), broadcast=True,
                                        hash=False)
        self._phase("send_model", time.perf_counter() - started, 0.0, 0)

    @property
    def minibatch_schedule(self) -> type:
        """The ``minibatch`` schedule's cluster form (:mod:`onnxfbp.cluster.minibatch`)."""
        from .minibatch import ClusterMinibatch  # noqa: PLC0415

        return ClusterMinibatch

    # ------------------------------------------------------------ tasks

    def _phase(self, name: str, wall: float, busy: float, tasks: int) -> None:
        p = self.phases.setdefault(name, {"seconds": 0.0, "worker_seconds": 0.0, "tasks": 0})
        p["seconds"] += wall
        p["worker_seconds"] += busy
        p["tasks"] += tasks

    def run(self, phase: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run ``fn(*args)`` of each call on the cluster; the results in call order."""
        started = time.perf_counter()
        futures = [self.client.submit(fn, *args, pure=False) for fn, *args in calls]
        results = self._wait(phase, futures)
        self._phase(phase, time.perf_counter() - started, 0.0, len(futures))
        return [results[f.key] for f in futures]

    def timed(self, phase: str, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """As :meth:`run` for tasks that return ``(result, seconds)``."""
        started = time.perf_counter()
        futures = [self.client.submit(fn, *args, pure=False) for fn, *args in calls]
        results = self._wait(phase, futures)
        out = [results[f.key] for f in futures]
        busy = sum(r[1] if isinstance(r, tuple) else r for r in out)
        self._phase(phase, time.perf_counter() - started, busy, len(futures))
        return [r[0] if isinstance(r, tuple) else r for r in out]

    def _wait(self, phase: str, futures: list[Any], fetch: bool = True) -> dict[str, Any]:
        """Wait for ``futures`` (progress: shards done, workers busy); their results
        by key (none unless ``fetch``). Any failure cancels the rest."""
        from distributed import as_completed  # noqa: PLC0415

        self.live = list(futures)
        results: dict[str, Any] = {}
        try:
            for done, fut in enumerate(as_completed(futures), 1):
                if fetch or fut.status != "finished":
                    results[fut.key] = fut.result()  # raises the task's error
                self.progress(ShardsDone(phase, done, len(futures), self._busy()))
        except OnnxfbpError:
            self.cancel()
            raise
        except (KeyboardInterrupt, SystemExit):
            self.cancel()
            raise
        except Exception as exc:
            self.cancel()
            raise _failed(phase, exc) from exc
        self.live = []
        return results

    def _busy(self) -> int:
        try:
            return sum(1 for keys in self.client.processing().values() if keys)
        except Exception:  # noqa: BLE001 (progress only: never fail a run for it)
            return 0

    def cancel(self) -> None:
        """Cancel the tasks of the operation under way."""
        if self.live:
            try:
                self.client.cancel(self.live, force=True)
            finally:
                self.live = []

    def _values(self) -> Any:
        """The current refined initializers, scattered to every worker once."""
        # (in a list: a dict alone would be scattered as one future per entry)
        return self.client.scatter([dict(self.values)], broadcast=True, hash=False)[0]

    # ------------------------------------------------------------ passes

    def _again(self, run: Callable[[], Any]) -> Any:
        """``run()``; once more if a worker was lost under it (Dask's own retries
        cover most losses; a result lost while the driver fetched it is not)."""
        try:
            return run()
        except _Lost as exc:
            if not self.client.scheduler_info().get("workers"):
                raise
            self.progress(Message(f"{exc}: rerunning the pass on the workers left"))
            return run()

    def cluster_sums(self, ctx: RunContext, layers: list[Layer],
                     downstream: dict[str, list[int]]) -> dict[str, LayerSums]:
        """:func:`onnxfbp.fit.normal.accumulate` on the shards, reduced on the cluster."""
        return self._again(lambda: self._sums(ctx, layers, downstream))

    def _sums(self, ctx: RunContext, layers: list[Layer],
              downstream: dict[str, list[int]]) -> dict[str, LayerSums]:
        data = ctx.data
        assert isinstance(data, ShardData)
        self.calls += 1
        started = time.perf_counter()
        values = self._values()
        train, val = dict(data.split(ctx.train_idx)), dict(data.split(ctx.val_idx))
        empty = np.zeros(0, np.int64)
        names = [layer.name for layer in layers]
        leaves = [
            self.client.submit(
                worker.sums_task, self.model_ref, self.settings, values, ref,
                train.get(k, empty), val.get(k, empty), names, downstream,
                [self.config.split.seed, SEED_SALT, 3, self.calls, k], pure=False)
            for k, ref in enumerate(data.shards)
        ]
        level = list(leaves)
        tree = []
        while len(level) > 1:  # the fixed reduction tree: pairs in shard order
            nxt = [self.client.submit(worker.add_parts, level[i], level[i + 1], pure=False)
                   for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            tree += nxt
            level = nxt
        self._wait("sums", leaves, fetch=False)
        self.live = [*leaves, *tree]
        try:
            parts, busy = level[0].result()
        except (KeyboardInterrupt, SystemExit):
            self.cancel()
            raise
        except Exception as exc:
            self.cancel()
            raise _failed("sums", exc) from exc
        self.live = []
        stats = new_sums(self, layers)
        for name, (g, c, tr, vg, vc, vv) in parts.items():
            st = stats[name]
            for eq, gram, cross, extra in ((st.train, g, c, tr), (st.val, vg, vc, vv)):
                eq.gram = self.xp.asarray(gram)
                eq.cross = self.xp.asarray(cross)
                eq.target_sq, eq.rows = float(extra[0]), int(extra[1])
        wall = time.perf_counter() - started
        self._phase("sums", wall, busy, len(leaves) + len(tree))
        self.clock.forward += wall
        return stats

    def scores(self, data: LabelledData, idx: np.ndarray) -> tuple[float, int, np.ndarray]:
        if not isinstance(data, ShardData):
            return super().scores(data, idx)
        return self._again(lambda: self._scores(data, idx))

    def _scores(self, data: ShardData, idx: np.ndarray) -> tuple[float, int, np.ndarray]:
        values = self._values()
        parts = self.timed("scores", [
            (worker.scores_task, self.model_ref, self.settings, values, data.shards[k], local)
            for k, local in data.split(idx)])
        loss = float(sum(p[0] for p in parts))
        correct = int(sum(p[1] for p in parts))
        preds = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        return loss, correct, preds

    def cluster_features(self, data: LabelledData, idx: np.ndarray, name: str,
                         bias_column: bool) -> np.ndarray:
        """:func:`onnxfbp.fit.head.features` on the shards, rows in ``idx`` order."""
        assert isinstance(data, ShardData)
        return self._again(
            lambda: self._features(data, idx, name, bias_column))

    def _features(self, data: ShardData, idx: np.ndarray, name: str,
                  bias_column: bool) -> np.ndarray:
        values = self._values()
        parts = self.timed("features", [
            (worker.features_task, self.model_ref, self.settings, values, data.shards[k],
             local, name, bias_column) for k, local in data.split(idx)])
        parts = [p for p in parts if len(p)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def record(self) -> dict[str, Any]:
        """The report's ``environment.cluster``: workers, threads, phases."""
        info = self.client.scheduler_info()
        workers = info.get("workers", {})
        return {
            "scheduler": str(info.get("address", "")),
            "workers": len(workers),
            "threads": int(sum(w.get("nthreads", 0) for w in workers.values())),
            "onnxruntime_threads": self.settings["run"]["threads"] or "each worker's threads",
            "schedule": self.config.schedule,
            "phases": {k: dict(v) for k, v in self.phases.items()},
        }


def _same_onnxfbp(client: Any) -> None:
    """A one-line error unless every worker runs this onnxfbp version."""
    from .. import __version__  # noqa: PLC0415

    hint = ("install the same onnxfbp (pip install 'onnxfbp[dask]') on the scheduler and "
            "every worker host, then rerun")
    try:
        versions = client.run(worker.version)
    except Exception as exc:  # noqa: BLE001 (an unpickling error names the missing module)
        raise ClusterError(f"the Dask workers cannot run onnxfbp ({type(exc).__name__}: "
                           f"{_why(exc)}); {hint}") from exc
    other = sorted({v for v in versions.values() if v != __version__})
    if other:
        raise ClusterError(f"the Dask workers run onnxfbp {', '.join(other)}, this process "
                           f"{__version__}; {hint}")


def open_data(engine: ClusterState, path: str, what: str,
              check: Callable[[str], None] | None = None) -> ShardData:
    """The shards at ``path`` as every worker sees it; a one-line error if any
    worker cannot read it (before any work)."""
    from ..data import DataError  # noqa: PLC0415

    path = str(path)
    started = time.perf_counter()
    problems = {w: why for w, why in engine.client.run(worker.readable, path).items() if why}
    if problems:
        addr, why = sorted(problems.items())[0]
        raise DataError(f"{what} {why} (worker {addr}, {len(problems)} of "
                        f"{len(engine.client.scheduler_info()['workers'])} workers); with --dask "
                        "the data must be on storage every worker can read at the same path")
    shards = engine.run("list", [(worker.list_shards, path, engine.plan.input_name)])[0]
    engine._phase("open_data", time.perf_counter() - started, 0.0, 1)
    return ShardData(path, shards, engine)
