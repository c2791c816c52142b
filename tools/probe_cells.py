"""Probe a few model x shift cells with the default refine: held-out, eval (shifted)
and original-domain accuracy before and after, and what each layer's outcome was.

Adapt on MNIST / CIFAR-10 test images 0-1999 shifted with seed 1; evaluate on
5000-6999 shifted with seed 2 and unshifted (the original domain). In-process
``onnxfbp.refine``, nothing written.

    PYTHONPATH=. python tools/probe_cells.py                 # the default cells
    PYTHONPATH=. python tools/probe_cells.py keras:elastic   # some of them
"""

from __future__ import annotations

import argparse
import ast
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import MODELS, load_images01  # noqa: E402
from shifts import apply_shift  # noqa: E402

from onnxfbp import RefineConfig  # noqa: E402
from onnxfbp.errors import GateError  # noqa: E402
from onnxfbp.refine import RefineResult, evaluate, refine  # noqa: E402

ALIASES = {
    "pt25": "mnist_pytorch25_legacy_cnn.onnx",
    "keras": "mnist_keras_tf2onnx1111_cnn_concat_nhwc.onnx",
    "bn": "mnist_whitematter_custom_bn.onnx",
    "cifar": "cifar10_pytorch18_vnncomp_resnet2b.onnx",
}
CELLS = ["pt25:rot", "pt25:noise", "keras:elastic", "keras:inverted", "bn:inverted",
         "cifar:contrast"]


def models_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "models"


def probe(cell: str, models: Path, config: RefineConfig) -> str:
    alias, shift = cell.split(":")
    name = ALIASES.get(alias, alias)
    spec = MODELS[name]
    images, labels = load_images01(spec.dataset)
    adapt, held = slice(0, 2000), slice(5000, 7000)
    xa = spec.prep(apply_shift(images[adapt], shift, 1))
    xe = spec.prep(apply_shift(images[held], shift, 2))
    xo = spec.prep(images[held])
    ya, ye = labels[adapt], labels[held]
    path = models / name
    t = time.perf_counter()
    try:
        result: RefineResult = refine(path, None, xa, ya, config=config,
                                      eval_data=(xe, ye))
    except GateError as err:
        result = err.result  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        refined = Path(tmp) / "refined.onnx"
        onnx.save(result.model, refined)
        orig_before = evaluate(path, xo, ye).accuracy
        orig_after = evaluate(refined, xo, ye).accuracy
    layers = result.plan.get("layers", [])
    changed = sum(1 for la in layers if la.get("changed", la.get("refined")))
    selected = sum(1 for la in layers if la.get("selected", la.get("refined")))
    outcomes = "\n".join(f"    {la['name']}: {la.get('outcome', '?')}"
                          + (f" ({la['reason']})" if la.get("reason") else "")
                          for la in layers if la.get("selected", True))
    eb = result.eval_before.accuracy if result.eval_before else float("nan")
    ea = result.eval_after.accuracy if result.eval_after else float("nan")
    return (f"{cell:16s} held {result.heldout_before.accuracy:.3f}->"
            f"{result.heldout_after.accuracy:.3f}  eval {eb:.3f}->{ea:.3f}  "
            f"orig {orig_before:.3f}->{orig_after:.3f}  {seconds:5.1f}s  "
            f"changed {changed}/{selected}\n{outcomes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", default=CELLS, help="alias:shift, e.g. keras:elastic")
    parser.add_argument("--models", type=Path, default=models_dir())
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting other than its default (flat name, e.g. trust=0.2);"
                             " repeatable")
    args = parser.parse_args()
    config = RefineConfig.of(**dict(setting(s) for s in args.set))
    for cell in args.cells:
        print(probe(cell, args.models, config), flush=True)


def setting(text: str) -> tuple[str, object]:
    """``name=value`` with the value read as a Python literal where it is one."""
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


if __name__ == "__main__":
    main()
