"""Readers for the public MNIST / CIFAR-10 test sets and the distribution shifts
used by the tests, the benchmarks and the bundled demo.

The shared data folder is ``../shared/data`` relative to the project root, or
wherever ``ONNXFBP_DATA_DIR`` points. Nothing here downloads anything.

Shifts (all seeded, applied to images in [0, 1]):

- ``rot``:   each image rotated by an angle drawn uniformly from [-45, 45] degrees
             (bilinear, zero fill).
- ``noise``: additive Gaussian noise, sigma 0.5, clipped back to [0, 1].
- ``cifar`` shift for CIFAR-10: ``noise`` with sigma 0.1 plus a contrast cut to
  60 % around mid-grey (a cheaper camera).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "cifar10_test",
    "data_dir",
    "mnist_test",
    "models_dir",
    "shift_images",
]

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Folder holding ``mnist/`` and ``cifar10/`` (``ONNXFBP_DATA_DIR`` overrides)."""
    return Path(os.environ.get("ONNXFBP_DATA_DIR", _PROJECT_ROOT.parent / "shared" / "data"))


def models_dir() -> Path:
    """Folder holding the shared model corpus (``ONNXFBP_MODELS_DIR`` overrides)."""
    return Path(os.environ.get("ONNXFBP_MODELS_DIR", _PROJECT_ROOT.parent / "shared" / "models"))


def mnist_test(root: Path | None = None) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """The 10,000 MNIST test images (uint8, [10000, 28, 28]) and labels."""
    root = (root or data_dir()) / "mnist"
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def cifar10_test(
    root: Path | None = None, seed: int = 0
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """The 10,000 CIFAR-10 test images (uint8 HWC) and labels, shuffled with ``seed``
    (the stored file is ordered by class)."""
    root = (root or data_dir()) / "cifar10"
    with np.load(root / "test_10k_jpeg.npz") as z:
        images, labels = z["x_hwc_uint8"], z["y"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    return images[order], labels[order]


def shift_images(images01: NDArray[np.floating], shift: str, seed: int = 0) -> NDArray[np.float32]:
    """Apply a named shift to images in [0, 1]; shapes [N, H, W] or [N, H, W, C]."""
    rng = np.random.default_rng(seed)
    x = np.asarray(images01, dtype=np.float32)
    if shift == "none":
        return x.copy()
    if shift == "rot":
        angles = rng.uniform(-45.0, 45.0, size=len(x))
        out = np.empty_like(x)
        for i, (img, angle) in enumerate(zip(x, angles, strict=True)):
            out[i] = ndimage.rotate(
                img, angle, axes=(0, 1), reshape=False, order=1, mode="constant"
            )
        return np.clip(out, 0.0, 1.0)
    if shift == "noise":
        return np.clip(x + rng.normal(0.0, 0.5, size=x.shape).astype(np.float32), 0.0, 1.0)
    if shift == "cifar":
        low_contrast = 0.5 + 0.6 * (x - 0.5)
        noisy = low_contrast + rng.normal(0.0, 0.1, size=x.shape).astype(np.float32)
        return np.clip(noisy, 0.0, 1.0)
    raise ValueError(f"unknown shift {shift!r}; use one of none, rot, noise, cifar")
