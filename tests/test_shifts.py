"""The robustness matrix's shifts (``tools/shifts.py``) on real MNIST and CIFAR-10
images: seeded, shape/dtype/range kept, and each one really changes the images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from shifts import SHIFTS, apply_shift  # noqa: E402

MIN_CHANGE = 0.02  # mean |shifted - original| over all pixels, images in [0, 1]


@pytest.fixture(scope="module", params=["mnist", "cifar"])
def images(request: pytest.FixtureRequest) -> np.ndarray:
    x, _ = request.getfixturevalue(request.param)
    return np.ascontiguousarray(x[:32], dtype=np.float32)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shift_is_seeded_and_keeps_layout(name: str, images: np.ndarray) -> None:
    a = apply_shift(images, name, seed=1)
    b = apply_shift(images, name, seed=1)
    assert a.shape == images.shape and a.dtype == np.float32
    assert np.array_equal(a, b), "same seed, different images"
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.isfinite(a).all()
    change = float(np.abs(a - images).mean())
    assert change > MIN_CHANGE, f"{name} changed the images by only {change:.4f}"
    if name != "inverted":  # the one deterministic shift
        c = apply_shift(images, name, seed=2)
        assert not np.array_equal(a, c), "another seed gave the same images"


def test_unknown_shift_names_the_choices(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="use one of rot, noise"):
        apply_shift(images, "fog", seed=0)
