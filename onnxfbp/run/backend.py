"""Array-module selection: the same code runs on NumPy (CPU) or CuPy (GPU).

CuPy is imported lazily, only when the CUDA device is asked for, so the CPU
install never needs it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["array_module", "cupy_or_none", "to_numpy"]


def cupy_or_none() -> ModuleType | None:
    """The ``cupy`` module if it imports and sees a GPU, else ``None``."""
    try:
        import cupy  # noqa: PLC0415 - optional heavy dependency, imported lazily

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # ImportError, CUDA driver errors: no usable GPU
        return None
    return None


def array_module(device: str) -> ModuleType:
    """``numpy`` for ``cpu``; ``cupy`` for ``cuda`` (error if unavailable)."""
    if device == "cpu":
        return np
    cp = cupy_or_none()
    if cp is None:
        from ..errors import OnnxfbpError  # noqa: PLC0415

        raise OnnxfbpError(
            "--device cuda needs CuPy and a CUDA GPU; install onnxfbp[gpu] or use --device cpu"
        )
    return cp


def to_numpy(a: Any) -> np.ndarray:
    """Host copy of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    return np.asarray(get() if get is not None else a)
