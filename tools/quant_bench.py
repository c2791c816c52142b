"""Quantized-model benchmark (issue 20): label refinement of an INT8 QDQ model vs
the float model on the same shifted data, and recovery with ``--teacher`` on
unlabelled clean data for int4 per-tensor and int8 per-channel weights.

    PYTHONPATH=. python tools/quant_bench.py [--models mnist cifar] [--n 1000]

QDQ models are made by onnxruntime's ``quantize_static`` (QDQ, uint8 activations,
calibration: 200 clean samples; int8 with ``reduce_range``) from the float model
converted to opset 13.
Accuracies are measured by onnxruntime on the written files (``--eval`` samples).
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
import onnxruntime as ort
from onnx import version_converter

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import benchlib  # noqa: E402
import shared_data  # noqa: E402

from onnxfbp.config import RefineConfig  # noqa: E402
from onnxfbp.refine import refine  # noqa: E402

MODELS = {"mnist": ("mnist_pytorch25_legacy_cnn.onnx", "rot"),
          "cifar": ("cifar10_pytorch18_vnncomp_resnet2b.onnx", "cifar")}


def quantize(src: Path, out: Path, calib: np.ndarray, name: str, batch: int,
             weight_type: object, per_channel: bool, reduce_range: bool) -> float:
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: calib[i:i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    t = time.perf_counter()
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=weight_type,
                    activation_type=QuantType.QUInt8, reduce_range=reduce_range)
    return time.perf_counter() - t


def accuracy(path: Path, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    z = np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((z.reshape(len(x), -1).argmax(1) == y).mean())


def bench(key: str, n: int, n_eval: int, tmp: Path, parts: list[str], requant: list[str],
          weights: list[str], finish: list[str]) -> dict[str, object]:
    from onnxruntime.quantization import QuantType  # noqa: PLC0415

    fname, shift = MODELS[key]
    spec = benchlib.MODELS[fname]
    x01, y = benchlib.load_images01(spec.dataset)
    model = onnx.load(str(shared_data.models_dir() / fname))
    name = model.graph.input[0].name
    fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    batch = fixed or 100
    f13 = tmp / f"{key}_f13.onnx"
    onnx.save(version_converter.convert_version(model, 13), str(f13))
    calib = spec.prep(x01[9000:9200]).astype(np.float32)
    # int8: 7-bit weights (reduce_range), as onnxruntime advises for CPUs without VNNI:
    # its u8s8 kernels saturate there (the CIFAR ResNet, AVX2: QDQ arithmetic 0.698,
    # onnxruntime's optimized kernels 0.672 on 1,000 clean images; 0.687 / 0.688 with it)
    q = {"int8pc": (QuantType.QInt8, True, True), "int4pt": (QuantType.QInt4, False, False)}
    paths, qtime = {}, {}
    for tag, (wt, pc, rr) in q.items():
        paths[tag] = tmp / f"{key}_{tag}.onnx"
        qtime[tag] = quantize(f13, paths[tag], calib, name, batch, wt, pc, rr)
    out: dict[str, object] = {"model": fname, "quantize_static_s": qtime}
    # label refinement on the shift, int8 vs float
    if "labels" in parts:
        out["label_refinement"] = labels_part(key, spec, x01, y, f13, paths, n, n_eval, batch,
                                              shift, tmp, finish)
    if "teacher" in parts:
        out["teacher_recovery"] = teacher_part(key, spec, x01, y, f13, paths, n, n_eval, batch,
                                               tmp, requant, weights)
    return out


def labels_part(key: str, spec: Any, x01: np.ndarray, y: np.ndarray, f13: Path,
                paths: dict[str, Path], n: int, n_eval: int, batch: int, shift: str, tmp: Path,
                finish: list[str]) -> dict[str, object]:
    xa = spec.prep(shared_data.shift_images(x01[:n], shift, seed=1)).astype(np.float32)
    xe = spec.prep(shared_data.shift_images(x01[5000:5000 + n_eval], shift, seed=2)
                   ).astype(np.float32)
    ya, ye = y[:n], y[5000:5000 + n_eval]
    labels = {}
    runs = [("float", f13, True)] + [(f"int8pc gptq-finish {m}", paths["int8pc"], m == "on")
                                     for m in finish]
    for tag, src, fin in runs:
        dst = tmp / f"{key}_{tag.replace(' ', '_')}_labels.onnx"
        t = time.perf_counter()
        result = refine(src, dst, xa, ya, force=True, config=RefineConfig.of(gptq_finish=fin))
        final = result.data.get("final_rounding")
        labels[tag] = {"before": accuracy(src, xe, ye, batch),
                       "after": accuracy(dst, xe, ye, batch), "seconds": time.perf_counter() - t,
                       "final_rounding": None if final is None else
                       {k: final[k] for k in ("kept", "heldout_accuracy")}}
    gain = {k: v["after"] - v["before"] for k, v in labels.items()}
    return {**labels, "gain_ratio_int8_vs_float": {
        k: v / gain["float"] if gain["float"] else None for k, v in gain.items() if k != "float"}}


def teacher_part(key: str, spec: Any, x01: np.ndarray, y: np.ndarray, f13: Path,
                 paths: dict[str, Path], n: int, n_eval: int, batch: int, tmp: Path,
                 requant: list[str], weights: list[str]) -> dict[str, object]:
    """Recovery with --teacher on clean unlabelled data; ``requant``: off / on."""
    xc = spec.prep(x01[:n]).astype(np.float32)
    xce, yce = spec.prep(x01[5000:5000 + n_eval]).astype(np.float32), y[5000:5000 + n_eval]
    teacher_acc = accuracy(f13, xce, yce, batch)
    rec: dict[str, object] = {"float": teacher_acc}
    for tag, mode in ((t, m) for t in weights for m in requant):
        dst = tmp / f"{key}_{tag}_{mode}_teacher.onnx"
        t = time.perf_counter()
        config = RefineConfig.of(requantize_scales=mode == "on")
        result = refine(paths[tag], dst, (xc, None),  # type: ignore[arg-type]
                        teacher=f13, force=True, config=config)
        before, after = accuracy(paths[tag], xce, yce, batch), accuracy(dst, xce, yce, batch)
        lost = teacher_acc - before
        rec[f"{tag} requantize-scales {mode}"] = {
                    "before": before, "after": after, "seconds": time.perf_counter() - t,
                    "recovered_fraction": (after - before) / lost if lost > 0 else None,
                    "gap_after": teacher_acc - after,
                    "rounding": result.data["teacher"].get("rounding")}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["mnist", "cifar"], choices=list(MODELS))
    ap.add_argument("--n", type=int, default=1000, help="adaptation / calibration samples")
    ap.add_argument("--eval", type=int, default=2000, help="evaluation samples")
    ap.add_argument("--parts", nargs="+", default=["labels", "teacher"],
                    choices=["labels", "teacher"])
    ap.add_argument("--requantize-scales", nargs="+", default=["off", "on"],
                    choices=["off", "on"], help="teacher runs without / with the scale refit")
    ap.add_argument("--weights", nargs="+", default=["int8pc", "int4pt"],
                    choices=["int8pc", "int4pt"], help="QDQ models for the teacher runs")
    ap.add_argument("--gptq-finish", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="int8 label runs without / with the final GPTQ rounding")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            print(json.dumps(bench(key, args.n, args.eval, Path(tmp), args.parts,
                                   args.requantize_scales, args.weights, args.gptq_finish),
                             indent=1),
                  flush=True)


if __name__ == "__main__":
    main()
