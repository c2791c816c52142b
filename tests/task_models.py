"""Tiny torch models of the non-classification tasks, trained on real MNIST digits
and exported to ONNX for tests/test_tasks.py (seconds each, one thread):

- ``rot``: a CNN regressing a digit's rotation angle (degrees / 45, in [-1, 1]);
- ``seg``: a fully convolutional net labelling each pixel (0: background, 1 + digit);
- ``mask``: the same net with one Sigmoid output, the digit's mask;
- ``pair``: two digit images (two graph inputs) -> their sum (19 classes);
- ``two_out``: one digit -> class logits and its angle (two graph outputs).

The shift each test refines on: Gaussian noise (sigma 0.35) and a contrast of 0.6,
which every model meets only after training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - the tests skip without torch
    torch = None  # type: ignore[assignment]


def rotated(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (N, 28, 28) each rotated by a random angle in [-45, 45]; the images
    (N, 1, 28, 28) and the angles / 45 (N, 1), float32."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-45, 45, len(x))
    out = np.stack([ndimage.rotate(img, a, reshape=False, order=1) for img, a in zip(x, angles,
                                                                                      strict=True)])
    return out[:, None].astype(np.float32), (angles / 45.0)[:, None].astype(np.float32)


def pairs(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random pairs of indices below ``n`` (the two inputs of ``pair``)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, count), rng.integers(0, n, count)


def shifted(x: np.ndarray, seed: int) -> np.ndarray:
    """The test shift: contrast 0.6 and Gaussian noise of sigma 0.35."""
    rng = np.random.default_rng(seed)
    return (0.6 * x + rng.normal(0, 0.35, x.shape)).astype(np.float32)


def dense_labels(x: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Per-pixel classes of images ``x`` (N, 1, 28, 28): 0 background, 1 + digit."""
    fg = x[:, 0] > 0.5
    return np.where(fg, digits[:, None, None] + 1, 0).astype(np.int64)


def _train(net: nn.Module, inputs: list[np.ndarray], loss_fn: object, labels: np.ndarray,
           epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xs = [torch.from_numpy(a) for a in inputs]
    yt = torch.from_numpy(labels)
    n = len(labels)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for start in range(0, n, 64):
            idx = perm[start : start + 64]
            loss = loss_fn(net(*[a[idx] for a in xs]), yt[idx])  # type: ignore[operator]
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _export(net: nn.Module, inputs: list[np.ndarray], path: Path, in_names: list[str],
            out_names: list[str]) -> Path:
    dyn = {name: {0: "batch"} for name in [*in_names, *out_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, tuple(torch.from_numpy(a[:2]) for a in inputs), str(path),
                          input_names=in_names, output_names=out_names, dynamic_axes=dyn,
                          dynamo=False)
    return path


class _Rot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _fcn(out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=4, dilation=2), nn.ReLU(),
        nn.Conv2d(8, out, 1))


class _Mask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _fcn(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                               nn.Linear(8 * 13 * 13, 32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                               nn.Linear(8 * 13 * 13, 32), nn.ReLU())
        self.head = nn.Linear(64, 19)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(a), self.b(b)], dim=1))


class _TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Rot().body
        self.cls = nn.Linear(32, 10)
        self.angle = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.cls(f), self.angle(f)


def build(kind: str, folder: Path, x: np.ndarray, digits: np.ndarray) -> Path:
    """Train model ``kind`` on clean images ``x`` (N, 28, 28) in [0, 1] with their
    ``digits`` and export it to ``folder/<kind>.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.onnx"
    mse, ce = nn.MSELoss(), nn.CrossEntropyLoss()
    if kind == "rot":
        xr, angle = rotated(x, 0)
        net = _train(_Rot(), [xr], mse, angle, 4)
        return _export(net, [xr], path, ["image"], ["angle"])
    x1 = x[:, None].astype(np.float32)
    if kind == "seg":
        net = _train(_fcn(11), [x1], ce, dense_labels(x1, digits), 2)
        return _export(net, [x1], path, ["image"], ["classes"])
    if kind == "mask":
        bce = nn.BCELoss()
        net = _train(_Mask(), [x1], bce, (x1 > 0.5).astype(np.float32), 3)
        return _export(net, [x1], path, ["image"], ["mask"])
    if kind == "pair":
        i, j = pairs(len(x1), 4 * len(x1), 0)
        a, b = x1[i], x1[j]
        total = (digits[i] + digits[j]).astype(np.int64)
        net = _train(_Pair(), [a, b], ce, total, 3)
        return _export(net, [a, b], path, ["left", "right"], ["sum"])
    if kind == "two_out":
        xr, angle = rotated(x, 0)

        def both(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
            return ce(out[0], y[:, 0].long()) + mse(out[1], y[:, 1:])

        labels = np.concatenate([digits[:, None].astype(np.float32), angle], axis=1)
        net = _train(_TwoOut(), [xr], both, labels, 4)
        return _export(net, [xr], path, ["image"], ["digit", "angle"])
    raise ValueError(kind)
