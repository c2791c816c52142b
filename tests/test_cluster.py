"""Refine on a Dask cluster (onnxfbp.cluster): a LocalCluster of 2 worker
processes, the demo model, 600 of its samples in 3 shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

distributed = pytest.importorskip("distributed")

from onnxfbp.cluster import ClusterError, parse_spec, start  # noqa: E402
from onnxfbp.config import RefineConfig  # noqa: E402
from onnxfbp.data import load_data  # noqa: E402
from onnxfbp.errors import DataError  # noqa: E402
from onnxfbp.events import Event, ShardsDone  # noqa: E402
from onnxfbp.fit.normal import accumulate  # noqa: E402
from onnxfbp.refine import refine, split  # noqa: E402
from onnxfbp.schedules.minibatch import Minibatch  # noqa: E402
from onnxfbp.schedules.state import ModelState, RunContext, Score  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
MODEL = PROJECT / "models" / "demo_mnist_cnn.onnx"
# the two dense layers (no convolution: no random positions), one sweep
CONFIG = RefineConfig.of(schedule="jacobi", max_layers=2, sweeps=1, threads=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    with np.load(PROJECT / "models" / "demo_adapt.npz") as z:
        x, y = z["input"][:600], z["y"][:600]
    for k in range(3):
        np.savez(folder / f"part-{k}.npz", x=x[k * 200:(k + 1) * 200], y=y[k * 200:(k + 1) * 200])
    return folder


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=50)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _weights(result: Any) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}


def _quiet(event: Event) -> None:
    pass


def test_spec_is_local_n_or_an_address() -> None:
    assert parse_spec("local:3") == ("local", 3)
    assert parse_spec("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "local:x", "nowhere"):
        with pytest.raises(ClusterError, match="local:N"):
            parse_spec(bad)


def test_sums_on_the_cluster_equal_one_process(client: Any, shards: Path) -> None:
    """The normal equations reduced on the cluster are the single-process sums up
    to float32 summation order."""
    state, data, _ = start(client, MODEL, CONFIG, shards, None, None, _quiet)
    local = ModelState(MODEL, CONFIG)
    rng, train, val = split(len(data), CONFIG)
    here = accumulate(local, RunContext(load_data(shards), train, val, rng, Score(0, 0), _quiet),
                      local.layers, local.downstream)
    there = accumulate(state, RunContext(data, train, val, rng, Score(0, 0), _quiet),
                       state.layers, state.downstream)
    assert list(here) == list(there) and len(here) == 2
    for name in here:
        for a, b in ((here[name].train, there[name].train), (here[name].val, there[name].val)):
            assert a.rows == b.rows > 0
            for f in ("gram", "cross"):
                u, v = getattr(a, f), getattr(b, f)
                assert np.linalg.norm(u - v) <= 1e-6 * np.linalg.norm(u), (name, f)


def test_cluster_refine_matches_one_process(client: Any, shards: Path, tmp_path: Path) -> None:
    """Same seed, same data: the same held-out accuracy, and weights equal to the
    tolerance the solves' conditioning allows (see docs/cluster.md)."""
    one = refine(MODEL, None, shards, config=CONFIG)
    events: list[Event] = []
    out = tmp_path / "out.onnx"
    two = refine(MODEL, out, shards, config=CONFIG, client=client, progress=events.append)
    assert out.is_file()
    assert two.heldout_after.accuracy == one.heldout_after.accuracy > one.heldout_before.accuracy
    w1, w2 = _weights(one), _weights(two)
    w0 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(MODEL)).graph.initializer}
    assert sum(not np.array_equal(w0[k], w2[k]) for k in w0) == 4  # two layers' W and b
    for k in w1:
        assert np.linalg.norm(w1[k] - w2[k]) <= 2e-3 * max(np.linalg.norm(w1[k]), 1e-12), k
    record = two.environment["cluster"]
    assert record["workers"] == 2 and record["threads"] == 2
    assert record["phases"]["sums"]["tasks"] >= 3 and record["phases"]["sums"]["worker_seconds"] > 0
    done = [e for e in events if isinstance(e, ShardsDone) and e.phase == "sums"]
    assert done[-1].done == done[-1].total


def _minibatch(state: ModelState, data: Any, config: RefineConfig) -> dict[str, np.ndarray]:
    """The minibatch schedule alone on ``state`` (its cluster form on a cluster
    state); each layer's weights after its last step."""
    rng, train, val = split(len(data), config)
    loss, correct, _ = state.scores(data, val)
    ctx = RunContext(data, train, val, rng, Score(loss, correct), _quiet)
    run = getattr(state, "minibatch_schedule", Minibatch)(state, ctx)
    run.run()
    assert not run.diverged and not run.skipped
    assert not any(np.array_equal(np.asarray(w), run.w_start[n]) for n, w in run.weights.items())
    return {name: np.asarray(w) for name, w in run.weights.items()}


def test_minibatch_steps_on_the_cluster_equal_one_process(client: Any, shards: Path) -> None:
    """The default schedule in its cluster form (each mini-batch cut into
    per-shard slices, the convolutions' positions drawn as one process draws
    them): the same steps as one process, every layer, the convolutions and the
    kept branch included, so the weights after the last step agree to float32
    tolerance (measured: dense 6e-7, convolutions 9e-5, onnxruntime's float32
    passes over slices of the batch instead of the whole)."""
    config = CONFIG.replace(schedule="minibatch", max_layers=None)
    state, data, _ = start(client, MODEL, config, shards, None, None, _quiet)
    local = ModelState(MODEL, config)
    here = _minibatch(local, load_data(shards), config)
    there = _minibatch(state, data, config)
    assert len(here) == 4 and state.kept_branch == local.kept_branch is not None
    for layer in local.layers:
        a, b = here[layer.name], there[layer.name]
        tol = 1e-5 if layer.kind == "dense" else 3e-4
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(a), layer.name
    phases = state.record()["phases"]
    assert phases["steps"]["tasks"] > 3 and phases["precondition"]["tasks"] == 3


def test_unreadable_data_is_one_line_before_any_work(client: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(DataError, match="does not exist on worker host") as info:
        refine(MODEL, out, tmp_path / "nowhere", config=CONFIG, client=client)
    assert "\n" not in str(info.value) and "every worker can read" in str(info.value)
    assert not out.exists()
    with pytest.raises(DataError, match="must be a path every worker can read"):
        refine(MODEL, None, (np.zeros((10, 1, 28, 28), np.float32), np.zeros(10, np.int64)),
               config=CONFIG, client=client)


def test_cli_against_a_running_scheduler(client: Any, shards: Path, tmp_path: Path) -> None:
    """``--dask ADDRESS``: the model and the report are written, the report
    records the cluster and its schedule: the default minibatch schedule's
    cluster form (its steps and preconditioner), then the output layer's solve."""
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    address = client.scheduler.address
    proc = subprocess.run(
        [sys.executable, "-m", "onnxfbp", "refine", str(MODEL), str(out), "--data", str(shards),
         "--report", str(report), "--dask", address, "--max-layers", "2", "--sweeps", "1"],
        capture_output=True, text=True, cwd=PROJECT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "cluster schedule: minibatch" in proc.stderr + proc.stdout
    rep = json.loads(report.read_text())
    cluster = rep["environment"]["cluster"]
    assert rep["config"]["schedule"] == cluster["schedule"] == "minibatch"
    assert cluster["workers"] == 2
    assert {"precondition", "steps", "features"} <= set(cluster["phases"])


def test_ctrl_c_cancels_the_tasks_and_writes_nothing(client: Any, shards: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"

    def interrupt(event: Event) -> None:
        if isinstance(event, ShardsDone) and event.phase == "sums":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        refine(MODEL, out, shards, config=CONFIG, client=client, progress=interrupt)
    assert not out.exists()
    deadline = time.monotonic() + 20
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(client.processing().values())


def test_a_worker_killed_mid_run_is_survived(client: Any, shards: Path) -> None:
    """Kill a worker process while the sums run: Dask reruns its tasks elsewhere
    and the result is the undisturbed one (the reduction order is fixed)."""
    calm = refine(MODEL, None, shards, config=CONFIG, client=client)
    pids = client.run(os.getpid)
    killed: list[int] = []

    def kill_one(event: Event) -> None:
        if isinstance(event, ShardsDone) and event.phase == "sums" and not killed:
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    hit = refine(MODEL, None, shards, config=CONFIG, client=client, progress=kill_one)
    assert killed
    assert hit.heldout_after.accuracy == calm.heldout_after.accuracy
    w1, w2 = _weights(calm), _weights(hit)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-6, atol=1e-7)
