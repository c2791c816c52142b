"""Data of the model corpus (``tools/corpus.py``): samples of every task, drawn from the
shared MNIST test set, with a named shift from ``tools/shifts.py``.

Split of the 10,000 MNIST test images (fixed, by index):

- ``train``  images 0-5999: the corpus models are trained on these (clean, upright,
             except the angle models, which see digits rotated by U[-45, 45] degrees);
- ``adapt``  images 6000-7999: never trained on, the labelled data a refine adapts on;
- ``eval``   images 8000-9999: never trained on, held-out evaluation.

Samples per task (images x = pixel / 255, float32, NCHW):

- classification (``se_cnn``, ``vit_tiny``, ``fcn_cls``, ``effnet_tiny``): ``input``
  [N, 1, 28, 28], ``y`` int64 [N] (digit class).
- ``rot_regress``: the digit rotated by a ~ U[-45, 45] degrees; ``y`` float32 [N, 1] = a / 45.
- ``two_output``: as ``rot_regress``; ``y_class`` int64 [N] and ``y_angle`` float32 [N, 1].
- ``bbox_regress``: the digit pasted at a uniform offset (0..28, 0..28) on a black 56x56
  canvas; ``y`` float32 [N, 4] = (x0, y0, x1, y1) / 56 of the pixels > 0.5 (x1, y1 exclusive).
- ``seg_fcn``: the same canvas; ``y`` int64 [N, 56, 56]: 0 background (pixel <= 0.1),
  digit + 1 where pixel > 0.5, 255 (ignore) on the antialiased rim in between.
- ``mask_sigmoid``: the same canvas; ``y`` float32 [N, 1, 56, 56] = 1 where pixel > 0.5.
- ``two_input_sum``: ``a`` and ``b`` [N, 1, 28, 28] (image i and image perm(i) of the
  part), ``y`` int64 [N] = label(a) + label(b) in 0..18 (the ``train`` part also has
  ``y_a`` and ``y_b``, the two digits' labels, for the auxiliary heads of training).

Shifts: the geometric ones (``rot``, ``elastic``, ``translate``) move the digit before it
is pasted, so labels follow it; the others (noise, blur, contrast, ...) change pixel values
of the final image only, labels are those of the clean image. The angle tasks refuse
geometric shifts (the angle is their label).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

_TOOLS = Path(__file__).resolve().parent
for _p in (_TOOLS, _TOOLS.parent / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from shared_data import mnist_test  # noqa: E402
from shifts import SHIFTS, apply_shift  # noqa: E402

SPLITS = {"train": (0, 6000), "adapt": (6000, 8000), "eval": (8000, 10000)}
CANVAS = 56
GEOMETRIC = ("rot", "elastic", "translate")
CLASSIFY = ("se_cnn", "vit_tiny", "fcn_cls", "effnet_tiny")
TASKS = (*CLASSIFY, "rot_regress", "bbox_regress", "seg_fcn", "mask_sigmoid",
         "two_input_sum", "two_output")
ANGLE_TASKS = ("rot_regress", "two_output")
CANVAS_TASKS = ("bbox_regress", "seg_fcn", "mask_sigmoid")

Arrays = dict[str, NDArray[Any]]


@cache
def _mnist01() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    images, labels = mnist_test()
    return images.astype(np.float32) / 255.0, labels


def digits(part: str, n: int | None = None) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The first ``n`` images [n, 28, 28] in [0, 1] and labels of a split part."""
    if part not in SPLITS:
        raise ValueError(f"unknown part {part!r}; use one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[part]
    if n is not None:
        if n > hi - lo:
            raise ValueError(f"part {part!r} has {hi - lo} images, asked for {n}")
        hi = lo + n
    x, y = _mnist01()
    return x[lo:hi], y[lo:hi]


def rotate(x: NDArray[np.float32], angles: NDArray[np.floating]) -> NDArray[np.float32]:
    """Each image rotated by its angle (degrees), bilinear, zero fill, clipped to [0, 1]."""
    out = np.empty_like(x)
    for i, (img, a) in enumerate(zip(x, angles, strict=True)):
        out[i] = ndimage.rotate(img, float(a), reshape=False, order=1, mode="constant")
    return np.clip(out, 0.0, 1.0)


def paste(x: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    """Each 28x28 digit at a uniform offset on a black 56x56 canvas."""
    out = np.zeros((len(x), CANVAS, CANVAS), np.float32)
    off = rng.integers(0, CANVAS - 28 + 1, size=(len(x), 2))
    for i, (oy, ox) in enumerate(off):
        out[i, oy:oy + 28, ox:ox + 28] = x[i]
    return out


def boxes(canvas: NDArray[np.float32]) -> NDArray[np.float32]:
    """(x0, y0, x1, y1) / 56 of the pixels > 0.5 of each canvas (x1, y1 exclusive)."""
    out = np.zeros((len(canvas), 4), np.float32)
    for i, c in enumerate(canvas):
        ys, xs = np.nonzero(c > 0.5)
        if len(ys):
            out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out / CANVAS


def _appearance(x: NDArray[np.float32], shift: str, seed: int) -> NDArray[np.float32]:
    return x if shift in ("none", *GEOMETRIC) else apply_shift(x, shift, seed)


def _geometric(x: NDArray[np.float32], shift: str, seed: int) -> NDArray[np.float32]:
    return apply_shift(x, shift, seed) if shift in GEOMETRIC else x


def _nchw(x: NDArray[np.float32]) -> NDArray[np.float32]:
    return np.ascontiguousarray(x[:, None], dtype=np.float32)


def sample(task: str, part: str, n: int | None = None, shift: str = "none",
           seed: int = 0) -> Arrays:
    """``n`` samples of ``task`` from ``part`` under ``shift`` (module docstring); the
    same arguments give the same arrays."""
    if task not in TASKS:
        raise ValueError(f"unknown corpus model {task!r}; use one of {', '.join(TASKS)}")
    if shift != "none" and shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; use none or one of {', '.join(SHIFTS)}")
    if task in ANGLE_TASKS and shift in GEOMETRIC:
        raise ValueError(f"{task} regresses the rotation angle; a geometric shift ({shift}) "
                         "would change its labels: use noise, blur, contrast, ...")
    x, y = digits(part, n)
    rng = np.random.default_rng([seed, 7])
    if task in CLASSIFY:
        return {"input": _nchw(_appearance(_geometric(x, shift, seed), shift, seed)), "y": y}
    if task in ANGLE_TASKS:
        angles = rng.uniform(-45.0, 45.0, size=len(x)).astype(np.float32)
        xr = _nchw(_appearance(rotate(x, angles), shift, seed))
        if task == "rot_regress":
            return {"input": xr, "y": angles[:, None] / 45.0}
        return {"input": xr, "y_class": y, "y_angle": angles[:, None] / 45.0}
    if task == "two_input_sum":
        perm = rng.permutation(len(x))
        a = _appearance(_geometric(x, shift, seed), shift, seed)
        b = _appearance(_geometric(x[perm], shift, seed + 1), shift, seed + 1)
        out = {"a": _nchw(a), "b": _nchw(b), "y": y + y[perm]}
        if part == "train":  # the digits' own labels, for the trunks' auxiliary heads
            out.update({"y_a": y, "y_b": y[perm]})
        return out
    canvas = paste(_geometric(x, shift, seed), rng)
    shown = _nchw(_appearance(canvas, shift, seed))
    if task == "bbox_regress":
        return {"input": shown, "y": boxes(canvas)}
    if task == "mask_sigmoid":
        return {"input": shown, "y": _nchw((canvas > 0.5).astype(np.float32))}
    labels = np.zeros(canvas.shape, np.int64)
    labels[canvas > 0.1] = 255
    digit = np.broadcast_to(y[:, None, None] + 1, canvas.shape)
    labels[canvas > 0.5] = digit[canvas > 0.5]
    return {"input": shown, "y": labels}
