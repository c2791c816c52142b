"""GPU hand-off: onnxruntime activations straight into CuPy arrays.

With the CUDA execution provider, outputs are bound to the device with IO
binding and wrapped as CuPy arrays through DLPack (or, where an onnxruntime
build lacks it, through the raw device pointer), so the Gram products and the
Cholesky solves never see a host copy. Anything that fails falls back to a
host round trip; the results are the same. CuPy is imported only here, lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .backend import to_numpy
from .forward import ForwardRunner

__all__ = ["run_session", "run_to_device"]


def _ortvalue_to_cupy(value: Any, cp: Any) -> Any:
    for candidate in (value, getattr(value, "_ortvalue", None)):
        if candidate is not None and hasattr(candidate, "__dlpack__"):
            try:
                return cp.from_dlpack(candidate)
            except Exception:  # noqa: S112 - try the next route
                continue
    # Raw device pointer, the OrtValue kept alive as the memory's owner.
    dtype = np.dtype(value.numpy().dtype) if value.device_name() == "cpu" else _dtype(value)
    shape = tuple(value.shape())
    size = int(np.prod(shape)) * dtype.itemsize
    memory = cp.cuda.UnownedMemory(value.data_ptr(), size, value)
    return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(memory, 0))


def _dtype(value: Any) -> np.dtype[Any]:
    name = value.data_type()  # e.g. "tensor(float)"
    table = {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
    }
    return np.dtype(table[name])


def run_session(
    session: Any, feeds: Mapping[str, Any], outputs: list[str], xp: Any
) -> tuple[list[Any], bool]:
    """``session.run`` on feeds that are NumPy or CuPy arrays, returning arrays of
    ``xp`` and whether they stayed on the device.

    On the CUDA provider, CuPy feeds are bound by device pointer and outputs are
    bound on the device and wrapped as CuPy arrays (IO binding), NumPy feeds are
    copied in by onnxruntime. CuPy's stream is synchronized before the run (its
    kernels wrote the feeds) and the outputs after it. Anything that fails takes
    a host round trip; the results are the same.
    """
    if xp is not np and "CUDAExecutionProvider" in session.get_providers():
        try:
            binding = session.io_binding()
            alive = []  # the bound device buffers must outlive the run
            for name, value in feeds.items():
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                    continue
                array = xp.ascontiguousarray(value)
                alive.append(array)
                binding.bind_input(
                    name, "cuda", 0, np.dtype(array.dtype).type, tuple(array.shape),
                    array.data.ptr,
                )
            for name in outputs:
                binding.bind_output(name, "cuda", 0)
            xp.cuda.get_current_stream().synchronize()
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return [_ortvalue_to_cupy(v, xp) for v in binding.get_outputs()], True
        except Exception:  # noqa: S110 - any binding failure: take the host path below
            pass
    host = {name: np.ascontiguousarray(to_numpy(value)) for name, value in feeds.items()}
    got = session.run(outputs, host)
    return ([xp.asarray(v) for v in got] if xp is not np else list(got)), False


def run_to_device(
    runner: ForwardRunner,
    x: np.ndarray,
    outputs: list[str],
    weights: Mapping[str, np.ndarray],
    xp: Any,
) -> dict[str, Any]:
    """Like ``runner.run`` but returns arrays of ``xp`` (NumPy or CuPy)."""
    if xp is np:
        return runner.run(x, outputs, weights)
    if runner.chunk is None and "CUDAExecutionProvider" in runner.providers:
        feeds = {k: np.ascontiguousarray(v) for k, v in runner.feeds(x).items()}
        feeds.update({name: np.ascontiguousarray(value) for name, value in weights.items()})
        got, _ = run_session(runner.session, feeds, outputs, xp)
        return dict(zip(outputs, got, strict=True))
    return {name: xp.asarray(v) for name, v in runner.run(x, outputs, weights).items()}
