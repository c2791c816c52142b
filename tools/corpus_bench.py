"""The corpus table (issue 19): every classification model of ``models/corpus`` in each
export (legacy, dynamo, Constant-node rewrite) x two shifts, ``onnxfbp refine`` against
the end-to-end peers, each a whole process, scored the same way.

Cells
    model    ``se_cnn``, ``vit_tiny``, ``fcn_cls``, ``effnet_tiny`` (``tools/corpus.py``),
             each file of its MANIFEST rows (``NAME.onnx``, ``NAME.dynamo.onnx``,
             ``NAME.const.onnx``)
    shift    ``rot`` and ``noise`` (``tools/shifts.py``; ``--shifts`` picks others)
Data (``tools/corpus_data.py``: MNIST test images; the models were trained on 0-5999)
    adaptation  images 6000-7999 under the shift, seed 1 (2,000)
    evaluation  images 8000-9999 under the shift, seed 2 ("shifted accuracy") and
                unshifted ("original-domain accuracy")
Methods (``tools/matrix.py``'s commands, timings and report parsing)
    onnxfbp     ``python -m onnxfbp.cli refine MODEL OUT --data ADAPT.npz`` with the
                defaults (exit 3, the gate, keeps the input model: ``kept-input``)
    adam-1      ``tools/peer_adam.py``: onnx2torch + Adam lr 1e-3, 1 epoch
    adam-tuned  ``tools/peer_adam.py --tune`` (lr and epochs picked on a held-out 20 %)
    ``--peers-on legacy`` (the default) runs the peers on the legacy export only: the
    weights are the same in the three files, so their result is the same model's.
Per file (``onnxfbp inspect --json``): nodes, layers refinable (``refined_layers``),
weight layers (Conv/ConvTranspose/Gemm/MatMul nodes with an input after the first
computed from constants only: initializers, Constant nodes and what they feed alone)
and the boundaries. Per cell and method: shifted and original accuracy before/after, gain,
original-domain drop, whole-process seconds.

Usage
    python tools/corpus_bench.py [--models a,b] [--shifts rot,noise]
        [--methods onnxfbp,adam-1,adam-tuned] [--peers-on legacy|all]
        [--exporters legacy,dynamo,const-nodes] [--out FILE.json]
    python tools/corpus_bench.py --from-json A.json [B.json ...] [--out MERGED.json]
        (re-render the table; several runs are merged)

Writes ``bench-results/corpus-<UTC date>.json`` after every cell and prints the
markdown table (model, exporter, nodes, layers refinable, gain, original-domain drop,
time, peer time).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, child_env, machine_info, versions  # noqa: E402
from matrix import (  # noqa: E402
    EXIT_GATE,
    PLAIN_PEER,
    TUNED,
    accuracy,
    method_command,
    onnxfbp_layers,
    run_timed,
    scores,
)

CORPUS = ROOT / "models" / "corpus"
MODELS = ("se_cnn", "vit_tiny", "fcn_cls", "effnet_tiny")
SHIFTS = ("rot", "noise")
METHODS = ("onnxfbp", PLAIN_PEER, TUNED)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
N_ADAPT = 2000
TIMEOUT = 1800.0


def exporter(file: str) -> str:
    return "dynamo" if file.endswith(".dynamo.onnx") else (
        "const-nodes" if file.endswith(".const.onnx") else "legacy")


def corpus_files(models: list[str]) -> list[tuple[str, str]]:
    """(model name, file) of every exported corpus file of ``models``, MANIFEST order."""
    with (CORPUS / "MANIFEST.tsv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r.get("nodes")]
    return [(r["name"], r["file"]) for r in rows if r["name"] in models]


def inspect_file(path: Path) -> dict[str, Any]:
    """Nodes, refinable layers, weight layers and boundaries from ``inspect --json``."""
    import onnx

    cmd = [sys.executable, "-m", "onnxfbp.cli", "inspect", str(path), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False,
                          timeout=600)
    model = onnx.load(str(path))
    const = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # graph order is topological
        if all(i in const for i in node.input if i):
            const.update(node.output)
    weight_layers = sum(n.op_type in WEIGHT_OPS and any(i in const for i in n.input[1:])
                        for n in model.graph.node)
    out: dict[str, Any] = {"inspect_rc": proc.returncode, "nodes": len(model.graph.node),
                           "weight_layers": weight_layers}
    if proc.returncode != 0:
        out["inspect_error"] = proc.stderr.strip().splitlines()[-1:] or [""]
        return out
    info = json.loads(proc.stdout)
    out["layers_refinable"] = len(info.get("refined_layers") or [])
    out["boundaries"] = [str(b) for b in info.get("boundaries") or []]
    return out


def score(model: Path, x: Any) -> Any:
    """Class scores of ``x``; a model whose graph bakes in the batch of its export (the
    peer's torch export of an Expand, for one) is scored in chunks of that batch."""
    import numpy as np
    import onnxruntime as ort

    try:
        return scores(model, x)
    except ort.capi.onnxruntime_pybind11_state.Fail:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x[i:i + 2]})[0]
                               for i in range(0, len(x), 2)])


def run_cell(name: str, file: str, shift: str, methods: list[str]) -> dict[str, Any]:
    """One (file, shift) cell: every method as a whole process, scored before/after."""
    import numpy as np
    from corpus_data import sample

    model = CORPUS / file
    adapt = sample(name, "adapt", N_ADAPT, shift, seed=1)
    ev, orig = sample(name, "eval", shift=shift, seed=2), sample(name, "eval")
    y = ev["y"]
    cell: dict[str, Any] = {"model": name, "file": file, "exporter": exporter(file),
                            "shift": shift, "n_adapt": N_ADAPT, "n_eval": len(y)}
    cell["before"] = {"shift_acc": accuracy(score(model, ev["input"]), y),
                      "orig_acc": accuracy(score(model, orig["input"]), y)}
    cell["methods"] = {}
    with tempfile.TemporaryDirectory(prefix="onnxfbp-corpus-") as tmp:
        data = Path(tmp) / "adapt.npz"
        np.savez(data, x=adapt["input"], y=adapt["y"])
        for method in methods:
            out, report = Path(tmp) / method / "out.onnx", Path(tmp) / method / "report.json"
            out.parent.mkdir()
            row = run_timed(method_command(method, model, out, data, report), TIMEOUT)
            if method.startswith("onnxfbp"):
                row.update(onnxfbp_layers(report))
            if row["rc"] == 0 and out.is_file():
                row["status"], scored = "ok", out
            elif method.startswith("onnxfbp") and row["rc"] == EXIT_GATE:
                row["status"], scored = "kept-input", model
            else:
                row["status"] = "failed"
                cell["methods"][method] = row
                continue
            row["shift_acc"] = accuracy(score(scored, ev["input"]), y)
            row["orig_acc"] = accuracy(score(scored, orig["input"]), y)
            row["gain"] = row["shift_acc"] - cell["before"]["shift_acc"]
            row["drop"] = cell["before"]["orig_acc"] - row["orig_acc"]
            cell["methods"][method] = row
    return cell


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    """The corpus table: one row per (file, shift)."""
    files = result["files"]
    lines = [f"### Corpus table, run of {result['meta']['date']} (branch state: "
             f"{result['meta'].get('label', '')})", "",
             "| model | exporter | nodes | layers refinable / weight layers | shift | "
             "before (shift / orig) | onnxfbp gain | orig drop | time s | "
             "adam-tuned gain | orig drop | time s | adam-1 time s |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    peers: dict[tuple[str, str], dict[str, Any]] = {}
    for c in result["cells"]:
        if TUNED in c["methods"] or PLAIN_PEER in c["methods"]:
            peers[(c["model"], c["shift"])] = c["methods"]
    for c in result["cells"]:
        info = files.get(c["file"], {})
        me = c["methods"].get("onnxfbp", {})
        pm = c["methods"] if TUNED in c["methods"] else peers.get((c["model"], c["shift"]), {})
        tuned, plain = pm.get(TUNED, {}), pm.get(PLAIN_PEER, {})
        status = "" if me.get("status") in (None, "ok") else f" ({me['status']})"
        lines.append(
            f"| {c['model']} | {c['exporter']} | {info.get('nodes', '-')} | "
            f"{info.get('layers_refinable', '-')} / {info.get('weight_layers', '-')} | "
            f"{c['shift']} | {c['before']['shift_acc']:.3f} / {c['before']['orig_acc']:.3f} | "
            f"{_f(me.get('gain'), '+.3f')}{status} | {_f(me.get('drop'), '+.3f')} | "
            f"{_f(me.get('process_s'), '.1f')} | {_f(tuned.get('gain'), '+.3f')} | "
            f"{_f(tuned.get('drop'), '+.3f')} | {_f(tuned.get('process_s'), '.1f')} | "
            f"{_f(plain.get('process_s'), '.1f')} |")
    loads = sorted(r["other_load"] for c in result["cells"] for r in c["methods"].values()
                   if r.get("other_load") is not None)
    lines += ["", "Peers ran on the legacy file (the same weights as the other two exports); "
              "their numbers repeat on those rows. Times are whole processes; the median "
              "share of the cores busy with other processes meanwhile was "
              f"{_f(loads[len(loads) // 2] if loads else None, '.2f')}.", ""]
    failed = [(c["file"], c["shift"], m, r.get("stderr_tail", ""))
              for c in result["cells"] for m, r in c["methods"].items()
              if r.get("status") == "failed"]
    if failed:
        lines += ["Failed runs (last line of stderr):", ""]
        lines += [f"- `{f}` {sh} {m}: {tail}" for f, sh, m, tail in failed]
        lines.append("")
    lines += ["Boundaries `inspect` reports (per file):", ""]
    for file, info in files.items():
        b = "; ".join(sorted(set(info.get("boundaries") or []))) or "none"
        err = info.get("inspect_error")
        lines.append(f"- `{file}`: {'inspect failed: ' + err[0] if err else b}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--shifts", default=",".join(SHIFTS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--peers-on", choices=("legacy", "all"), default="legacy")
    p.add_argument("--label", default="", help="what this run measures, e.g. 'before #19'")
    p.add_argument("--out", type=Path)
    p.add_argument("--exporters", default="legacy,dynamo,const-nodes")
    p.add_argument("--from-json", type=Path, nargs="+", help="re-render (several: merged)")
    p.add_argument("--reinspect", action="store_true",
                   help="with --from-json: inspect the files again (this checkout's onnxfbp)")
    args = p.parse_args(argv)
    if args.from_json:
        runs = [json.loads(p.read_text()) for p in args.from_json]
        merged = {**runs[0], "files": {}, "cells": []}
        for run in runs:
            merged["files"].update(run["files"])
            merged["cells"] += run["cells"]
        if args.reinspect:
            merged["files"] = {f: inspect_file(CORPUS / f) for f in merged["files"]}
        order = {f: i for i, f in enumerate(merged["files"])}
        merged["cells"].sort(key=lambda c: (order.get(c["file"], 0), c["shift"]))
        if args.out:
            args.out.write_text(json.dumps(merged, indent=1))
        print(markdown(merged), end="")
        return 0
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = args.out or ROOT / "bench-results" / f"corpus-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    result: dict[str, Any] = {
        "meta": {"date": date, "label": args.label, "machine": machine_info(),
                 "versions": versions(), "n_adapt": N_ADAPT, "methods": methods},
        "files": {}, "cells": []}
    for name, file in corpus_files(args.models.split(",")):
        if exporter(file) not in args.exporters.split(","):
            continue
        result["files"][file] = inspect_file(CORPUS / file)
        for shift in args.shifts.split(","):
            mine = [m for m in methods if m.startswith("onnxfbp")
                    or args.peers_on == "all" or exporter(file) == "legacy"]
            cell = run_cell(name, file, shift, mine)
            result["cells"].append(cell)
            summary = {m: (r.get("status"), round(r.get("gain") or 0, 3),
                           round(r.get("process_s") or 0, 1))
                       for m, r in cell["methods"].items()}
            print(f"{file} {shift}: {summary}", flush=True)
            out.write_text(json.dumps(result, indent=1))
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
