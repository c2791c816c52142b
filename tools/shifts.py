"""Seeded distribution shifts for the robustness matrix (``tools/matrix.py``).

Every shift maps images in [0, 1], float32, shaped ``[N, H, W]`` (grayscale, MNIST) or
``[N, H, W, C]`` (RGB, CIFAR-10), to images of the same shape, dtype and range; the same
``seed`` gives the same images. Per-image parameters are drawn from
``numpy.random.default_rng(seed)``.

Shifts (``S`` = image side, ``x`` = one image):

- ``rot``        rotation by an angle ~ U[-45, 45] degrees, bilinear, zero fill
                 (``tests/shared_data.py: shift_images``: the shift of the earlier benchmarks).
- ``noise``      additive Gaussian noise, sigma 0.5 on grayscale (``tests/shared_data.py``),
                 0.2 on RGB (0.5 leaves no signal in a 32x32 colour image); clipped.
- ``inverted``   ``1 - x`` (white digits on black become black on white).
- ``blur``       Gaussian blur over the spatial axes, sigma ~ U[1, 2] pixels.
- ``elastic``    Simard et al. (2003) elastic distortion: a displacement field of U[-1, 1]
                 noise smoothed by a Gaussian of sigma 4 and scaled by alpha = 34 * S / 28
                 pixels, bilinear resampling, zero fill.
- ``translate``  integer translation by (dy, dx) ~ U{-S/5 .. S/5} each, zero fill.
- ``saltpepper`` each pixel (all channels together) set to 0 or to 1 with probability 0.1
                 each.
- ``contrast``   ``c * (x - 0.5) + 0.5 + b``, contrast c ~ U[0.3, 0.6], brightness
                 b ~ U[-0.2, 0.2]; clipped.
- ``jpeg``       JPEG round trip (PIL) at quality ~ U{1 .. 5}, of the image quantized to
                 8 bits (mild on MNIST digits, strong on CIFAR-10: a cell where refining
                 should at least do no harm).

Why not the ``imagecorruptions`` package: it would add OpenCV and scikit-image to the
environment, and its corruptions take no seed (they draw from numpy's global RNG); the
seeded versions above need only numpy, scipy and Pillow, which the project already has.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from benchlib import datasets_module
from numpy.typing import NDArray
from scipy import ndimage

shift_images = datasets_module().shift_images

__all__ = ["SHIFTS", "apply_shift"]

Images = NDArray[np.float32]
Rng = np.random.Generator


def _spatial_sigma(x: Images, sigma: float) -> tuple[float, ...]:
    """Per-axis sigma of one image [H, W] or [H, W, C]: blur rows and columns only."""
    return (sigma, sigma) + (0.0,) * (x.ndim - 2)


def _rot(x: Images, rng: Rng) -> Images:
    return shift_images(x, "rot", int(rng.integers(2**31)))


def _noise(x: Images, rng: Rng) -> Images:
    if x.ndim == 3:
        return shift_images(x, "noise", int(rng.integers(2**31)))
    return np.clip(x + rng.normal(0.0, 0.2, size=x.shape).astype(np.float32), 0.0, 1.0)


def _inverted(x: Images, rng: Rng) -> Images:
    return 1.0 - x


def _blur(x: Images, rng: Rng) -> Images:
    sigmas = rng.uniform(1.0, 2.0, size=len(x))
    out = np.empty_like(x)
    for i, (img, s) in enumerate(zip(x, sigmas, strict=True)):
        out[i] = ndimage.gaussian_filter(img, _spatial_sigma(img, float(s)), mode="constant")
    return out


def _elastic(x: Images, rng: Rng) -> Images:
    h, w = x.shape[1:3]
    alpha, sigma = 34.0 * h / 28.0, 4.0
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty_like(x)
    for i, img in enumerate(x):
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") * alpha
        coords = [yy + dy, xx + dx]
        if img.ndim == 2:
            out[i] = ndimage.map_coordinates(img, coords, order=1, mode="constant")
        else:
            for c in range(img.shape[2]):
                out[i, ..., c] = ndimage.map_coordinates(img[..., c], coords, order=1,
                                                         mode="constant")
    return np.clip(out, 0.0, 1.0)


def _translate(x: Images, rng: Rng) -> Images:
    h = x.shape[1]
    m = max(1, h // 5)
    offsets = rng.integers(-m, m + 1, size=(len(x), 2))
    out = np.zeros_like(x)
    for i, (dy, dx) in enumerate(offsets):
        src = x[i, max(0, -dy): h - max(0, dy), max(0, -dx): x.shape[2] - max(0, dx)]
        out[i, max(0, dy): max(0, dy) + src.shape[0], max(0, dx): max(0, dx) + src.shape[1]] = src
    return out


def _saltpepper(x: Images, rng: Rng) -> Images:
    u = rng.uniform(size=x.shape[:3])
    if x.ndim == 4:
        u = u[..., None]
    out = x.copy()
    out = np.where(u < 0.1, 0.0, out)
    out = np.where(u > 0.9, 1.0, out)
    return out.astype(np.float32)


def _contrast(x: Images, rng: Rng) -> Images:
    shape = (len(x),) + (1,) * (x.ndim - 1)
    c = rng.uniform(0.3, 0.6, size=shape).astype(np.float32)
    b = rng.uniform(-0.2, 0.2, size=shape).astype(np.float32)
    return np.clip(c * (x - 0.5) + 0.5 + b, 0.0, 1.0)


def _jpeg(x: Images, rng: Rng) -> Images:
    from PIL import Image  # a matplotlib dependency, already in the environment

    qualities = rng.integers(1, 6, size=len(x))
    out = np.empty_like(x)
    for i, (img, q) in enumerate(zip(x, qualities, strict=True)):
        u8 = np.round(img * 255.0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8, mode="L" if img.ndim == 2 else "RGB").save(
            buf, format="JPEG", quality=int(q))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf), dtype=np.float32) / 255.0
    return out


SHIFTS: dict[str, Callable[[Images, Rng], Images]] = {
    "rot": _rot,
    "noise": _noise,
    "inverted": _inverted,
    "blur": _blur,
    "elastic": _elastic,
    "translate": _translate,
    "saltpepper": _saltpepper,
    "contrast": _contrast,
    "jpeg": _jpeg,
}


def apply_shift(images01: NDArray[np.floating], name: str, seed: int) -> Images:
    """``images01`` ([N, H, W] or [N, H, W, C], values in [0, 1]) under shift ``name``,
    float32 in [0, 1], same shape; deterministic in ``seed``."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; use one of {', '.join(SHIFTS)}")
    x = np.asarray(images01, dtype=np.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {list(x.shape)}")
    out = SHIFTS[name](x, np.random.default_rng(seed))
    return np.ascontiguousarray(out, dtype=np.float32)
