"""Measure ``retain_data``: original-domain accuracy kept, shift gain paid.

For each model and shift: adapt on MNIST test images 0-1999 under the shift (seed 1),
retain 1,000 unshifted images 2000-2999 (none / with labels / without labels), and
score the refined model on images 5000-6999 shifted (seed 2) and unshifted. Prints a
markdown table (and writes JSON with ``--json PATH``):

    python tools/probe_retain.py [--models a,b] [--shifts inverted,blur] [--threads 1]

The gain ratio is ``(shift_after - shift_before) / (same without retain data)``; the
targets of issue 18 item 4: original-domain drop <= 1 point, ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import MODELS, datasets_module, load_images01  # noqa: E402
from shifts import apply_shift  # noqa: E402

from onnxfbp import RefineConfig, evaluate, refine  # noqa: E402
from onnxfbp.errors import GateError  # noqa: E402

DEFAULT_MODELS = [
    "mnist_pytorch25_legacy_cnn.onnx",
    "mnist_keras_tf2onnx1111_cnn_concat_nhwc.onnx",
    "mnist_pytorch18_eran_ffnn_sigmoid_6x200.onnx",
]


def one_run(model: Path, config: RefineConfig, adapt: tuple[np.ndarray, np.ndarray],
            retain: tuple[np.ndarray, np.ndarray | None] | None,
            evals: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Refine once; the accuracies of the result on each eval set, and the gate."""
    started = time.perf_counter()
    try:
        result = refine(model, None, adapt, config=config, retain_data=retain)
        passed = True
    except GateError as exc:
        result, passed = exc.result, False  # type: ignore[attr-defined]
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refined.onnx"
        onnx.save(result.model, path)
        acc = {name: evaluate(path, x, y, device="cpu").accuracy for name, (x, y) in evals.items()}
    out: dict[str, Any] = {"gate_passed": passed, "seconds": round(seconds, 1), **acc}
    if result.retain_after is not None and result.retain_before is not None:
        out["retain_heldout"] = [result.retain_before.accuracy, result.retain_after.accuracy]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--shifts", default="inverted,blur")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    images, labels = load_images01("mnist")
    models_dir = datasets_module().models_dir()
    config = RefineConfig.of(device="cpu", threads=args.threads)
    rows = []
    for name in args.models.split(","):
        prep, model = MODELS[name].prep, models_dir / name
        for shift in args.shifts.split(","):
            adapt = (prep(apply_shift(images[:2000], shift, 1)), labels[:2000])
            clean_x, clean_y = prep(images[2000:3000]), labels[2000:3000]
            evals = {
                "shift": (prep(apply_shift(images[5000:7000], shift, 2)), labels[5000:7000]),
                "original": (prep(images[5000:7000]), labels[5000:7000]),
            }
            before = {k: evaluate(model, x, y, device="cpu").accuracy
                      for k, (x, y) in evals.items()}
            row: dict[str, Any] = {"model": name, "shift": shift, "before": before}
            for variant, retain in (("none", None), ("labelled", (clean_x, clean_y)),
                                    ("unlabelled", (clean_x, None))):
                row[variant] = one_run(model, config, adapt, retain, evals)
                print(name, shift, variant, row[variant], file=sys.stderr, flush=True)
            gain0 = row["none"]["shift"] - before["shift"]
            for variant in ("labelled", "unlabelled"):
                gain = row[variant]["shift"] - before["shift"]
                row[variant]["gain_ratio"] = gain / gain0 if gain0 > 0 else None
            rows.append(row)
    print("| model | shift | before shift / orig | none | labelled (ratio) | unlabelled (ratio) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        b = row["before"]
        cells = [f"{row['none']['shift']:.3f} / {row['none']['original']:.3f}"]
        for variant in ("labelled", "unlabelled"):
            r = row[variant]
            ratio = "n/a" if r["gain_ratio"] is None else f"{r['gain_ratio']:.2f}"
            gate = "" if r["gate_passed"] else ", gate failed"
            cells.append(f"{r['shift']:.3f} / {r['original']:.3f} ({ratio}{gate})")
        print(f"| {row['model'].split('.onnx')[0]} | {row['shift']} | "
              f"{b['shift']:.3f} / {b['original']:.3f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
