"""Refine on a Dask cluster (``refine(..., client=...)``, ``onnxfbp refine --dask``).

The schedules run in their cluster form: the default ``minibatch`` schedule
(:mod:`onnxfbp.cluster.minibatch`) takes the single-process steps, each
mini-batch cut into per-shard slices whose sums the workers compute; ``jacobi``
and ``sequential`` sweeps take every layer's exact normal equations from one pass
over all shards. The driver reduces in float64 in shard order, solves, and
broadcasts the new weights. The minibatch schedule's weights follow the
single-process weights to float32 tolerance (the random draws are the
single-process draws); the sweeps' convolution rows are drawn per shard, so
their weights are equal in distribution only. See docs/cluster.md.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import RefineConfig
from ..events import Message, Progress
from .client import cluster_client, parse_spec
from .engine import ClusterError, ClusterState, ShardData, open_data

__all__ = ["ClusterError", "ClusterState", "ShardData", "cluster_client", "parse_spec", "start"]


def cluster_config(config: RefineConfig, progress: Progress) -> RefineConfig:
    """The run's settings on a cluster (the schedules run in their cluster form)."""
    if config.schedule == "minibatch":
        progress(Message("cluster schedule: minibatch, each step's mini-batch cut into "
                         "per-shard slices run on the workers"))
    return config


def start(
    client: Any, model: str | os.PathLike[str], config: RefineConfig, data: Any,
    eval_data: Any, retain_data: Any, progress: Progress,
) -> tuple[ClusterState, ShardData, ShardData | None]:
    """The driver's state and the data on the workers' storage, checked readable by
    every worker before any work."""
    from ..errors import DataError  # noqa: PLC0415

    if retain_data is not None:
        raise ClusterError("--retain-data is not supported with --dask yet; "
                           "run without --dask to keep original-domain accuracy")
    for what, value in (("data", data), ("eval data", eval_data)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise DataError(f"with a cluster the {what} must be a path every worker can read "
                            "(a folder of .npz shards, an x.npy + y.npy folder or an .npz), "
                            "not arrays in this process; save them there")
    state = ClusterState(client, model, cluster_config(config, progress), progress)
    adapt = open_data(state, str(data), "data")
    held = open_data(state, str(eval_data), "eval data") if eval_data is not None else None
    return state, adapt, held
