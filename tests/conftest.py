"""Shared fixtures: the real model corpus and the real MNIST / CIFAR-10 test sets.

``ONNXFBP_MODELS_DIR`` and ``ONNXFBP_DATA_DIR`` override ``../shared/models`` and
``../shared/data``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from shared_data import cifar10_test, data_dir, mnist_test, models_dir, shift_images

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_models() -> Path:
    path = models_dir()
    if not (path / "MANIFEST.tsv").is_file():
        pytest.skip(f"shared model corpus not found at {path}; set ONNXFBP_MODELS_DIR")
    return path


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images in [0, 1] (float32 [10000, 28, 28]) and labels."""
    if not (data_dir() / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {data_dir()}; set ONNXFBP_DATA_DIR")
    images, labels = mnist_test()
    return images.astype(np.float32) / 255.0, labels


@pytest.fixture(scope="session")
def mnist_rot(mnist: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Rotated MNIST (+-45 degrees): first 5,000 to adapt, last 5,000 to evaluate."""
    x, y = mnist
    return {
        "x_adapt": shift_images(x[:5000], "rot", seed=1), "y_adapt": y[:5000],
        "x_eval": shift_images(x[5000:], "rot", seed=2), "y_eval": y[5000:],
        "x_clean": x[5000:], "y_clean": y[5000:],
    }


@pytest.fixture(scope="session")
def mnist_noise(mnist: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Noisy MNIST (Gaussian, sigma 0.5, clipped): first 5,000 to adapt, last 5,000 to
    evaluate. Recovering it needs the convolutions to adapt (method.md, section 2)."""
    x, y = mnist
    return {
        "x_adapt": shift_images(x[:5000], "noise", seed=1), "y_adapt": y[:5000],
        "x_eval": shift_images(x[5000:], "noise", seed=2), "y_eval": y[5000:],
    }


@pytest.fixture(scope="session")
def cifar() -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test images in [0, 1] (float32 HWC), shuffled with a fixed seed."""
    if not (data_dir() / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found under {data_dir()}; set ONNXFBP_DATA_DIR")
    images, labels = cifar10_test()
    return images.astype(np.float32) / 255.0, labels


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A scratch folder with a copy of the demo model (``model.onnx``) and its first
    300 labelled samples (``adapt.npz``)."""
    shutil.copy(PROJECT / "models" / "demo_mnist_cnn.onnx", tmp_path / "model.onnx")
    with np.load(PROJECT / "models" / "demo_adapt.npz") as z:
        np.savez(tmp_path / "adapt.npz", input=z["input"][:300], y=z["y"][:300])
    return tmp_path
