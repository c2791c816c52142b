"""Where a refine spends its wall time: stack sampling of one benchmark scenario.

Runs ``onnxfbp.refine.run_refine`` with defaults on a ``tools/bench.py`` scenario ``--runs``
times in one process and samples the main thread's stack every 2 ms during the
last run (the earlier ones warm up CUDA, CuPy's kernel cache and onnxruntime's
sessions). Prints each run's time and timings, then the share of samples per
innermost onnxfbp source line, per innermost function (any module), and per
phase (the refine step that was running > the innermost onnxfbp function).

A sampler rather than cProfile: on the GPU cProfile lost most of the run (it
recorded 1.3 s of a 3.2 s refine), and what matters there is wall time spent
waiting on the device, which a sampler sees as the line that waits.

    python tools/profile_refine.py --device cuda     # or cpu; --scenario mnist-noise
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import bench  # noqa: E402
from shared_data import models_dir  # noqa: E402

from onnxfbp import ModelState, RefineConfig, from_arrays  # noqa: E402
from onnxfbp.refine import run_refine  # noqa: E402

# innermost first: the schedule's steps and checks, the output-layer solves, sweeps
PHASES = ("precondition", "crosses", "apply_step", "check", "head_cross_validated", "polish_head",
          "run_sweeps", "scores", "train_on_split", "run_refine")


class StackSampler:
    """Counts where one thread is, every ``interval`` seconds, in a daemon thread."""

    def __init__(self, thread_id: int, interval: float = 0.002) -> None:
        self.thread_id, self.interval = thread_id, interval
        self.lines: collections.Counter[str] = collections.Counter()
        self.leaves: collections.Counter[str] = collections.Counter()
        self.phases: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            frame: FrameType | None = sys._current_frames().get(self.thread_id)
            stack = []
            while frame is not None:
                stack.append(frame)
                frame = frame.f_back
            if stack:
                self.samples += 1
                leaf = stack[0].f_code
                self.leaves[f"{Path(leaf.co_filename).name}:{leaf.co_name}"] += 1
                ours = [f for f in stack if "/onnxfbp/" in f.f_code.co_filename]
                if ours:
                    inner = ours[0]
                    name = Path(inner.f_code.co_filename).name
                    self.lines[f"{name}:{inner.f_lineno} {inner.f_code.co_name}"] += 1
                    names = [f.f_code.co_name for f in ours]
                    phase = next((n for n in names if n in PHASES), "?")
                    self.phases[f"{phase} > {inner.f_code.co_name}"] += 1
            time.sleep(self.interval)

    def report(self, top: int = 25) -> str:
        n = max(self.samples, 1)
        out = []
        for title, counter in (("innermost onnxfbp line", self.lines),
                               ("innermost function", self.leaves),
                               ("phase > innermost onnxfbp function", self.phases)):
            out.append(f"--- {title} (share of {self.samples} samples)")
            out += [f"{count / n:6.1%}  {key}" for key, count in counter.most_common(top)]
        return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--scenario", default="mnist-rot", choices=sorted(bench.SCENARIOS))
    parser.add_argument("--runs", type=int, default=2, help="the last one is sampled")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bench.prepare_data([args.scenario], Path(tmp))
        with np.load(Path(tmp) / f"{args.scenario}.npz") as z:
            x, y = z["x_adapt"], z["y_adapt"]
    model = models_dir() / bench.ALL_SCENARIOS[args.scenario].model
    main_thread = threading.get_ident()
    sampler = StackSampler(main_thread)
    for run in range(args.runs):
        refiner = ModelState(model, RefineConfig.of(device=args.device, seed=run))
        started = time.perf_counter()
        if run == args.runs - 1:
            with sampler:
                result = run_refine(refiner, from_arrays(x, y))
        else:
            result = run_refine(refiner, from_arrays(x, y))
        seconds = time.perf_counter() - started
        timings = {k: round(v, 3) for k, v in result.timings.items()}
        print(f"{args.device} run {run}: refine {seconds:.2f} s, held-out "
              f"{result.heldout_before.accuracy:.4f} -> {result.heldout_after.accuracy:.4f}, "
              f"reverse pass {refiner.reverse_pass}, {timings}", flush=True)
    print(sampler.report())


if __name__ == "__main__":
    main()
