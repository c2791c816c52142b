"""Build the bundled "embedded default" demo: a small MNIST CNN exported to ONNX plus
labelled data under the ``rot`` shift.

Everything is seeded and deterministic (CPU only, deterministic torch kernels, fixed
thread count). The MNIST training set is not available, so the model is trained on the
clean, upright MNIST *test* images 0..4999; images 5000..9999 are never trained on and
supply the bundled data:

- ``models/demo_mnist_cnn.onnx``: the exported classifier (input ``input`` float32
  [N, 1, 28, 28], output ``logits`` float32 [N, 10], dynamic batch axis).
- ``models/demo_adapt.npz``: images 5000..6999, rotated (the labelled data a user adapts on).
- ``models/demo_eval.npz``: images 8000..8999, rotated (held-out evaluation).
- ``models/demo_clean.npz``: images 8000..8999, unrotated (clean accuracy check).
- ``models/README.md``: what all of the above is, with the measured accuracies.

Each npz holds ``input`` (float32 [N, 1, 28, 28], x = img / 255) and ``y`` (int64).

Rebuild from the project root with::

    python tools/make_demo.py
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # allow `python tools/make_demo.py` without installing
    sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "tests"))  # the shared MNIST reader

from shared_data import mnist_test, shift_images  # noqa: E402

SEED = 0
EPOCHS = 12  # where clean accuracy on the unbundled images 7000..7999 levels off
BATCH = 64
LR = 1e-3
TRAIN = (0, 5000)
ADAPT = (5000, 7000)
EVAL = (8000, 9000)
SHIFT = "rot"
ADAPT_SHIFT_SEED = 1
EVAL_SHIFT_SEED = 2
OPSET = 13
MAX_MODELS_BYTES = 8 * 1024 * 1024

ONNX_NAME = "demo_mnist_cnn.onnx"
ADAPT_NAME = "demo_adapt.npz"
EVAL_NAME = "demo_eval.npz"
CLEAN_NAME = "demo_clean.npz"


class DemoCNN(nn.Module):
    """Conv(1->8)-ReLU-Pool - Conv(8->16)-ReLU-Pool - Flatten - FC(784->64)-ReLU - FC(64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


def seed_everything(seed: int) -> None:
    """Seed every RNG in play and force deterministic CPU kernels."""
    np.random.seed(seed)  # noqa: NPY002 - the legacy global RNG too, should anything use it
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)


def to_input(images01: NDArray[np.floating]) -> NDArray[np.float32]:
    """[N, 28, 28] images in [0, 1] -> model-ready float32 NCHW [N, 1, 28, 28]."""
    return np.ascontiguousarray(np.asarray(images01, dtype=np.float32)[:, None, :, :])


def train(x: NDArray[np.float32], y: NDArray[np.int64], seed: int) -> DemoCNN:
    """Train ``DemoCNN`` with Adam on (x, y); the batch order comes from ``seed``."""
    model = DemoCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xt), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        print(
            f"  epoch {epoch + 1}/{EPOCHS}: loss {loss_sum / total:.4f}, "
            f"train acc {correct / total:.4f}"
        )
    model.eval()
    return model


def export_onnx(model: DemoCNN, path: Path) -> None:
    """Export with the TorchScript exporter (opset 13, dynamic batch) and check the model."""
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def ort_session(path: Path) -> ort.InferenceSession:
    """A CPU onnxruntime session for ``path`` (2 intra-op threads)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(sess: ort.InferenceSession, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Logits for x, batched through onnxruntime."""
    outs = [sess.run(["logits"], {"input": x[i : i + 500]})[0] for i in range(0, len(x), 500)]
    return np.concatenate(outs).astype(np.float32)


def ort_accuracy(sess: ort.InferenceSession, x: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    """Top-1 accuracy of the ONNX model on (x, y)."""
    return float((ort_logits(sess, x).argmax(1) == y).mean())


def save_npz(path: Path, x: NDArray[np.float32], y: NDArray[np.int64]) -> None:
    """Write a bundled data file with keys ``input`` and ``y``."""
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    np.savez_compressed(path, input=x, y=y)


def human(n: int) -> str:
    """Bytes as a short human-readable string."""
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def write_readme(path: Path, sizes: dict[str, int], acc: dict[str, float]) -> None:
    """Document the bundled model and data in ``models/README.md``."""
    n_params = sum(p.numel() for p in DemoCNN().parameters())
    total = sum(sizes.values())
    rows = [
        (ADAPT_NAME, ADAPT, f"`{SHIFT}` (seed {ADAPT_SHIFT_SEED})"),
        (EVAL_NAME, EVAL, f"`{SHIFT}` (seed {EVAL_SHIFT_SEED})"),
        (CLEAN_NAME, EVAL, "none"),
    ]
    data_rows = "\n".join(
        f"| `{name}` | {lo}..{hi - 1} | {shift} | {hi - lo} | {human(sizes[name])} |"
        for name, (lo, hi), shift in rows
    )
    text = f"""# Bundled demo model and data ("embedded default")

Everything in this folder is generated by `tools/make_demo.py` (seeded and deterministic,
CPU only: a rebuild gives a byte-identical ONNX file and identical arrays; the npz zip
headers carry the write time). Rebuild from the project root with:

```
python tools/make_demo.py
```

## Model: `{ONNX_NAME}`

A small CNN for MNIST digits ({n_params:,} parameters):

| layer | shape |
|---|---|
| Conv 3x3, 1 -> 8 channels, padding 1, ReLU | [N, 8, 28, 28] |
| MaxPool 2x2 | [N, 8, 14, 14] |
| Conv 3x3, 8 -> 16 channels, padding 1, ReLU | [N, 16, 14, 14] |
| MaxPool 2x2 | [N, 16, 7, 7] |
| Flatten | [N, 784] |
| Linear 784 -> 64, ReLU | [N, 64] |
| Linear 64 -> 10 (logits, no softmax) | [N, 10] |

- ONNX input `input`: float32 `[batch, 1, 28, 28]`; output `logits`: float32 `[batch, 10]`;
  the batch axis is dynamic.
- Exported with `torch.onnx.export(..., dynamo=False, opset_version={OPSET})` (torch
  {torch.__version__}); passes `onnx.checker.check_model(full_check=True)`, and its
  onnxruntime output matches torch to max abs diff < 1e-4.

### Training

The MNIST training set is not available, so the model was trained on the **MNIST test
set images 0..4999** (clean, upright) only. Adam, lr {LR:g}, batch {BATCH}, {EPOCHS} epochs,
cross-entropy loss, seed {SEED} (`torch.manual_seed`, `np.random.seed`, deterministic torch
kernels, 2 threads). Images 5000..9999 were never trained on. The epoch count was chosen
where clean accuracy on images 7000..7999 (in none of the bundled files) levels off; the
bundled evaluation files played no part in choosing it.

### Preprocessing

`x = img / 255` as float32, NCHW: a uint8 `[N, 28, 28]` image batch becomes
`img[:, None, :, :].astype(np.float32) / 255` (no mean/std normalisation).

## Data

All three files hold `input` (float32 `[N, 1, 28, 28]`, already preprocessed, model-ready)
and `y` (int64 `[N]`, digit labels), written with `np.savez_compressed`.

| file | MNIST test images | shift | N | size |
|---|---|---|---|---|
{data_rows}

`{ONNX_NAME}` is {human(sizes[ONNX_NAME])}; the four files total {human(total)}.
Images 7000..7999 and 9000..9999 are in no bundled file.

- `{ADAPT_NAME}` is the labelled data a user would refine the model on.
- `{EVAL_NAME}` is the held-out evaluation set under the same shift (disjoint from the
  adaptation images).
- `{CLEAN_NAME}` is the same images unrotated, to check that clean accuracy is kept.

The shift `{SHIFT}` is `tests/shared_data.py: shift_images(images01, "{SHIFT}", seed=...)`: each
image in [0, 1] is rotated by an angle drawn uniformly from [-45, 45] degrees (bilinear,
zero fill, clipped to [0, 1]), applied before the NCHW reshape.

## Measured accuracy (onnxruntime, before any refinement)

| data | accuracy |
|---|---|
| clean, images {EVAL[0]}..{EVAL[1] - 1} (`{CLEAN_NAME}`) | {acc["clean"]:.4f} |
| rotated, images {EVAL[0]}..{EVAL[1] - 1} (`{EVAL_NAME}`) | {acc["eval"]:.4f} |
| rotated, images {ADAPT[0]}..{ADAPT[1] - 1} (`{ADAPT_NAME}`) | {acc["adapt"]:.4f} |
| clean, all held-out images 5000..9999 | {acc["heldout_clean"]:.4f} |
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=_ROOT / "models",
        help="output folder (default: the project's models/)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seed_everything(SEED)

    images, labels = mnist_test()
    x_all = to_input(images / 255.0)
    print(f"MNIST test set: {len(images)} images")

    print(f"training on images {TRAIN[0]}..{TRAIN[1] - 1} ({EPOCHS} epochs)")
    model = train(x_all[slice(*TRAIN)], labels[slice(*TRAIN)], SEED)

    onnx_path = out / ONNX_NAME
    export_onnx(model, onnx_path)
    sess = ort_session(onnx_path)
    check_x = x_all[5000:5500]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(check_x)).numpy()
    diff = float(np.abs(ort_logits(sess, check_x) - torch_out).max())
    print(f"exported {onnx_path.name}: onnxruntime vs torch max abs diff {diff:.2e}")
    if diff >= 1e-4:
        raise SystemExit(f"ONNX output differs from torch by {diff:.2e} (>= 1e-4)")

    def rotated(span: tuple[int, int], seed: int) -> NDArray[np.float32]:
        return to_input(shift_images(images[slice(*span)] / 255.0, SHIFT, seed=seed))

    data = {
        ADAPT_NAME: (rotated(ADAPT, ADAPT_SHIFT_SEED), labels[slice(*ADAPT)]),
        EVAL_NAME: (rotated(EVAL, EVAL_SHIFT_SEED), labels[slice(*EVAL)]),
        CLEAN_NAME: (x_all[slice(*EVAL)], labels[slice(*EVAL)]),
    }
    for name, (x, y) in data.items():
        save_npz(out / name, x, y)

    acc = {
        "clean": ort_accuracy(sess, *data[CLEAN_NAME]),
        "eval": ort_accuracy(sess, *data[EVAL_NAME]),
        "adapt": ort_accuracy(sess, *data[ADAPT_NAME]),
        "heldout_clean": ort_accuracy(sess, x_all[5000:], labels[5000:]),
    }
    sizes = {p.name: p.stat().st_size for p in (out / n for n in (ONNX_NAME, *data))}
    write_readme(out / "README.md", sizes, acc)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())

    print("files:")
    for name, size in sizes.items():
        print(f"  {name:22s} {human(size):>10s}")
    print(f"  models/ total          {human(total):>10s}")
    if total > MAX_MODELS_BYTES:
        raise SystemExit(f"{out} is {human(total)}, over the {human(MAX_MODELS_BYTES)} budget")
    print("accuracy (onnxruntime):")
    print(f"  clean eval   (images {EVAL[0]}..{EVAL[1] - 1}):   {acc['clean']:.4f}")
    print(f"  rotated eval (images {EVAL[0]}..{EVAL[1] - 1}):   {acc['eval']:.4f}")
    print(f"  rotated adapt (images {ADAPT[0]}..{ADAPT[1] - 1}): {acc['adapt']:.4f}")
    print(f"  clean held-out (images 5000..9999): {acc['heldout_clean']:.4f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
