"""GPU benchmark: refine a ResNet-18-sized model on CIFAR-sized inputs and compare
with one plain inference pass over the same data on the same device.

Random weights and random labels are fine for timing. Prints one JSON object:
inference seconds (median of 3), refine forward/targets, solve and total
seconds, and total / inference (target: <= 3). Runs on the CPU too (``--device
cpu``, fewer samples) to check the script itself.

    python tools/gpu_bench.py --device cuda --samples 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
from make_resnet18 import build  # noqa: E402

from onnxfbp import ModelState, RefineConfig, from_arrays  # noqa: E402
from onnxfbp.refine import run_refine  # noqa: E402
from onnxfbp.run.forward import choose_providers, inference_session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--schedule", default="minibatch", choices=("minibatch", "jacobi"))
    parser.add_argument("--epochs", type=float, default=1.0, help="minibatch: epochs")
    parser.add_argument("--sweeps", type=int, default=1, help="jacobi: sweeps")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.samples, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.onnx"
        model = build(0)
        onnx.save_model(model, str(path))
        providers = choose_providers(args.device)
        # the provider options refine's sessions use (no TF32 on CUDA), for a like baseline
        session = inference_session(model, providers, None)
        session.run(None, {"input": x[: args.batch_size]})  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(0, args.samples, args.batch_size):
                session.run(["logits"], {"input": x[i : i + args.batch_size]})
            times.append(time.perf_counter() - start)
        inference = statistics.median(times)

        config = RefineConfig.of(
            device=args.device,
            schedule=args.schedule,
            epochs=args.epochs,
            sweeps=args.sweeps,
            batch_size=args.batch_size,
            allow_worse=True,
        )
        start = time.perf_counter()
        refiner = ModelState(path, config)
        setup = time.perf_counter() - start
        result = run_refine(refiner, from_arrays(x, y))
        total = time.perf_counter() - start
    print(
        json.dumps(
            {
                "device": args.device,
                "providers": providers,
                "array_module": refiner.xp.__name__,
                "samples": args.samples,
                "schedule": args.schedule,
                "epochs": args.epochs,
                "sweeps": args.sweeps,
                "layers": [layer.name for layer in refiner.layers],
                "inference_s": round(inference, 3),
                "setup_s": round(setup, 3),
                "forward_and_targets_s": round(result.timings["forward_and_targets"], 3),
                "solve_s": round(result.timings["solve"], 3),
                "total_s": round(total, 3),
                "total_over_inference": round(total / inference, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
