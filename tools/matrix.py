"""The robustness matrix (issue 18): every corpus model x every shift x each labelled-data
size, onnxfbp against end-to-end backprop peers, each method run as a whole process
(ONNX in, ONNX out) and scored the same way.

Cells
    model   each model of ``../shared/models`` (``benchlib.MODELS``: data set and
            preprocessing from MANIFEST.tsv)
    shift   ``tools/shifts.py``: rot, noise, inverted, blur, elastic, translate,
            saltpepper, contrast, jpeg
    n       labelled adaptation samples: 2000 (default), 500, 100

Data (MNIST test set; CIFAR-10 test set shuffled with seed 0, ``tests/shared_data.py``)
    adaptation  images 0-1999 shifted with seed 1; the n-sample regimes take the first n
                of these same shifted images
    evaluation  images 5000-6999 shifted with seed 2 ("shifted accuracy")
    original    images 5000-6999 unshifted ("original-domain accuracy")

Methods, each a child process timed by wall clock from its start to its exit
    onnxfbp     ``python -m onnxfbp.cli refine MODEL OUT --data ADAPT.npz --report R.json
                --seed 0 --device cpu`` with the defaults. Exit 3 (the gate: no held-out
                gain, nothing written) means the user keeps the input model: scored as the
                input model, status ``kept-input``.
    adam-1      ``tools/peer_adam.py`` (import torch, onnx2torch conversion, Adam lr 1e-3,
                1 epoch, batch 64, ``torch.onnx.export``)
    onnxfbp-retain, onnxfbp-retain-unlabelled
                the same with ``--retain-data``: 1,000 unshifted images (2000-2999), with
                their labels or without (the input model's outputs are then the targets)
    adam-tuned  ``tools/peer_adam.py --tune``: lr in (1e-4, 3e-4, 1e-3) x epochs 1-3 picked
                on a seeded 20 % held out of the adaptation data, then retrained on all of
                it (the tuning counts in its time)
    adam-tuned-retain
                the same with ``--retain`` (the labelled retain images): half of them
                train with the adaptation data, and a candidate counts only if it keeps
                the other half's accuracy within 1 point (``peer_adam.py`` docstring)
    adam-tuned-retain-unlabelled
                the same without the labels: the input model's predictions are the labels
                and its softmax scores the bound, as onnxfbp's

Every output model is scored with onnxruntime (CPU, a dynamic-batch copy) on the shifted
and the original evaluation images; the input model gives the "before" numbers.

Per cell and method: shifted and original accuracy before/after, ``gain`` = shifted
after - before, ``drop`` = original before - after, whole-process seconds, the share of
the cores other processes used meanwhile, onnxfbp's layers planned (``plan.layers``
with ``refined``) / changed (distinct names in ``layers`` with ``accepted``) / reverted
(distinct names never accepted) from its ``--report`` JSON, the peers' chosen lr and
epochs. ``diverged``: the process failed (not the gate), or the output gives non-finite
scores, or shifted accuracy fell by more than 1 point (``DIVERGED_BELOW``).

Summary rows (per n, over the cells where the method and the tuned peer both ran):
median shift gain, median original-domain drop, divergence count, median time ratio
(method / tuned peer, and method / adam-1), % of cells with at least 80 % of the tuned
peer's gain (a cell where the tuned peer gains nothing counts when the method does not
lose more than it), and cells whose original-domain drop exceeds the tuned peer's by
more than 5 points.

Usage
    python tools/matrix.py [--models a,b] [--shifts a,b] [--n-adapt 2000,500,100]
        [--methods onnxfbp,adam-1,adam-tuned] [--jobs 1] [--out FILE.json] [--markdown]
    python tools/matrix.py --from-json FILE.json --markdown   (re-render a finished run)

Results are written to ``--out`` (default ``bench-results/matrix-<UTC date>.json``) after
every cell, so an interrupted run keeps what it measured. ``--jobs N`` runs N cells at
once: the time columns are then not comparable (the processes share the cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    MODELS,
    ROOT,
    child_env,
    choose,
    datasets_module,
    load_images01,
    machine_info,
    ort_run,
    ort_session,
    run_timed_process,
    versions,
)
from shifts import SHIFTS, apply_shift  # noqa: E402

if TYPE_CHECKING:
    from numpy.typing import NDArray

METHODS = ("onnxfbp", "adam-1", "adam-tuned", "onnxfbp-retain", "onnxfbp-retain-unlabelled",
           "adam-tuned-retain", "adam-tuned-retain-unlabelled")
RETAIN = 1000  # original-domain samples (images 2000-2999, unshifted) for --retain-data
TUNED = "adam-tuned"
PLAIN_PEER = "adam-1"
N_ADAPT = (2000, 500, 100)
ADAPT_POOL = 2000  # images 0..1999 are shifted once; each n takes the first n
EVAL_START, N_EVAL = 5000, 2000
ADAPT_SEED, EVAL_SEED = 1, 2
DIVERGED_BELOW = 0.01  # shifted accuracy falling by more than this is a divergence
GAIN_SHARE = 0.8
DROP_MARGIN = 0.05
EXIT_GATE = 3  # onnxfbp.errors.EXIT_GATE (not imported: the parent stays off onnxfbp)
THREADS = 2


def fail(message: str) -> None:
    """One-line user error, exit 2."""
    print(f"matrix: error: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------- data


class DataCache:
    """Shifted adaptation / evaluation images per (data set, shift), shifted once."""

    def __init__(self) -> None:
        self._raw: dict[str, tuple[NDArray[Any], NDArray[Any]]] = {}
        self._shifted: dict[tuple[str, str], tuple[NDArray[Any], NDArray[Any]]] = {}
        self._lock = threading.Lock()

    def raw(self, dataset: str) -> tuple[NDArray[Any], NDArray[Any]]:
        with self._lock:
            if dataset not in self._raw:
                self._raw[dataset] = load_images01(dataset)
            return self._raw[dataset]

    def get(self, dataset: str, shift: str) -> dict[str, NDArray[Any]]:
        images, labels = self.raw(dataset)
        ev = slice(EVAL_START, EVAL_START + N_EVAL)
        with self._lock:
            if (dataset, shift) not in self._shifted:
                self._shifted[dataset, shift] = (
                    apply_shift(images[:ADAPT_POOL], shift, ADAPT_SEED),
                    apply_shift(images[ev], shift, EVAL_SEED),
                )
            adapt, shifted_eval = self._shifted[dataset, shift]
        keep = slice(ADAPT_POOL, ADAPT_POOL + RETAIN)
        return {"x_adapt": adapt, "y_adapt": labels[:ADAPT_POOL], "x_eval": shifted_eval,
                "x_orig": images[ev], "y_eval": labels[ev],
                "x_retain": images[keep], "y_retain": labels[keep]}


# --------------------------------------------------------------------------- processes


def run_timed(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; exit code, wall seconds from spawn to exit, its CPU seconds, the share
    of all cores busy with other processes meanwhile, and the tail of its stderr."""
    t = run_timed_process(cmd, timeout, child_env(), capture_stdout=False)
    tail = t.stderr.strip().splitlines()
    return {"rc": t.code, "process_s": t.wall_s, "cpu_s": t.cpu_s, "other_load": t.other_load,
            "stderr_tail": tail[-1][:300] if tail else ""}


def scores(model: Path, x: NDArray[Any]) -> NDArray[Any]:
    return ort_run(ort_session(model, THREADS), x)


def accuracy(s: NDArray[Any], y: NDArray[Any]) -> float:
    return float((s.argmax(1) == y).mean())


def onnxfbp_layers(report_path: Path) -> dict[str, Any]:
    """Layers planned / changed / reverted (and any divergence field) from a report."""
    if not report_path.is_file():
        return {}
    rep = json.loads(report_path.read_text())
    planned = [la["name"] for la in (rep.get("plan") or {}).get("layers", [])
               if la.get("selected", la.get("refined"))]
    steps = rep.get("layers") or []
    changed = sorted({s["name"] for s in steps if s.get("accepted")})
    reverted = sorted({s["name"] for s in steps} - set(changed))
    out: dict[str, Any] = {"layers_planned": len(planned), "layers_changed": len(changed),
                           "layers_reverted": len(reverted), "changed": changed,
                           "reverted": reverted}

    def find(node: Any, path: str) -> None:  # any field the report may gain about divergence
        if isinstance(node, dict):
            for k, v in node.items():
                if "diverg" in k.lower():
                    out.setdefault("report_divergence", {})[f"{path}{k}"] = v
                find(v, f"{path}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                find(v, f"{path}{i}.")

    find(rep, "")
    gate = rep.get("gate") or {}
    out["heldout_gain"] = gate.get("gain")
    return out


def method_command(method: str, model: Path, out: Path, data: Path, report: Path,
                   extra: Sequence[str] = ()) -> list[str]:
    """The whole process of ``method`` on one cell (``extra``: more onnxfbp flags)."""
    py = sys.executable
    if method.startswith("onnxfbp"):
        cmd = [py, "-m", "onnxfbp.cli", "refine", str(model), str(out), "--data", str(data),
               "--report", str(report), "--seed", "0", "--device", "cpu", "--quiet", *extra]
        if method == "onnxfbp-retain":
            cmd += ["--retain-data", str(data.with_name("retain.npz"))]
        elif method == "onnxfbp-retain-unlabelled":
            cmd += ["--retain-data", str(data.with_name("retain_x.npz"))]
        return cmd
    peer = [py, str(ROOT / "tools" / "peer_adam.py"), str(model), str(out), "--data", str(data),
            "--seed", "0", "--threads", str(THREADS), "--report", str(report)]
    if method == PLAIN_PEER:
        return [*peer, "--lr", "1e-3", "--epochs", "1"]
    if method == TUNED:
        return [*peer, "--tune"]
    if method == TUNED + "-retain":
        return [*peer, "--tune", "--retain", str(data.with_name("retain.npz"))]
    if method == TUNED + "-retain-unlabelled":
        return [*peer, "--tune", "--retain", str(data.with_name("retain_x.npz"))]
    raise ValueError(f"unknown method {method!r}")


def run_cell(model_name: str, shift: str, n: int, methods: list[str], cache: DataCache,
             timeout: float, reused: dict[str, Any] | None = None,
             extra: Sequence[str] = ()) -> dict[str, Any]:
    """One (model, shift, n) cell: every method as a whole process, scored before/after.
    Methods in ``reused`` (the peers' rows of an earlier run of the same cell) are not
    run again: their rows are copied, marked ``reused``."""
    import numpy as np

    spec = MODELS[model_name]
    model = datasets_module().models_dir() / model_name
    d = cache.get(spec.dataset, shift)
    x_eval, x_orig = spec.prep(d["x_eval"]), spec.prep(d["x_orig"])
    y = d["y_eval"]
    cell: dict[str, Any] = {"model": model_name, "dataset": spec.dataset, "shift": shift,
                            "n_adapt": n, "n_eval": len(y)}
    cell["before"] = {"shift_acc": accuracy(scores(model, x_eval), y),
                      "orig_acc": accuracy(scores(model, x_orig), y)}
    cell["methods"] = {}
    with tempfile.TemporaryDirectory(prefix="onnxfbp-matrix-") as tmp:
        data = Path(tmp) / "adapt.npz"
        np.savez(data, x=spec.prep(d["x_adapt"][:n]), y=d["y_adapt"][:n])
        if any("retain" in m for m in methods):
            np.savez(data.with_name("retain.npz"), x=spec.prep(d["x_retain"]), y=d["y_retain"])
            np.savez(data.with_name("retain_x.npz"), x=spec.prep(d["x_retain"]))
        for method, row in (reused or {}).items():
            cell["methods"][method] = {**row, "reused": True}
        for method in methods:
            if method in cell["methods"]:
                continue
            out, report = Path(tmp) / method / "out.onnx", Path(tmp) / method / "report.json"
            out.parent.mkdir()
            row = run_timed(method_command(method, model, out, data, report, extra), timeout)
            if method.startswith("onnxfbp"):
                row.update(onnxfbp_layers(report))
            elif report.is_file():
                rep = json.loads(report.read_text())
                row.update({"lr": rep.get("lr"), "epochs": rep.get("epochs")})
            if row["rc"] == 0 and out.is_file():
                row["status"] = "ok"
                scored = out
            elif method.startswith("onnxfbp") and row["rc"] == EXIT_GATE:
                row["status"] = "kept-input"
                scored = model
            else:
                row["status"] = "failed"
                cell["methods"][method] = row
                continue
            s_shift, s_orig = scores(scored, x_eval), scores(scored, x_orig)
            finite = bool(np.isfinite(s_shift).all() and np.isfinite(s_orig).all())
            row.update({"shift_acc": accuracy(s_shift, y), "orig_acc": accuracy(s_orig, y)})
            row["gain"] = row["shift_acc"] - cell["before"]["shift_acc"]
            row["drop"] = cell["before"]["orig_acc"] - row["orig_acc"]
            row["diverged"] = (not finite) or row["gain"] < -DIVERGED_BELOW
            cell["methods"][method] = row
    for row in cell["methods"].values():
        if row["status"] == "failed":
            # onnxfbp failing is a divergence; a peer that cannot convert the model is n/a
            row["diverged"] = not row.get("stderr_tail", "").startswith("peer_adam: error:")
    return cell


def reused_peers(path: Path | None) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The peers' rows of an earlier run (``--peers-from``), by (model, shift, n): the
    peers do not change with onnxfbp's code, so a new onnxfbp run can reuse them."""
    if path is None:
        return {}
    if not path.is_file():
        fail(f"{path} does not exist; pass a results JSON written by --out")
    cells = json.loads(path.read_text())["cells"]
    return {(c["model"], c["shift"], c["n_adapt"]):
            {m: r for m, r in c["methods"].items() if not m.startswith("onnxfbp")}
            for c in cells}


# --------------------------------------------------------------------------- summary


def _median(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def summarize(cells: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One row per (n, method): the summary rows against the tuned peer."""
    rows = []
    for n in sorted({c["n_adapt"] for c in cells}, reverse=True):
        group = [c for c in cells if c["n_adapt"] == n]
        for m in methods:
            mine = [c["methods"][m] for c in group if m in c["methods"]]
            ran = [r for r in mine if "gain" in r]
            paired = [(c["methods"][m], c["methods"][TUNED]) for c in group
                      if "gain" in c["methods"].get(m, {})
                      and "gain" in c["methods"].get(TUNED, {})]
            plain = [(c["methods"][m], c["methods"][PLAIN_PEER]) for c in group
                     if c["methods"].get(m, {}).get("status") in ("ok", "kept-input")
                     and c["methods"].get(PLAIN_PEER, {}).get("status") == "ok"]
            reach = [a["gain"] >= GAIN_SHARE * b["gain"] if b["gain"] > 0
                     else a["gain"] >= b["gain"] for a, b in paired]
            rows.append({
                "n_adapt": n, "method": m, "cells": len(mine), "ran": len(ran),
                "median_gain": _median([r["gain"] for r in ran]),
                "median_drop": _median([r["drop"] for r in ran]),
                "divergences": sum(bool(r.get("diverged")) for r in mine),
                "paired_with_tuned": len(paired),
                "median_gain_minus_tuned": _median([a["gain"] - b["gain"] for a, b in paired]),
                "median_drop_minus_tuned": _median([a["drop"] - b["drop"] for a, b in paired]),
                "median_time_vs_tuned": _median([a["process_s"] / b["process_s"]
                                                 for a, b in paired]),
                "median_time_vs_adam1": _median([a["process_s"] / b["process_s"]
                                                 for a, b in plain]),
                "share_reaching_80pct_of_tuned_gain":
                    sum(reach) / len(reach) if reach else None,
                "cells_drop_5pt_worse_than_tuned":
                    sum(a["drop"] > b["drop"] + DROP_MARGIN for a, b in paired),
            })
    return rows


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _short(model: str) -> str:
    return model.split("/")[0].removesuffix(".onnx")


def markdown(result: dict[str, Any]) -> str:
    cells, methods = result["cells"], result["methods"]
    meta = result["meta"]
    m = meta["machine"]
    lines = [
        f"### Robustness matrix, run of {meta['date']}",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB RAM; versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- {len({c['model'] for c in cells})} models x {len({c['shift'] for c in cells})} "
        f"shifts x n in {sorted({c['n_adapt'] for c in cells}, reverse=True)}; eval "
        f"{N_EVAL} shifted + the same {N_EVAL} unshifted (original domain). Each method is "
        "one whole process, ONNX in, ONNX out, timed from spawn to exit; `tools/matrix.py` "
        "docstring has the definitions.",
        *([f"- Note: {meta['note']}"] if meta.get("note") else []),
        "",
        "#### Summary against the tuned peer",
        "",
        "| n | method | cells ran | median shift gain | median orig. drop | divergences | "
        "median gain - tuned | % cells >= 80 % of tuned gain | cells drop > tuned + 5 pt | "
        "median time / tuned | median time / adam-1 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summarize(cells, methods):
        lines.append(
            f"| {r['n_adapt']} | {r['method']} | {r['ran']}/{r['cells']} | "
            f"{_f(r['median_gain'], '+.4f')} | {_f(r['median_drop'], '+.4f')} | "
            f"{r['divergences']} | {_f(r['median_gain_minus_tuned'], '+.4f')} | "
            f"{_f(r['share_reaching_80pct_of_tuned_gain'], '.0%')} | "
            f"{r['cells_drop_5pt_worse_than_tuned']} | "
            f"{_f(r['median_time_vs_tuned'], '.2f')} | {_f(r['median_time_vs_adam1'], '.2f')} |")
    lines += [
        "",
        "#### Cells",
        "",
        "| model | shift | n | method | shifted acc | original acc | planned / changed / "
        "reverted | diverged | process s | other load | note |",
        "|---|---|---:|---|---|---|---|---|---:|---:|---|",
    ]
    for c in cells:
        b = c["before"]
        for name, r in c["methods"].items():
            if "shift_acc" in r:
                sh = f"{b['shift_acc']:.4f} -> {r['shift_acc']:.4f}"
                og = f"{b['orig_acc']:.4f} -> {r['orig_acc']:.4f}"
            else:
                sh = og = r["status"]
            layers = (f"{r['layers_planned']} / {r['layers_changed']} / {r['layers_reverted']}"
                      if "layers_planned" in r else "-")
            note = (f"lr {r['lr']:g}, {r['epochs']} ep" if r.get("lr") is not None
                    else "" if r["status"] == "ok" else r["status"])
            if r.get("reused"):
                note += f" (from {meta.get('peers_from', 'an earlier run')})"
            if r["status"] == "failed":
                note = r.get("stderr_tail", "").replace("|", "/")[:120]
            lines.append(
                f"| {_short(c['model'])} | {c['shift']} | {c['n_adapt']} | {name} | {sh} | "
                f"{og} | {layers} | {'yes' if r.get('diverged') else 'no'} | "
                f"{r['process_s']:.1f} | {r['other_load']:.0%} | {note} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma list of corpus models (default all)")
    p.add_argument("--shifts", help=f"comma list of {', '.join(SHIFTS)} (default all)")
    p.add_argument("--n-adapt", default="2000",
                   help="comma list of labelled sample counts, each <= 2000 (default 2000)")
    p.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default all)")
    p.add_argument("--jobs", type=int, default=1, help="cells at once (times need 1)")
    p.add_argument("--out", type=Path, help="results JSON (default "
                   "bench-results/matrix-<UTC date>.json)")
    p.add_argument("--markdown", action="store_true", help="print the tables for BENCHMARKS.md")
    p.add_argument("--from-json", type=Path, help="render a finished run's JSON, run nothing")
    p.add_argument("--peers-from", type=Path, help="reuse the peers' results of this "
                   "earlier run's JSON for the same cells (run only onnxfbp again)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    p.add_argument("--onnxfbp-args", default="", help="more flags for every onnxfbp run, "
                   "e.g. '--epochs 2' (a candidate default, judged on the whole matrix)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        if not args.from_json.is_file():
            fail(f"{args.from_json} does not exist; pass a results JSON written by --out")
        print(markdown(json.loads(args.from_json.read_text())))
        return 0
    models = choose(args.models, list(MODELS), "model", fail)
    shifts = choose(args.shifts, list(SHIFTS), "shift", fail)
    methods = choose(args.methods, list(METHODS), "method", fail)
    try:
        sizes = [int(s) for s in args.n_adapt.split(",") if s.strip()]
    except ValueError:
        fail(f"--n-adapt {args.n_adapt!r} is not a comma list of integers; e.g. 2000,500,100")
    if not sizes or any(not 1 <= s <= ADAPT_POOL for s in sizes):
        fail(f"--n-adapt values must be between 1 and {ADAPT_POOL}; got {args.n_adapt}")
    if args.jobs < 1:
        fail("--jobs must be >= 1")
    missing = [m for m in models if not (datasets_module().models_dir() / m).is_file()]
    if missing:
        fail(f"model(s) not found: {', '.join(missing)}; set ONNXFBP_MODELS_DIR to the corpus")
    date = dt.datetime.now(dt.timezone.utc)
    out = args.out or ROOT / "bench-results" / f"matrix-{date:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "meta": {"command": shlex.join(["python", "tools/matrix.py", *sys.argv[1:]]),
                 "date": date.isoformat(timespec="seconds"), "machine": machine_info(),
                 "versions": versions(), "jobs": args.jobs},
        "methods": methods, "cells": []}
    plan = [(m, s, n) for n in sizes for m in models for s in shifts]
    cache = DataCache()
    peers = reused_peers(args.peers_from)
    if args.peers_from:
        result["meta"]["peers_from"] = args.peers_from.name
        reused = {m for rows in peers.values() for m in rows}
        result["methods"] = methods + [m for m in METHODS if m in reused and m not in methods]
    lock = threading.Lock()

    def one(job: tuple[str, str, int]) -> None:
        cell = run_cell(*job, methods, cache, args.timeout, peers.get(job),
                        shlex.split(args.onnxfbp_args))
        with lock:
            result["cells"].append(cell)
            out.write_text(json.dumps(result, indent=1))
            parts = [f"{k} {r.get('shift_acc', r['status'])!s:.6} ({r['process_s']:.0f}s)"
                     for k, r in cell["methods"].items()]
            print(f"[{len(result['cells'])}/{len(plan)}] {_short(job[0])} {job[1]} n={job[2]}:"
                  f" before {cell['before']['shift_acc']:.4f}; " + "; ".join(parts),
                  file=sys.stderr, flush=True)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(one, job) for job in plan]:
            f.result()
    order = {job: i for i, job in enumerate(plan)}
    result["cells"].sort(key=lambda c: order[c["model"], c["shift"], c["n_adapt"]])
    result["summary"] = summarize(result["cells"], methods)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    if args.markdown:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
