"""Fingerprints of the weights ``refine()`` writes, to show a refactor keeps them.

For each case (the bundled demo with the default settings, a few short runs of
the other schedules on it, and the pinned shared-model cases of
``tests/test_models.py``) it runs :func:`onnxfbp.refine` on CPU and records, per
initializer that changed, its shape, the float64 sum, the sum of absolute
values, the L2 norm and four projections on fixed random unit vectors.

    PYTHONPATH=<package root> python tools/weights_fingerprint.py [--only demo] \
        [--out tests/data/weights_fingerprint.json]

The settings are written with the names of the current configuration
(``onnxfbp.config``); :func:`make_config` maps them onto an older flat
``RefineConfig`` when the package imported is one without ``onnxfbp.config``,
so that the same tool fingerprints the code before and after a change.
``tests/test_same_weights.py`` recomputes the fingerprints and compares.

The file also records :func:`machine`: the CPU's SIMD features as NumPy sees them
and the NumPy and onnxruntime versions. Trained weights depend on them beyond
the comparison's tolerance (the kernels round differently: the same commit gave
the demo's weights 1e-2 apart on an AVX2 and an AVX-512 machine), so the test
compares only on a machine like the one that recorded them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

PROJECT = Path(__file__).resolve().parent.parent
DEMO = PROJECT / "models"
N = 2000  # adapt samples per shared model (as tests/test_models.py)
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2471, 0.2435, 0.2616], np.float32)

# Settings by concern: (section, name) of the new config -> name of the old flat one.
_OLD_NAMES = {
    ("run", "device"): "device",
    ("split", "seed"): "seed",
    ("schedule", None): "schedule",
    ("layers", "max_layers"): "max_layers",
    ("sweep", "target_step"): "step",
    ("sweep", "sweeps"): "sweeps",
    ("minibatch", "epochs"): "epochs",
    ("head", "min_heldout_for_depth"): "min_heldout_for_depth",
}

# Each case: settings (section -> {name: value}; "schedule" is top level), data.
PINNED = {"run": {"device": "cpu"}, "schedule": "sequential",
          "sweep": {"target_step": 5.0, "sweeps": 2}, "layers": {"max_layers": 2}}


def make_config(settings: dict[str, Any]) -> Any:
    """A ``RefineConfig`` with ``settings`` (nested by concern) and defaults elsewhere,
    for the package imported: the nested configuration or the older flat one."""
    try:
        from onnxfbp import config as new  # noqa: PLC0415
    except ImportError:
        new = None
    if new is not None and hasattr(new, "RefineConfig") and hasattr(new, "SweepConfig"):
        return new.RefineConfig.from_settings(settings)
    from onnxfbp import RefineConfig  # noqa: PLC0415

    flat: dict[str, Any] = {}
    for section, value in settings.items():
        if not isinstance(value, dict):
            flat[_OLD_NAMES[(section, None)]] = value
            continue
        for name, v in value.items():
            flat[_OLD_NAMES[(section, name)]] = v
    return RefineConfig(**flat)


def fingerprint(values: np.ndarray, seed: int = 20261206) -> dict[str, Any]:
    """Shape, sums, L2 norm and 4 projections on fixed random unit vectors."""
    w = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((4, w.size))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return {
        "shape": list(np.shape(values)),
        "sum": float(w.sum()),
        "abs_sum": float(np.abs(w).sum()),
        "l2": float(np.linalg.norm(w)),
        "projections": [float(p) for p in v @ w],
    }


def changed(model_path: Path, refined: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Fingerprints of the initializers of ``refined`` that differ from the model's."""
    original = onnx.load(str(model_path))
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    out = {}
    for tensor in refined.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # refined values are always inline
        after = numpy_helper.to_array(tensor)
        if tensor.name in before and not np.array_equal(before[tensor.name], after):
            out[tensor.name] = fingerprint(after)
    return out


def _run(model: Path, data: Any, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from onnxfbp import refine  # noqa: PLC0415

    x, y = data if isinstance(data, tuple) else (data, None)
    result = refine(model, None, x, y, config=make_config(settings), force=True)
    return changed(model, result.model)


def _demo_subset(n: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DEMO / "demo_adapt.npz") as z:
        return z["input"][:n], z["y"][:n]


def demo_cases() -> dict[str, Callable[[], dict[str, Any]]]:
    """The demo (default settings, seed 0) and short runs of the other paths on it."""
    model = DEMO / "demo_mnist_cnn.onnx"
    adapt = DEMO / "demo_adapt.npz"
    cpu = {"run": {"device": "cpu"}}
    return {
        "demo": lambda: _run(model, adapt, cpu),
        "demo_jacobi": lambda: _run(model, _demo_subset(1200), {
            **cpu, "schedule": "jacobi", "sweep": {"sweeps": 1}}),
        "demo_sequential": lambda: _run(model, _demo_subset(1200), {
            **cpu, "schedule": "sequential", "sweep": {"sweeps": 1}}),
        "demo_head_cv": lambda: _run(model, _demo_subset(150), cpu),
        "demo_minibatch_short": lambda: _run(model, _demo_subset(1500), {
            **cpu, "minibatch": {"epochs": 0.5}}),
    }


def _resize32(images01: np.ndarray) -> np.ndarray:
    """As tests/test_models.py prepares LeNet's input (without the channel axis)."""
    from benchlib import prep_resize32  # noqa: PLC0415

    return prep_resize32(images01)[:, 0]


SHARED: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str, dict[str, Any]]] = {
    "mnist_pytorch25_legacy_cnn.onnx": (lambda x: ((x - 0.5) / 0.5)[:, None], "mnist", {}),
    "mnist_cntk_zoo_mnist8.onnx": (lambda x: x[:, None], "mnist", {}),
    "mnist_keras_tf2onnx192_mlp.onnx": (lambda x: x, "mnist", {}),
    "mnist_keras_tf2onnx1111_cnn_concat_nhwc.onnx": (lambda x: x[..., None], "mnist", {}),
    "mnist_whitematter_custom_bn.onnx": (lambda x: x[:, None], "mnist", {}),
    "mnist_pytorch13_lenet5_branch_logsoftmax_32x32.onnx": (
        lambda x: _resize32(x)[:, None], "mnist", {}),
    "mnist_pytorch18_eran_ffnn_sigmoid_6x200.onnx": (
        lambda x: x[:, None], "mnist", {"layers": {"max_layers": None}}),
    "mnist_dynamo_pt211_extdata_resnet_gap/mnist_cnn.onnx": (lambda x: x[:, None], "mnist", {}),
    "cifar10_pytorch18_vnncomp_resnet2b.onnx": (
        lambda x: ((x - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2), "cifar", {}),
}


def shared_cases() -> dict[str, Callable[[], dict[str, Any]]]:
    """The pinned cases of tests/test_models.py (adapt split, same config)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from shared_data import (  # noqa: PLC0415
        cifar10_test,
        mnist_test,
        models_dir,
        shift_images,
    )

    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def adapt(dataset: str) -> tuple[np.ndarray, np.ndarray]:
        if dataset not in cache:
            x, y = mnist_test() if dataset == "mnist" else cifar10_test()
            x01 = x.astype(np.float32) / 255
            shift = "rot" if dataset == "mnist" else "cifar"
            cache[dataset] = (shift_images(x01[:N], shift, seed=1), y[:N])
        return cache[dataset]

    def case(name: str) -> Callable[[], dict[str, Any]]:
        prep, dataset, extra = SHARED[name]

        def run() -> dict[str, Any]:
            x, y = adapt(dataset)
            settings = {k: dict(v) if isinstance(v, dict) else v for k, v in PINNED.items()}
            for section, values in extra.items():
                settings[section] = {**settings.get(section, {}), **values}
            return _run(models_dir() / name, (prep(x), y), settings)

        return run

    return {name: case(name) for name in SHARED if (models_dir() / name).is_file()}


def compare(want: dict[str, Any], got: dict[str, Any], rtol: float = 1e-5) -> list[str]:
    """Differences between two fingerprints of one case (empty: the same)."""
    problems = []
    if sorted(want) != sorted(got):
        problems.append(f"changed initializers {sorted(got)} != {sorted(want)}")
    for name in sorted(set(want) & set(got)):
        a, b = want[name], got[name]
        if a["shape"] != b["shape"]:
            problems.append(f"{name}: shape {b['shape']} != {a['shape']}")
            continue
        scale = a["l2"] * np.sqrt(max(np.prod(a["shape"]), 1))
        pairs = [("sum", a["sum"], b["sum"], a["abs_sum"]),
                 ("abs_sum", a["abs_sum"], b["abs_sum"], 0.0),
                 ("l2", a["l2"], b["l2"], 0.0)]
        pairs += [(f"projection {i}", p, q, a["l2"])
                  for i, (p, q) in enumerate(zip(a["projections"], b["projections"], strict=True))]
        for what, p, q, floor in pairs:
            if abs(p - q) > rtol * max(abs(p), floor, 1e-30 * scale):
                problems.append(f"{name}: {what} {q!r} != {p!r}")
    return problems


def machine() -> dict[str, Any]:
    """What the trained weights depend on besides the code: the CPU's SIMD features
    (as NumPy dispatches on them) and the NumPy and onnxruntime versions."""
    import onnxruntime as ort  # noqa: PLC0415

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # noqa: PLC0415
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features  # noqa: PLC0415
    return {"simd": sorted(k for k, on in features.items() if on), "numpy": np.__version__,
            "onnxruntime": ort.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["demo", "shared"], default=None)
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = parser.parse_args()
    cases: dict[str, Callable[[], dict[str, Any]]] = {}
    if args.only in (None, "demo"):
        cases.update(demo_cases())
    if args.only in (None, "shared"):
        cases.update(shared_cases())
    out: dict[str, Any] = {}
    for name, run in cases.items():
        print(f"fingerprinting {name}...", file=sys.stderr, flush=True)
        out[name] = run()
    text = json.dumps({"machine": machine(), "cases": out}, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
