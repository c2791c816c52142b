"""Every model of the shared corpus (``../shared/models``, ``ONNXFBP_MODELS_DIR``)
refined on a distribution shift with its own preprocessing (MANIFEST.tsv):

- the held-out accuracy on the shift gains;
- the clean accuracy stays within 5 points;
- only initializer values differ in the written graph (same nodes, attributes,
  inputs, outputs, opsets, initializer names, dtypes and shapes); the
  external-data model is written with external data again.

Data (documented split of the 10,000 MNIST test images): images 0-1999 rotated
by up to 45 degrees (seed 1) adapt; images 5000-6999 rotated (seed 2) evaluate;
the same images unrotated are the clean check. CIFAR-10 (shuffled, seed 0): the
same index ranges with the ``cifar`` shift (contrast cut + noise).

The configuration is pinned (sequential schedule, target step 5, two sweeps
over the last two layers; the sigmoid MLP gets all its layers) so that the
assertions test the graph handling, not the tuning of the defaults.

``python tests/test_models.py [--defaults]`` prints the table of the closing note
(all models, shift and clean accuracy before -> after, refine seconds), with the
pinned configuration or with the defaults.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from graphcheck import changed_initializers
from shared_data import cifar10_test, mnist_test, models_dir, shift_images

from onnxfbp import RefineConfig, evaluate, refine

N = 2000  # adapt / eval / clean samples per model
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2471, 0.2435, 0.2616], np.float32)


def _resize32(images01: np.ndarray) -> np.ndarray:
    """28x28 -> 32x32 bilinear, as torchvision Resize on a PIL image (LeNet's run.py)."""
    from PIL import Image  # noqa: PLC0415  (a matplotlib dependency)

    out = np.empty((len(images01), 32, 32), np.float32)
    for i, img in enumerate(images01):
        pil = Image.fromarray(img.astype(np.float32), mode="F")
        out[i] = np.asarray(pil.resize((32, 32), Image.BILINEAR))
    return out


@dataclass(frozen=True)
class Corpus:
    prep: Callable[[np.ndarray], np.ndarray]  # images in [0, 1] -> model input
    dataset: str = "mnist"  # mnist (shift rot) | cifar (shift cifar)
    config: dict[str, Any] = field(default_factory=dict)  # overrides of CONFIG


CONFIG: dict[str, Any] = {"schedule": "sequential", "target_step": 5.0, "sweeps": 2,
                          "max_layers": 2, "device": "cpu"}

MODELS = {
    "mnist_pytorch25_legacy_cnn.onnx": Corpus(lambda x: ((x - 0.5) / 0.5)[:, None]),
    "mnist_cntk_zoo_mnist8.onnx": Corpus(lambda x: x[:, None]),  # fixed batch 1
    "mnist_keras_tf2onnx192_mlp.onnx": Corpus(lambda x: x),  # [N, 28, 28]
    "mnist_keras_tf2onnx1111_cnn_concat_nhwc.onnx": Corpus(lambda x: x[..., None]),  # NHWC
    "mnist_whitematter_custom_bn.onnx": Corpus(lambda x: x[:, None]),
    "mnist_pytorch13_lenet5_branch_logsoftmax_32x32.onnx": Corpus(lambda x: _resize32(x)[:, None]),
    # normalization is inside the graph; a 7-layer sigmoid MLP gains only through its
    # hidden layers
    "mnist_pytorch18_eran_ffnn_sigmoid_6x200.onnx": Corpus(lambda x: x[:, None],
                                                           config={"max_layers": None}),
    "mnist_dynamo_pt211_extdata_resnet_gap/mnist_cnn.onnx": Corpus(lambda x: x[:, None]),
    "cifar10_pytorch18_vnncomp_resnet2b.onnx": Corpus(
        lambda x: ((x - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2), dataset="cifar"),
}


def _splits(dataset: str, images01: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    shift = "rot" if dataset == "mnist" else "cifar"
    return {
        "x_adapt": shift_images(images01[:N], shift, seed=1), "y_adapt": labels[:N],
        "x_eval": shift_images(images01[5000:5000 + N], shift, seed=2),
        "y_eval": labels[5000:5000 + N],
        "x_clean": images01[5000:5000 + N],
    }


@dataclass
class Outcome:
    shift_before: float
    shift_after: float
    clean_before: float
    clean_after: float
    seconds: float
    batch_mode: str  # dynamic, or fixed chunks when the batch could not be made symbolic


def refine_model(name: str, data: dict[str, np.ndarray], out: Path,
                 defaults: bool = False) -> Outcome:
    """Refine one corpus model on ``data`` into ``out`` (pinned config, or with
    ``defaults`` RefineConfig's defaults); accuracies and refine time."""
    spec = MODELS[name]
    model = models_dir() / name
    prep = spec.prep
    settings = {"device": "cpu"} if defaults else {**CONFIG, **spec.config}
    config = RefineConfig.of(**settings)
    t = time.perf_counter()
    result = refine(model, out, prep(data["x_adapt"]), data["y_adapt"], config=config,
                    eval_data=(prep(data["x_eval"]), data["y_eval"]))
    seconds = time.perf_counter() - t
    assert result.eval_before is not None and result.eval_after is not None
    clean = prep(data["x_clean"])
    return Outcome(
        result.eval_before.accuracy, result.eval_after.accuracy,
        evaluate(model, clean, data["y_eval"], device="cpu").accuracy,
        evaluate(out, clean, data["y_eval"], device="cpu").accuracy,
        seconds, result.environment["batch_mode"],
    )


@pytest.fixture(scope="module")
def mnist_corpus(mnist_rot: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    d = mnist_rot  # adapt: images 0-4999 rotated (seed 1); eval: 5000-9999 (seed 2)
    return {"x_adapt": d["x_adapt"][:N], "y_adapt": d["y_adapt"][:N],
            "x_eval": d["x_eval"][:N], "y_eval": d["y_eval"][:N], "x_clean": d["x_clean"][:N]}


@pytest.fixture(scope="module")
def cifar_corpus(cifar: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    return _splits("cifar", *cifar)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_corpus_model_refines(name: str, shared_models: Path, request: pytest.FixtureRequest,
                              tmp_path: Path) -> None:
    model = models_dir() / name
    if not model.is_file():
        pytest.skip(f"{name} is not in {models_dir()}")
    data = request.getfixturevalue(f"{MODELS[name].dataset}_corpus")
    out = tmp_path / "refined.onnx"
    r = refine_model(name, data, out)
    summary = (f"{name}: shift {r.shift_before:.4f} -> {r.shift_after:.4f}, "
               f"clean {r.clean_before:.4f} -> {r.clean_after:.4f}")
    assert r.shift_after >= r.shift_before + 0.01, summary
    assert r.clean_after >= r.clean_before - 0.05, summary
    assert r.batch_mode == "dynamic"  # fixed-batch models too: whole batches, not chunks

    changed = changed_initializers(model, out)  # AssertionError if anything else differs
    assert changed
    original = onnx.load(str(model), load_external_data=False)
    written = onnx.load(str(out), load_external_data=False)
    assert list(original.graph.value_info) == list(written.graph.value_info)
    was_external = {t.name: int(np.prod(t.dims)) for t in original.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
    if was_external:
        assert (tmp_path / "refined.onnx.data").is_file()
        external = {t.name for t in written.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
        large = {n for n, size in was_external.items() if size >= 1024}  # the weights
        assert large and large <= external, "weights stored externally came back inline"


def main() -> None:
    """Print the corpus table: shift and clean accuracy before -> after, refine time
    (``--defaults``: with RefineConfig's defaults instead of the pinned config)."""
    import tempfile  # noqa: PLC0415

    defaults = "--defaults" in sys.argv[1:]

    mx, my = mnist_test()
    cx, cy = cifar10_test()
    data = {"mnist": _splits("mnist", mx.astype(np.float32) / 255, my),
            "cifar": _splits("cifar", cx.astype(np.float32) / 255, cy)}
    print("| model | shift | on shift | clean | refine s | batch |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(MODELS):
            spec = MODELS[name]
            r = refine_model(name, data[spec.dataset], Path(tmp) / f"{i}.onnx", defaults)
            shift = "rot +-45" if spec.dataset == "mnist" else "cifar"
            print(f"| {name} | {shift} | {r.shift_before:.4f} -> {r.shift_after:.4f} | "
                  f"{r.clean_before:.4f} -> {r.clean_after:.4f} | {r.seconds:.1f} | "
                  f"{r.batch_mode} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
