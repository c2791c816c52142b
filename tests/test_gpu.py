"""GPU path: the same code with CuPy arrays and the CUDA execution provider.

The equality tests run only where CuPy sees a GPU and onnxruntime has the CUDA
provider (``bash tools/gpu_check.sh``); the error test runs only where they do not.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxfbp import ModelState, RefineConfig, load_data
from onnxfbp.fit.solve import NormalEquations, Preconditioner, PreconditionerSums, ridge_solve
from onnxfbp.fit.targets import label_target
from onnxfbp.refine import run_refine
from onnxfbp.reverse.arrays import reverse
from onnxfbp.reverse.select import compile_reverse
from onnxfbp.rules import RULES, NodeView
from onnxfbp.run.backend import cupy_or_none, to_numpy

MODELS = Path(__file__).resolve().parent.parent / "models"
HAS_GPU = cupy_or_none() is not None and "CUDAExecutionProvider" in ort.get_available_providers()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy with a CUDA GPU and onnxruntime-gpu")


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_cuda_request_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxfbp.cli",
            "refine",
            str(MODELS / "demo_mnist_cnn.onnx"),
            str(tmp_path / "o.onnx"),
            "--data",
            str(MODELS / "demo_adapt.npz"),
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert "--device cuda" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@needs_gpu
def test_cupy_solver_matches_numpy() -> None:
    cp = cupy_or_none()
    assert cp is not None
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 400, 30)), rng.standard_normal((2, 400, 5))
    w0 = rng.standard_normal((2, 30, 5))
    cpu, gpu = NormalEquations(2, 30, 5), NormalEquations(2, 30, 5, cp)
    cpu.add(x, t)
    gpu.add(cp.asarray(x), cp.asarray(t))
    np.testing.assert_allclose(cp.asnumpy(gpu.gram), cpu.gram, rtol=1e-5)
    w_cpu = ridge_solve(cpu.gram, cpu.cross, w0, 0.3)
    w_gpu = ridge_solve(gpu.gram, gpu.cross, cp.asarray(w0), 0.3)
    np.testing.assert_allclose(cp.asnumpy(w_gpu), w_cpu, rtol=1e-6, atol=1e-8)


@needs_gpu
def test_refine_on_gpu_matches_cpu() -> None:
    data = load_data(MODELS / "demo_adapt.npz", "input")
    results = {}
    for device in ("cpu", "cuda"):
        config = RefineConfig.of(device=device, schedule="jacobi", sweeps=1)
        refiner = ModelState(MODELS / "demo_mnist_cnn.onnx", config)
        assert (refiner.xp is np) == (device == "cpu")
        result = run_refine(refiner, data)
        results[device] = (result.heldout_after.accuracy, refiner.values)
    acc_cpu, w_cpu = results["cpu"]
    acc_gpu, w_gpu = results["cuda"]
    assert abs(acc_cpu - acc_gpu) <= 0.005
    for name, value in w_cpu.items():  # float32 sums in another order: not bit-equal
        error = np.linalg.norm(w_gpu[name] - value) / np.linalg.norm(value)
        assert error <= 2e-3, (name, error)


@needs_gpu
def test_cupy_output_layer_path_matches_numpy() -> None:
    """The output layer's logistic-regression path iterates on the GPU with CuPy
    (features copied once) and yields the NumPy path's weights."""
    from onnxfbp.fit.head import logistic_path as _logistic_path

    cp = cupy_or_none()
    assert cp is not None
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((500, 20)), np.ones((500, 1))], 1).astype(np.float32)
    y = rng.integers(0, 4, 500)
    w0 = rng.standard_normal((21, 4)) * 0.1
    grid = (1.0, 0.1, 0.01)
    want = list(_logistic_path(x, y, w0, 0.0, grid, 100))
    got = list(_logistic_path(x, y, w0, 0.0, grid, 100, cp))
    assert [lam for lam, _ in got] == [lam for lam, _ in want] == [1.0, 0.1, 0.01]
    for (_, w_gpu), (_, w_cpu) in zip(got, want, strict=True):
        assert isinstance(w_gpu, np.ndarray)
        np.testing.assert_allclose(w_gpu, w_cpu, rtol=1e-3, atol=1e-4)


@needs_gpu
def test_cupy_preconditioner_and_vjps_match_numpy() -> None:
    """The minibatch schedule's pieces on CuPy: both preconditioner forms, and the
    Conv / MaxPool / Relu linearized reverse steps."""
    cp = cupy_or_none()
    assert cp is not None
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((1, 60, 40)).astype(np.float32)
    cross = rng.standard_normal((1, 40, 4))
    for dual in (False, True):
        cpu, gpu = PreconditionerSums(dual), PreconditionerSums(dual, cp)
        cpu.add(rows)
        gpu.add(cp.asarray(rows))
        want = Preconditioner.from_sums(cpu, 0.7).apply(cross)
        got = Preconditioner.from_sums(gpu, 0.7).apply(cp.asarray(cross))
        np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-4, atol=1e-6)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    conv = NodeView("Conv", "c", {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]},
                    {1: rng.standard_normal((5, 4, 3, 3)).astype(np.float32)})
    pool = NodeView("MaxPool", "p", {"kernel_shape": [2, 2], "strides": [2, 2]})
    relu = NodeView("Relu", "r")
    for op, view in (("Conv", conv), ("MaxPool", pool), ("Relu", relu)):
        rule = RULES[op]
        o0 = rule.forward(view, [x])
        r = rng.standard_normal(o0.shape).astype(np.float32)
        want = rule.vjp(view, r, [x], o0)[0]
        got = rule.vjp(view, cp.asarray(r), [cp.asarray(x)], cp.asarray(o0))[0]
        np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-4, atol=1e-5)


@needs_gpu
def test_compiled_reverse_on_gpu_reads_and_writes_device_arrays() -> None:
    """The compiled reverse pass on the CUDA provider: CuPy arrays in and out (IO
    binding, no host copy) and the residuals of the CuPy array pass on the same
    forward tensors. The GPU's forward tensors match the CPU's to float32 rounding
    (no TF32), so the logits residual matches the CPU's.

    Noise on the digits breaks the exact ties that a constant background gives
    (equal convolution outputs in one pooling window): among tied maxima CUDA's
    MaxPool does not pick the first, as the CPU's and the array pass do (seen on
    an H100: 20 of 200,704 residuals routed to another tied position).
    """
    cp = cupy_or_none()
    assert cp is not None
    data = load_data(MODELS / "demo_adapt.npz", "input")
    x, y = data.take(np.arange(64))
    x = x + np.random.default_rng(0).normal(0.0, 0.05, x.shape).astype(x.dtype)
    logits = {}
    for device in ("cpu", "cuda"):
        refiner = ModelState(MODELS / "demo_mnist_cnn.onnx", RefineConfig.of(device=device))
        probe = compile_reverse(refiner, x)
        acts, path, built = probe.acts, probe.path, probe.graph
        xp = refiner.xp
        z = acts[refiner.plan.logits]
        t_logits = label_target(z.reshape(len(y), -1), xp.asarray(y), 1.0).reshape(z.shape)
        array_pass, _ = reverse(refiner.plan, acts, t_logits, path, probe.views, 1.0,
                                linearized=True)
        residuals = built.run(acts, (t_logits - z).astype(z.dtype), probe.views)
        if device == "cuda":
            assert built.on_device
            assert all(isinstance(r, cp.ndarray) for r in residuals.values())
        for name in built.outputs:
            want = to_numpy(array_pass[name])
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(to_numpy(residuals[name]), want, rtol=0, atol=1e-4 * scale)
        logits[device] = to_numpy(residuals[refiner.plan.logits])
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], rtol=0, atol=1e-4)


@needs_gpu
def test_minibatch_schedule_on_gpu_runs_compiled() -> None:
    """The default schedule on the GPU: compiled reverse pass on device arrays, and
    a held-out gain like the CPU's (the two runs differ in float rounding only)."""
    data = load_data(MODELS / "demo_adapt.npz", "input")
    results = {}
    for device in ("cpu", "cuda"):
        refiner = ModelState(MODELS / "demo_mnist_cnn.onnx", RefineConfig.of(device=device))
        result = run_refine(refiner, data)
        results[device] = (result, refiner.reverse_pass)
    cpu, cpu_pass = results["cpu"]
    gpu, gpu_pass = results["cuda"]
    assert cpu_pass == "onnxruntime"
    assert gpu_pass == "onnxruntime (CUDA, CuPy in and out)"
    assert gpu.heldout_after.accuracy > gpu.heldout_before.accuracy + 0.05
    assert abs(gpu.heldout_after.accuracy - cpu.heldout_after.accuracy) <= 0.02


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="needs the CPU build"
)
def test_cuda_provider_that_does_not_start_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """onnxruntime lists the CUDA provider but cannot start it (the wheel without its
    CUDA libraries; here: the CPU build made to list it). ``cuda`` says so in one line,
    ``auto`` runs on the CPU; neither gets a CPU session in CUDA's clothes."""
    from onnxfbp.errors import OnnxfbpError
    from onnxfbp.run import forward

    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(forward, "available_providers", lambda: listed)
    forward.cuda_starts.cache_clear()
    try:
        with warnings.catch_warnings():  # the CPU build warns that it lacks CUDA
            warnings.simplefilter("ignore")
            assert forward.cuda_starts() is False
        with pytest.raises(OnnxfbpError, match="CUDA provider is installed but does not start"):
            forward.choose_providers("cuda")
        assert forward.choose_providers("auto") == ["CPUExecutionProvider"]
    finally:
        forward.cuda_starts.cache_clear()
