"""Refine on a Dask cluster (``refine(..., client=...)``, ``onnxfbp refine --dask``).

The cluster schedule: the default ``minibatch`` schedule takes thousands of small
sequential steps, each of which would be one round trip to the cluster, so on a
cluster a run uses the ``jacobi`` full-pass sweeps instead (every layer's exact
normal equations from one pass over all shards, a ridge solve on the driver,
the joint update judged on the held-out shards), then the output layer's
logistic-regression optimum, as a single-process ``jacobi`` run does. With the
same seed and data the weights equal the single-process ``jacobi`` weights to
float32 reduction tolerance where no convolution is refined (a convolution's
rows are drawn at random output positions: per shard on a cluster, so equal
only in distribution). See docs/cluster.md.
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
    """The run's settings on a cluster: the ``minibatch`` schedule becomes ``jacobi``."""
    if config.schedule != "minibatch":
        return config
    progress(Message("cluster schedule: jacobi sweeps with exact normal equations over all "
                     "shards (the minibatch schedule's small sequential steps do not map onto "
                     "a cluster)"))
    return config.replace(schedule="jacobi")


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
