"""Connect to a Dask cluster: ``local:N`` (a LocalCluster of N worker processes
on this machine) or the address of a running scheduler (``tcp://host:8786``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from .engine import ClusterError

__all__ = ["cluster_client", "local_threads", "optional_client", "parse_spec"]

_HINT = "give --dask local:N (N worker processes here) or a scheduler address tcp://host:8786"


def parse_spec(spec: str) -> tuple[str, int | str]:
    """``("local", N)`` or ``("address", spec)``; a one-line error otherwise."""
    spec = spec.strip()
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            workers = int(n) if n else os.cpu_count() or 1
        except ValueError:
            workers = 0
        if workers < 1:
            raise ClusterError(f"--dask {spec}: N must be a whole number of workers >= 1; "
                               + _HINT)
        return "local", workers
    if "://" in spec or ":" in spec:
        return "address", spec
    raise ClusterError(f"--dask {spec!r} is neither local:N nor a scheduler address; " + _HINT)


def local_threads(workers: int) -> int:
    """onnxruntime threads per local worker: this machine's cores shared out."""
    return max(1, (os.cpu_count() or 1) // workers)


def _import() -> Any:
    try:
        import distributed  # noqa: PLC0415
    except ImportError as exc:
        raise ClusterError("--dask needs dask's distributed scheduler; "
                           "pip install 'onnxfbp[dask]'") from exc
    return distributed


@contextmanager
def cluster_client(spec: str, timeout: float = 20.0) -> Iterator[Any]:
    """A connected ``distributed.Client``, closed afterwards (a LocalCluster with it;
    its N workers share this machine's cores)."""
    distributed = _import()
    kind, value = parse_spec(spec)
    if kind == "local":
        assert isinstance(value, int)
        cluster = distributed.LocalCluster(
            n_workers=value, threads_per_worker=local_threads(value), processes=True,
            dashboard_address=":0", silence_logs=40)
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = distributed.Client(str(value), timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {value} ({exc}); start it "
                           "(dask scheduler) or check the address") from exc
    try:
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=timeout)
        yield client
    except TimeoutError as exc:
        raise ClusterError(f"the Dask scheduler at {value} has no worker after {timeout:.0f} s; "
                           "start dask worker processes against it") from exc
    finally:
        client.close()


def optional_client(spec: str | None) -> Any:
    """:func:`cluster_client` for ``--dask SPEC``; without one, no client (None)."""
    return nullcontext(None) if spec is None else cluster_client(spec)
