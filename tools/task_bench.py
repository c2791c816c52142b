"""The task models of issue 21 (regression, segmentation, masks, two inputs, two outputs):
onnxfbp against the end-to-end backprop peers, each method run as a whole process
(ONNX in, ONNX out) and scored the same way.

Models (``models/corpus``, each under its documented shift, MANIFEST.tsv)
    rot_regress noise, bbox_regress contrast, seg_fcn rot, mask_sigmoid noise,
    two_input_sum rot, two_output noise (``--target logits=y_class --target
    angle=y_angle``)

Data (``tools/corpus.py data``; not timed)
    adaptation  ``--part adapt --shift S --seed 1 --n N``
    evaluation  ``--part eval --shift S --seed 2 --n N`` ("shifted")
    original    ``--part eval --seed 2 --n N`` (no shift)

Methods, each a child process timed by wall clock from its spawn to its exit
    onnxfbp     ``python -m onnxfbp.cli refine MODEL OUT --data ADAPT.npz [--target ...]``
                (defaults). Exit 3 (the gate kept the input model, nothing written) is
                scored as the input model, status ``kept-input``.
    adam-1      ``tools/peer_adam.py`` (Adam lr 1e-3, 1 epoch, the task's loss)
    adam-tuned  ``tools/peer_adam.py --tune`` (lr and epochs picked on a held-out 20 %)

Every written model, and the input model once, is scored by ``python -m onnxfbp.cli eval
OUT --data F.npz [--target ...] --json`` on the evaluation and original data. The task
metric of an output: MAE (regression, lower is better), mean IoU (dense, binary),
accuracy (classification). A method that fails records its exit code and the tail of its
stderr; the bench goes on.

Verdicts of onnxfbp against issue 21's targets
    target      regression MAE down >= 25 %; mean IoU up >= 5 points; two-input
                accuracy up >= 3 points; the two-output model improves both heads
    vs tuned    the shifted metric within 5 % of the tuned peer's or better (MAE at most
                1.05x, others at least 0.95x; every head)
    orig        the original-domain metric no worse than the tuned peer's (every head)
    time        whole-process seconds at most 1.5x adam-1's

Usage
    python tools/task_bench.py [--models a,b] [--n 2000] [--out FILE.json] [--timeout S]
    python tools/task_bench.py --from-json FILE.json   (print a finished run's table)

The JSON (default ``bench-results/tasks-<UTC date>.json``) is rewritten after every
model; the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    ROOT,
    child_env,
    choose,
    commit,
    machine_info,
    run_timed_process,
    versions,
)

# model: (shift, [(output, labels key)] or [] for the default first output on y)
TASKS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "rot_regress": ("noise", []),
    "bbox_regress": ("contrast", []),
    "seg_fcn": ("rot", []),
    "mask_sigmoid": ("noise", []),
    "two_input_sum": ("rot", []),
    "two_output": ("noise", [("logits", "y_class"), ("angle", "y_angle")]),
}
METHODS = ("onnxfbp", "adam-1", "adam-tuned")
TUNED, PLAIN = "adam-tuned", "adam-1"
EXIT_GATE = 3  # onnxfbp.errors.EXIT_GATE (not imported: the parent stays off onnxfbp)
MAE_TARGET = 0.25  # regression: relative MAE decrease
IOU_TARGET = 0.05  # dense, binary: mean IoU points
ACC_TARGET = 0.03  # two-input classification: accuracy points
WITHIN = 0.05  # of the tuned peer's shifted metric
TIME_RATIO = 1.5  # of adam-1's whole-process seconds
TAIL = 600  # stderr characters kept from a failed process


def fail(message: str) -> None:
    print(f"task_bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def target_args(targets: list[tuple[str, str]]) -> list[str]:
    return [a for out, key in targets for a in ("--target", f"{out}={key}")]


def make_data(name: str, shift: str, n: int, folder: Path) -> dict[str, Path]:
    """The adaptation, shifted evaluation and original-domain npz files of ``name``."""
    parts = {"adapt": ["--part", "adapt", "--shift", shift, "--seed", "1"],
             "eval": ["--part", "eval", "--shift", shift, "--seed", "2"],
             "orig": ["--part", "eval", "--seed", "2"]}
    files = {}
    for part, extra in parts.items():
        files[part] = folder / f"{name}.{part}.npz"
        cmd = [sys.executable, str(ROOT / "tools" / "corpus.py"), "data", name, *extra,
               "--n", str(n), "--out", str(files[part])]
        subprocess.run(cmd, check=True, capture_output=True, env=child_env(), cwd=ROOT)
    return files


def primary(metrics: dict[str, Any]) -> tuple[str, float]:
    """An output's task metric: (name, value)."""
    task = metrics["task"]
    if task == "regression":
        return "mae", float(metrics["mae"])
    if task in ("dense", "binary"):
        return "mean_iou", float(metrics["mean_iou"])
    return "accuracy", float(metrics["accuracy"])


def evaluate(model: Path, data: Path, targets: list[tuple[str, str]],
             timeout: float) -> dict[str, dict[str, Any]]:
    """``onnxfbp eval --json``: per output, its task and task metric."""
    cmd = [sys.executable, "-m", "onnxfbp.cli", "eval", str(model), "--data", str(data),
           *target_args(targets), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"eval exit {proc.returncode}: {proc.stderr[-TAIL:]}")
    outputs = json.loads(proc.stdout)["outputs"]
    return {out: {"task": m["task"], "metric": primary(m)[0], "value": primary(m)[1]}
            for out, m in outputs.items()}


def method_command(method: str, model: Path, out: Path, adapt: Path,
                   targets: list[tuple[str, str]]) -> list[str]:
    py = sys.executable
    if method == "onnxfbp":
        return [py, "-m", "onnxfbp.cli", "refine", str(model), str(out), "--data", str(adapt),
                *target_args(targets)]
    cmd = [py, str(ROOT / "tools" / "peer_adam.py"), str(model), str(out), "--data", str(adapt),
           *target_args(targets)]
    return cmd + ["--tune"] if method == TUNED else cmd


def run_method(method: str, model: Path, files: dict[str, Path], targets: list[tuple[str, str]],
               folder: Path, timeout: float, before: dict[str, Any]) -> dict[str, Any]:
    """One method as a whole process, then its model scored; failures are recorded."""
    out = folder / f"{method}.onnx"
    cmd = method_command(method, model, out, files["adapt"], targets)
    timed = run_timed_process(cmd, timeout, child_env())
    row: dict[str, Any] = {"command": shlex.join(["python", *cmd[1:]]).replace(str(ROOT) + "/", "")
                           .replace(str(folder) + "/", ""),
                           "rc": timed.code, "process_s": round(timed.wall_s, 2),
                           "cpu_s": round(timed.cpu_s, 2), "other_load": round(timed.other_load, 2)}
    if method == "onnxfbp" and timed.code == EXIT_GATE:
        row.update(status="kept-input", eval=before["eval"], orig=before["orig"])
        return row
    if timed.code != 0 or not out.is_file():
        row.update(status="failed", stderr_tail=timed.stderr[-TAIL:])
        return row
    try:
        row["eval"] = evaluate(out, files["eval"], targets, timeout)
        row["orig"] = evaluate(out, files["orig"], targets, timeout)
        row["status"] = "ok"
    except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        row.update(status="eval-failed", stderr_tail=str(exc)[-TAIL:])
    return row


def better_or_equal(metric: str, a: float, b: float, slack: float = 0.0) -> bool:
    """``a`` is at least as good as ``b`` within a relative ``slack``."""
    return a <= b * (1 + slack) if metric == "mae" else a >= b * (1 - slack)


def meets_target(name: str, before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Issue 21's metric-change target for this model (module docstring)."""
    if name == "two_output":
        return all(not better_or_equal(b["metric"], b["value"], after[o]["value"])
                   for o, b in before.items())
    for out, b in before.items():
        a, metric = after[out]["value"], b["metric"]
        if metric == "mae":
            return a <= b["value"] * (1 - MAE_TARGET)
        return a - b["value"] >= (IOU_TARGET if metric == "mean_iou" else ACC_TARGET)
    return False


def verdicts(name: str, cell: dict[str, Any]) -> dict[str, Any]:
    """onnxfbp's verdicts against the targets and the peers; None where a row is missing."""
    rows = cell["methods"]
    ours, tuned, plain = rows.get("onnxfbp", {}), rows.get(TUNED, {}), rows.get(PLAIN, {})
    out: dict[str, Any] = {"target": None, "within_tuned": None, "orig_vs_tuned": None,
                           "time_ratio_adam1": None}
    if "eval" not in ours:
        return out
    out["target"] = meets_target(name, cell["before"]["eval"], ours["eval"])
    if "eval" in tuned:
        out["within_tuned"] = all(
            better_or_equal(m["metric"], m["value"], tuned["eval"][o]["value"], WITHIN)
            for o, m in ours["eval"].items())
        out["orig_vs_tuned"] = all(
            better_or_equal(m["metric"], m["value"], tuned["orig"][o]["value"])
            for o, m in ours["orig"].items())
    if plain.get("process_s"):
        out["time_ratio_adam1"] = round(ours["process_s"] / plain["process_s"], 2)
    return out


def run_model(name: str, n: int, methods: list[str], timeout: float) -> dict[str, Any]:
    shift, targets = TASKS[name]
    model = ROOT / "models" / "corpus" / f"{name}.onnx"
    cell: dict[str, Any] = {"model": name, "shift": shift, "n": n,
                            "targets": [f"{o}={k}" for o, k in targets], "methods": {}}
    with tempfile.TemporaryDirectory(prefix=f"tasks-{name}-") as tmp:
        folder = Path(tmp)
        files = make_data(name, shift, n, folder)
        cell["before"] = {part: evaluate(model, files[part], targets, timeout)
                          for part in ("eval", "orig")}
        for method in methods:
            cell["methods"][method] = run_method(method, model, files, targets, folder,
                                                 timeout, cell["before"])
    cell["verdicts"] = verdicts(name, cell)
    return cell


def _metric_text(before: dict[str, Any], after: dict[str, Any] | None) -> str:
    parts = []
    for out, b in before.items():
        label = {"mae": "MAE", "mean_iou": "mIoU", "accuracy": "acc"}[b["metric"]]
        a = f"{after[out]['value']:.3f}" if after else "—"
        parts.append(f"{label} {b['value']:.3f} → {a}")
    return "; ".join(parts)


def _yes(v: Any) -> str:
    return "—" if v is None else ("yes" if v else "**no**")


def markdown(result: dict[str, Any]) -> str:
    """One row per model and method; the verdict columns on onnxfbp's rows."""
    meta = result.get("meta", {})
    machine = meta.get("machine", {})
    lines = [f"`{meta.get('command', '')}` at {meta.get('commit', '?')}, "
             f"{meta.get('date', '?')[:16].replace('T', ' ')} UTC, {machine.get('cpu', '?')} "
             f"{machine.get('cores', '?')} cores; seconds are whole processes, spawn to exit.",
             "",
             "| model, shift | method | shifted eval before → after | original before → after "
             "| s | target | ≤5 % of tuned | orig ≥ tuned | time / adam-1 |",
             "|---|---|---|---|---:|---|---|---|---:|"]
    for cell in result["cells"]:
        for method, row in cell["methods"].items():
            v = cell["verdicts"] if method == "onnxfbp" else {}
            status = "" if row["status"] == "ok" else f" ({row['status']}, rc {row['rc']})"
            ratio = v.get("time_ratio_adam1")
            lines.append(
                f"| {cell['model']}, {cell['shift']} | {method}{status} "
                f"| {_metric_text(cell['before']['eval'], row.get('eval'))} "
                f"| {_metric_text(cell['before']['orig'], row.get('orig'))} "
                f"| {row['process_s']:.0f} | {_yes(v.get('target')) if v else ''} "
                f"| {_yes(v.get('within_tuned')) if v else ''} "
                f"| {_yes(v.get('orig_vs_tuned')) if v else ''} "
                f"| {'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def _source_commit() -> str:
    try:
        return commit()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma list of {', '.join(TASKS)} (default all)")
    p.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default all)")
    p.add_argument("--n", type=int, default=2000, help="samples per data file (default 2000)")
    p.add_argument("--out", type=Path, help="results JSON (default "
                   "bench-results/tasks-<UTC date>.json)")
    p.add_argument("--from-json", type=Path, help="print a finished run's table, run nothing")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        if not args.from_json.is_file():
            fail(f"{args.from_json} does not exist; pass a results JSON written by --out")
        print(markdown(json.loads(args.from_json.read_text())))
        return 0
    models = choose(args.models, list(TASKS), "model", fail)
    methods = choose(args.methods, list(METHODS), "method", fail)
    if args.n < 1:
        fail("--n must be >= 1")
    date = dt.datetime.now(dt.timezone.utc)
    out = args.out or ROOT / "bench-results" / f"tasks-{date:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "meta": {"command": shlex.join(["python", "tools/task_bench.py", *sys.argv[1:]]),
                 "commit": _source_commit(), "date": date.isoformat(timespec="seconds"),
                 "machine": machine_info(), "versions": versions()},
        "methods": methods, "cells": []}
    for i, name in enumerate(models, 1):
        cell = run_model(name, args.n, methods, args.timeout)
        result["cells"].append(cell)
        out.write_text(json.dumps(result, indent=1))
        parts = [f"{m} {r['status']} ({r['process_s']:.0f}s)" for m, r in cell["methods"].items()]
        print(f"[{i}/{len(models)}] {name}: " + "; ".join(parts), file=sys.stderr, flush=True)
    print(f"wrote {out}", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
