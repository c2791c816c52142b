"""What runs on a Dask worker: the tasks of a cluster refine, one shard each.

A shard is a :class:`ShardRef`: an ``.npz`` file, or rows ``[start, stop)`` of
the ``x.npy`` / ``y.npy`` pair of a folder. The worker reads it itself (the
driver never holds samples) and keeps the last few it read.

The model reaches a worker once, as bytes scattered to every worker; the worker
builds one :class:`ModelState` per (model hash, settings) and keeps it, so each
task only sets the current weights (the refined initializers, small) and runs.
Tasks of one process share that state under a lock (one task at a time per
worker process; ``local:N`` starts one thread per worker).

Every task returns its result and the seconds it ran (``busy``), which the
driver sums per phase (:mod:`onnxfbp.cluster.engine`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RefineConfig
from ..data import LabelledData, from_arrays, load_data
from ..errors import DataError

__all__ = ["ShardRef", "add_parts", "version", "features_task", "labels_task", "list_shards",
           "readable", "scores_task", "sums_task", "take_task", "validate_task"]

NPY_ROWS = 5000  # rows per shard of an x.npy / y.npy folder
_LOCK = threading.Lock()
_STATES: OrderedDict[tuple[str, str], Any] = OrderedDict()
_DATA: OrderedDict[ShardRef, LabelledData] = OrderedDict()
_KEEP_STATES, _KEEP_SHARDS = 2, 4


@dataclass(frozen=True)
class ShardRef:
    """One shard: ``path`` (an ``.npz`` file, or a folder holding ``x.npy`` and
    ``y.npy``: then its rows ``start`` to ``stop``)."""

    path: str
    start: int
    stop: int
    npy: bool = False
    input_key: str | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start


def version() -> str:
    """The onnxfbp version this worker runs."""
    from .. import __version__  # noqa: PLC0415

    return __version__


def readable(path: str) -> str | None:
    """Why this worker cannot read ``path`` (None: it can). Run on every worker."""
    p = Path(path)
    if not p.exists():
        return f"{path} does not exist on worker host {os.uname().nodename}"
    if not os.access(p, os.R_OK):
        return f"{path} is not readable on worker host {os.uname().nodename}"
    return None


def list_shards(path: str, input_key: str | None) -> list[ShardRef]:
    """The shards at ``path`` (a shard folder, an ``x.npy`` + ``y.npy`` folder or
    one ``.npz``), read by a worker (labels and headers only)."""
    p = Path(path)
    if p.is_dir() and not (p / "y.npy").is_file():
        files = sorted(str(f) for f in p.glob("*.npz") if f.is_file())
        if not files:
            raise DataError(f"{path} holds neither x.npy + y.npy nor .npz shards; "
                            "see 'Data formats' in the README")
        return [ShardRef(f, 0, _count(f), False, input_key) for f in files]
    if p.is_dir():
        n = len(load_data(p, input_key))
        return [ShardRef(path, s, min(s + NPY_ROWS, n), True, input_key)
                for s in range(0, n, NPY_ROWS)]
    return [ShardRef(path, 0, _count(path), False, input_key)]


def _count(path: str) -> int:
    """Samples in one ``.npz`` (its labels' header only)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("y.npy") as f:
            version = np.lib.format.read_magic(f)
            shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                     else np.lib.format.read_array_header_2_0(f))[0]
        return int(shape[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, IndexError):
        return len(load_data(path))  # let the full read name the problem


def open_shard(ref: ShardRef) -> LabelledData:
    """The samples of ``ref`` (kept for the next tasks)."""
    with _LOCK:
        data = _DATA.get(ref)
        if data is not None:
            _DATA.move_to_end(ref)
            return data
    if ref.npy:
        whole = load_data(ref.path, ref.input_key)
        x, y = whole.parts[0].x, whole.parts[0].y
        data = from_arrays(x[ref.start:ref.stop], y[ref.start:ref.stop],
                           f"{ref.path} rows {ref.start}-{ref.stop}")
    else:
        data = load_data(ref.path, ref.input_key)
    with _LOCK:
        _DATA[ref] = data
        while len(_DATA) > _KEEP_SHARDS:
            _DATA.popitem(last=False)
    return data


def _state(model: bytes, settings: dict[str, Any]) -> Any:
    """This process's :class:`ModelState` of ``model`` with ``settings`` (built once)."""
    from ..schedules.state import ModelState  # noqa: PLC0415

    if settings["run"]["threads"] is None:  # onnxruntime: the threads Dask gives this worker
        settings = {**settings, "run": {**settings["run"], "threads": _nthreads()}}
    digest = hashlib.sha256(model).hexdigest()
    key = (digest, repr(sorted(settings.items())))
    state = _STATES.get(key)
    if state is None:
        path = Path(tempfile.gettempdir()) / f"onnxfbp-{digest[:16]}.onnx"
        if not path.is_file() or path.stat().st_size != len(model):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(model)
            os.replace(tmp, path)
        state = ModelState(path, RefineConfig.from_settings(settings))
        _STATES[key] = state
        while len(_STATES) > _KEEP_STATES:
            _STATES.popitem(last=False)
    return state


def _nthreads() -> int | None:
    try:
        from distributed import get_worker  # noqa: PLC0415

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def _with_values(model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray]) -> Any:
    state = _state(model, settings)
    state.values = {**state.original, **values}
    return state


@contextmanager
def busy(
    model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray], ref: ShardRef
) -> Iterator[tuple[Any, LabelledData, Callable[[], float]]]:
    """A task's shard and the model state at ``values``, under the worker's lock,
    and a clock of the task's busy seconds: the shard's read and everything from
    taking the lock on (not the wait for another task)."""
    started = time.perf_counter()
    data = open_shard(ref)
    read = time.perf_counter() - started
    with _LOCK:
        started = time.perf_counter() - read
        yield _with_values(model, settings, values), data, lambda: time.perf_counter() - started


def validate_task(ref: ShardRef, input_shape: list[Any], n_classes: int | None) -> float:
    """Check the shard against the model (:meth:`LabelledData.validate`)."""
    started = time.perf_counter()
    open_shard(ref).validate(input_shape, n_classes)
    return time.perf_counter() - started


def sums_task(
    model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray], ref: ShardRef,
    train: np.ndarray, val: np.ndarray, names: list[str], downstream: dict[str, list[int]],
    seed: list[int],
) -> tuple[dict[str, tuple[Any, ...]], float]:
    """The shard's normal equations of the layers ``names`` (local rows ``train``
    and ``val``); conv positions drawn with ``default_rng(seed)``."""
    from ..fit.normal import add_rows, new_sums  # noqa: PLC0415

    with busy(model, settings, values, ref) as (state, data, seconds):
        by_name = {layer.name: layer for layer in state.plan.refinable}
        layers = [by_name[n] for n in names]
        stats = new_sums(state, layers)
        add_rows(state, stats, layers, downstream, [(0, data, train), (1, data, val)],
                 np.random.default_rng(seed))
    out = {name: (st.train.gram, st.train.cross, np.array([st.train.target_sq, st.train.rows]),
                  st.val.gram, st.val.cross, np.array([st.val.target_sq, st.val.rows]))
           for name, st in stats.items()}
    return out, seconds()


def add_parts(
    a: tuple[dict[str, tuple[np.ndarray, ...]], float],
    b: tuple[dict[str, tuple[np.ndarray, ...]], float],
) -> tuple[dict[str, tuple[np.ndarray, ...]], float]:
    """Two partial sums added, float64 (a node of the fixed reduction tree)."""
    started = time.perf_counter()
    out = {name: tuple(x + y for x, y in zip(a[0][name], b[0][name], strict=True))
           for name in a[0]}
    return out, a[1] + b[1] + time.perf_counter() - started


def scores_task(
    model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray], ref: ShardRef,
    local: np.ndarray,
) -> tuple[tuple[float, int, np.ndarray], float]:
    """Summed cross-entropy, correct count and predictions of rows ``local``."""
    with busy(model, settings, values, ref) as (state, data, seconds):
        result = state.scores(data, local)
    return result, seconds()


def features_task(
    model: bytes, settings: dict[str, Any], values: dict[str, np.ndarray], ref: ShardRef,
    local: np.ndarray, name: str, bias_column: bool,
) -> tuple[np.ndarray, float]:
    """The tensor ``name`` of rows ``local``, one row per sample."""
    from ..fit.head import features  # noqa: PLC0415

    with busy(model, settings, values, ref) as (state, data, seconds):
        out = features(state, data, local, name, bias_column)
    return out, seconds()


def take_task(ref: ShardRef, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``local`` of the shard: (float32 inputs, int64 labels)."""
    return open_shard(ref).take(local)


def labels_task(ref: ShardRef, local: np.ndarray | None) -> np.ndarray:
    """Labels of rows ``local`` (all with None)."""
    return open_shard(ref).labels(local)
