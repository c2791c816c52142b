"""Benchmarks of ``onnxfbp refine --dask`` (issue 22; docs/cluster.md).

    python tools/cluster_bench.py prepare DIR     # shards of the shared CNN's data
    python tools/cluster_bench.py overhead DIR    # 5,000: --dask local:2 vs one process
                                                  # (minibatch and jacobi each)
    python tools/cluster_bench.py scaling DIR     # 50,000: --dask local:1 vs local:2
    python tools/cluster_bench.py memory DIR      # driver peak RSS, 50,000 vs 500,000

The shared CNN is ``mnist_pytorch25_legacy_cnn.onnx`` (``ONNXFBP_MODELS_DIR``) on
MNIST test images (``ONNXFBP_DATA_DIR``), preprocessed as its MANIFEST says:

- ``5k/``: the first 5,000 images rotated (``tools/shifts.py`` ``rot``, seed 1), 4 shards;
- ``50k/``: those 5,000 images under 10 shifts (``rot`` with seeds 1 and 2, and the
  other 8 shifts of ``tools/shifts.py``, seed 1), 10 shards of 5,000;
- ``eval.npz``: the last 5,000 images rotated (seed 2), the accuracy the runs are judged by;
- ``replay50k/``, ``replay500k/``: 10 and 100 links to one shard of 5,000 demo-model
  samples (a run that only checks memory: ``--max-layers 1``, the demo model).

Each run is a whole ``onnxfbp refine`` process (timed with ``os.wait4``); the phase
times come from its report's ``environment.cluster.phases``. ``memory`` runs the
driver against a scheduler and two workers started here (``dask scheduler``,
``dask worker``), so that the driver's peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import ROOT, child_env, run_timed_process

MODEL = "mnist_pytorch25_legacy_cnn.onnx"


def _models() -> Path:
    return Path(os.environ.get("ONNXFBP_MODELS_DIR", ROOT.parent / "shared" / "models"))


def prepare(out: Path) -> None:
    import numpy as np
    from benchlib import load_images01, prep_nchw_pm1
    from shifts import SHIFTS, apply_shift

    x01, y = load_images01("mnist")
    first, last = x01[:5000], x01[5000:]
    (out / "5k").mkdir(parents=True, exist_ok=True)
    rot = prep_nchw_pm1(apply_shift(first, "rot", 1))
    for k in range(4):
        sl = slice(k * 1250, (k + 1) * 1250)
        np.savez(out / "5k" / f"part-{k}.npz", x=rot[sl], y=y[:5000][sl])
    np.savez(out / "eval.npz", x=prep_nchw_pm1(apply_shift(last, "rot", 2)), y=y[5000:])
    (out / "50k").mkdir(exist_ok=True)
    shifts = [("rot", 1), ("rot", 2)] + [(s, 1) for s in SHIFTS if s != "rot"][:8]
    for k, (name, seed) in enumerate(shifts):
        np.savez(out / "50k" / f"part-{k:02d}-{name}{seed}.npz",
                 x=prep_nchw_pm1(apply_shift(first, name, seed)), y=y[:5000])
    with np.load(ROOT / "models" / "demo_adapt.npz") as z:
        xs, ys = z["input"], z["y"]
    reps = int(np.ceil(5000 / len(ys)))
    np.savez(out / "replay.npz", input=np.concatenate([xs] * reps)[:5000],
             y=np.concatenate([ys] * reps)[:5000])
    for name, count in (("replay50k", 10), ("replay500k", 100)):
        (out / name).mkdir(exist_ok=True)
        for k in range(count):
            link = out / name / f"part-{k:03d}.npz"
            if not link.exists():
                link.symlink_to(out / "replay.npz")
    print(f"wrote shards under {out}")


def _refine(data: Path, extra: list[str], tag: str, out: Path,
            model: str | None = None) -> dict[str, Any]:
    """One whole ``onnxfbp refine`` process; its wall time, CPU, peak RSS and report."""
    model = model or str(_models() / MODEL)
    report = out / f"report-{tag}.json"
    cmd = [sys.executable, "-m", "onnxfbp", "refine", model, str(out / f"refined-{tag}.onnx"),
           "--data", str(data), "--report", str(report), "--force", "--quiet", *extra]
    timed = run_timed_process(cmd, 3600, child_env())
    if timed.code != 0:
        raise SystemExit(f"{tag}: exit {timed.code}: {timed.stderr[-2000:]}")
    rep = json.loads(report.read_text())
    row = {
        "run": tag, "wall_s": round(timed.wall_s, 2), "cpu_s": round(timed.cpu_s, 2),
        "peak_rss_mb": round(timed.peak_rss_mb, 1),
        "other_load": round(timed.other_load, 2),
        "heldout_after": rep["heldout"]["after"]["accuracy"],
        "eval_before": (rep["eval"] or {}).get("before", {}).get("accuracy"),
        "eval_after": ((rep["eval"] or {}).get("after") or {}).get("accuracy"),
        "schedule": rep["config"]["schedule"],
        "timings": {k: round(v, 2) for k, v in rep["timings"].items()},
    }
    cluster = rep["environment"].get("cluster")
    if cluster:
        row["phases"] = {k: {kk: round(vv, 2) for kk, vv in v.items()}
                         for k, v in cluster["phases"].items()}
    print(json.dumps(row), flush=True)
    return row


def overhead(root: Path) -> None:
    ev = ["--eval-data", str(root / "eval.npz")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _refine(root / "5k", ev, "one-process-minibatch", out)
        _refine(root / "5k", [*ev, "--schedule", "jacobi"], "one-process-jacobi", out)
        _refine(root / "5k", [*ev, "--dask", "local:2"], "dask-local2-minibatch", out)
        _refine(root / "5k", [*ev, "--schedule", "jacobi", "--dask", "local:2"],
                "dask-local2-jacobi", out)


def scaling(root: Path) -> None:
    ev = ["--eval-data", str(root / "eval.npz")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        quick = ["--sweeps", "1"]  # one full pass: the phase times are per pass
        _refine(root / "50k", [*ev, *quick, "--dask", "local:1"], "50k-dask-local1", out)
        _refine(root / "50k", [*ev, *quick, "--dask", "local:2"], "50k-dask-local2", out)


def _start_cluster(log: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """``dask scheduler`` and two ``dask worker`` processes on localhost."""
    bindir = Path(sys.executable).parent
    env = child_env()
    sched = subprocess.Popen([str(bindir / "dask"), "scheduler", "--port", "0",
                              "--dashboard-address", ":0", "--scheduler-file",
                              str(log / "scheduler.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
    for _ in range(300):
        if (log / "scheduler.json").is_file():
            break
        time.sleep(0.1)
    address = json.loads((log / "scheduler.json").read_text())["address"]
    workers = [subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1",
                                 "--no-dashboard"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
               for k in range(2)]
    return address, [sched, *workers]


def memory(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        address, procs = _start_cluster(out)
        try:
            demo = str(ROOT / "models" / "demo_mnist_cnn.onnx")
            for name in ("replay50k", "replay500k"):
                _refine(root / name, ["--dask", address, "--max-layers", "1"], name, out, demo)
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("prepare", "overhead", "scaling", "memory"))
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    {"prepare": prepare, "overhead": overhead, "scaling": scaling,
     "memory": memory}[args.what](args.dir)


if __name__ == "__main__":
    main()
