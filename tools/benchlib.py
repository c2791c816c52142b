"""Helpers shared by the benchmark tools (``bench.py``, ``matrix.py``, ``peer_adam.py``):
the data sets and each corpus model's preprocessing, onnxruntime scoring on a
dynamic-batch copy of a model, the peer's loss and BatchNorm handling, and the
machine / version stamp of a run.

Heavy imports (numpy, onnx, onnxruntime, torch) are made inside the functions, so a
parent process that imports this module stays lean (its RSS is not counted in a
child's peak RSS) and the CPU product path never needs torch.

Preprocessing (``MODELS``; MANIFEST.tsv's column and ``tests/test_models.py``): each
corpus model maps images in [0, 1] (``[N, 28, 28]`` MNIST or ``[N, 32, 32, 3]``
CIFAR-10) to its input layout, float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort
    import torch
    from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parent.parent
EVAL_BATCH = 500
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


# --------------------------------------------------------------------------- models


def _f32(x: NDArray[Any]) -> NDArray[Any]:
    import numpy as np

    return np.ascontiguousarray(x, dtype=np.float32)


def prep_nchw(x01: NDArray[Any]) -> NDArray[Any]:
    """[N, H, W] -> [N, 1, H, W], values kept in [0, 1]."""
    return _f32(x01[:, None])


def prep_nchw_pm1(x01: NDArray[Any]) -> NDArray[Any]:
    """[N, H, W] -> [N, 1, H, W] in [-1, 1]: ToTensor + Normalize((0.5,), (0.5,))."""
    return _f32(((x01 - 0.5) / 0.5)[:, None])


def prep_flat(x01: NDArray[Any]) -> NDArray[Any]:
    """[N, 28, 28] as is (the Keras MLP's Flatten is in the graph)."""
    return _f32(x01)


def prep_nhwc(x01: NDArray[Any]) -> NDArray[Any]:
    """[N, H, W] -> [N, H, W, 1] (Keras channels-last)."""
    return _f32(x01[..., None])


def prep_resize32(x01: NDArray[Any]) -> NDArray[Any]:
    """28x28 -> 32x32 bilinear as torchvision Resize on a PIL image, -> [N, 1, 32, 32]."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(x01), 32, 32), np.float32)
    for i, img in enumerate(x01):
        pil = Image.fromarray(np.asarray(img, np.float32), mode="F")
        out[i] = np.asarray(pil.resize((32, 32), Image.Resampling.BILINEAR))
    return _f32(out[:, None])


def prep_cifar(x01: NDArray[Any]) -> NDArray[Any]:
    """[N, 32, 32, 3] -> per-channel (x - mean) / std, [N, 3, 32, 32]."""
    import numpy as np

    mean = np.asarray(CIFAR_MEAN, np.float32)
    std = np.asarray(CIFAR_STD, np.float32)
    return _f32(((x01 - mean) / std).transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class ModelSpec:
    """A corpus model: its data set (``mnist`` | ``cifar10``) and preprocessing."""

    dataset: str
    prep: Callable[[NDArray[Any]], NDArray[Any]]


MODELS: dict[str, ModelSpec] = {
    "mnist_pytorch25_legacy_cnn.onnx": ModelSpec("mnist", prep_nchw_pm1),
    "mnist_cntk_zoo_mnist8.onnx": ModelSpec("mnist", prep_nchw),
    "mnist_keras_tf2onnx192_mlp.onnx": ModelSpec("mnist", prep_flat),
    "mnist_keras_tf2onnx1111_cnn_concat_nhwc.onnx": ModelSpec("mnist", prep_nhwc),
    "mnist_whitematter_custom_bn.onnx": ModelSpec("mnist", prep_nchw),
    "mnist_pytorch13_lenet5_branch_logsoftmax_32x32.onnx": ModelSpec("mnist", prep_resize32),
    "mnist_pytorch18_eran_ffnn_sigmoid_6x200.onnx": ModelSpec("mnist", prep_nchw),
    "mnist_dynamo_pt211_extdata_resnet_gap/mnist_cnn.onnx": ModelSpec("mnist", prep_nchw),
    "cifar10_pytorch18_vnncomp_resnet2b.onnx": ModelSpec("cifar10", prep_cifar),
}


def load_images01(dataset: str) -> tuple[NDArray[Any], NDArray[Any]]:
    """All 10,000 test images of ``dataset`` in [0, 1] (float32; CIFAR-10 shuffled with
    seed 0, as ``tests/shared_data.py: cifar10_test``) and their labels."""
    import numpy as np

    ds = datasets_module()
    images, labels = ds.mnist_test() if dataset == "mnist" else ds.cifar10_test()
    return images.astype(np.float32) / 255.0, labels


# --------------------------------------------------------------------------- peer


def peer_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The peer's training loss for a graph whose output is ``kind`` (:func:`output_kind`):
    cross-entropy on logits, NLL on log-probabilities, NLL of log(p) on probabilities."""
    import torch
    import torch.nn.functional as F

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if kind == "softmax":
            return F.nll_loss(torch.log(out.clamp_min(1e-12)), target)
        if kind == "logsoftmax":
            return F.nll_loss(out, target)
        return F.cross_entropy(out, target)

    return loss


# --------------------------------------------------------------------------- shared

def datasets_module() -> ModuleType:
    """``tests/shared_data.py`` (the shared MNIST / CIFAR-10 readers and shifts), loaded
    from its file: the baselines must not depend on the package importing."""
    spec = importlib.util.spec_from_file_location("shared_data", ROOT / "tests" / "shared_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """In-memory copy whose batch dimension is symbolic, for graphs exported with a fixed one.

    Input/output dim 0 become ``N``, stale value_info is dropped, and a constant Reshape
    target that starts with the old fixed batch size (and has no -1) gets -1 there.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.HasField("dim_value"):
        return model
    fixed = dim0.dim_value
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in [*m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == fixed:
            dims[0].dim_param = "N"
    del m.graph.value_info[:]
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    for node in m.graph.node:
        if node.op_type != "Reshape":
            continue
        name = node.input[1]
        if name in inits:
            tensor = inits[name]
        elif name in consts and consts[name].attribute[0].name == "value":
            tensor = consts[name].attribute[0].t
        else:
            continue
        shape = numpy_helper.to_array(tensor).copy()
        if shape.size and shape[0] == fixed and not np.any(shape == -1):
            shape[0] = -1
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
    return m


def ort_session(
    model: str | Path, threads: int, extra_outputs: tuple[str, ...] = ()
) -> ort.InferenceSession:
    """onnxruntime CPU session on a dynamic-batch copy, with extra graph outputs if asked."""
    import onnx
    import onnxruntime as ort

    proto = dynamic_batch(onnx.load(str(model)))
    for name in extra_outputs:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_run(sess: ort.InferenceSession, x: NDArray[Any], output: str | None = None) -> NDArray[Any]:
    """Batched inference; returns the first graph output, or ``output``."""
    import numpy as np

    name = output or sess.get_outputs()[0].name
    feed = sess.get_inputs()[0].name
    starts = range(0, len(x), EVAL_BATCH)
    parts = [sess.run([name], {feed: x[i : i + EVAL_BATCH]})[0] for i in starts]
    return np.concatenate(parts).reshape(len(x), -1)


def ort_accuracy(model: str | Path, x: NDArray[Any], y: NDArray[Any], threads: int) -> float:
    return float((ort_run(ort_session(model, threads), x).argmax(1) == y).mean())


def output_kind(model: onnx.ModelProto) -> str:
    """What the graph outputs: "softmax", "logsoftmax" or "logits" (Identity nodes skipped)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return node.op_type.lower()
    return "logits"


def freeze_batchnorm(net: torch.nn.Module) -> None:
    import torch

    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) or (
            type(mod).__name__ == "OnnxBatchNorm"
        ):
            mod.eval()


def child_env(quiet_threads: bool = True) -> dict[str, str]:
    """The children's environment; ``quiet_threads=False`` (``--default-env``) drops the
    thread-pool settings below, as a user's default shell has them."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if not quiet_threads:
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
        return env
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    # OpenBLAS (numpy, scipy) spins for 2**28 cycles by default; with any other load on a
    # 2-core box that makes small BLAS calls 10x slower. 2**4 cycles is its PASSIVE.
    env["OPENBLAS_THREAD_TIMEOUT"] = "4"
    return env


def busy_cpu_s() -> float:
    """Seconds of CPU time spent by all processes on the machine since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info: dict[str, Any] = {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem_gb, 1),
        "os": platform.platform(),
    }
    if device == "cuda":
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                 "--format=csv,noheader"]
        try:
            info["gpu"] = subprocess.run(query, capture_output=True, text=True,
                                         check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["gpu"] = "unknown (nvidia-smi failed)"
    return info


def commit() -> str:
    """The source tree's short commit (raises when it is not a git checkout)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()


def choose(value: str | None, allowed: list[str], what: str,
           fail: Callable[[str], None]) -> list[str]:
    """The comma list ``value`` (None or empty: all of ``allowed``); an item not
    in ``allowed`` goes to ``fail`` with the choices."""
    items = [s.strip() for s in (value or "").split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        fail(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items or list(allowed)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("onnxfbp", "onnxruntime", "onnx", "torch", "onnx2torch", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    for pkg in ("onnxruntime-gpu", "cupy-cuda12x", "cupy-cuda13x"):  # listed when installed
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    try:
        sha = commit()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        out["onnxfbp"] += f" (source {sha}{'+dirty' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        out["onnxfbp"] += " (source tree, no commit)"
    return out



def import_onnx2torch() -> ModuleType:
    """``onnx2torch``, importable without a working torchvision.

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and
    RoiAlign converters, which no classifier of the corpus uses. When torchvision is
    missing, or its compiled operators do not match the installed torch (a CUDA wheel
    of torchvision beside a CPU build of torch), a stand-in module is registered whose
    ``ops`` functions raise ``NotImplementedError`` if a graph ever needs them.
    """
    import sys

    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from mismatched compiled operators
        for name in [m for m in sys.modules if m == "torchvision" or
                     m.startswith("torchvision.")]:
            del sys.modules[name]
        stub, ops = ModuleType("torchvision"), ModuleType("torchvision.ops")

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("torchvision is not installed; this graph needs it")

        for fn in ("nms", "batched_nms", "box_convert", "roi_align"):
            setattr(ops, fn, missing)
        stub.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    import onnx2torch

    return onnx2torch


def train_initializers(net: torch.nn.Module) -> list[str]:
    """Make the weights onnx2torch keeps as buffers trainable; returns their names.

    onnx2torch turns Conv / Gemm weights into parameters, but the initializers that feed
    plain MatMul / Add nodes (tf2onnx's Dense layers) become buffers of its
    ``initializers`` container, which an optimizer over ``net.parameters()`` would never
    update. Floating-point buffers there with more than one element become parameters;
    scalar constants, integer shapes and BatchNorm statistics stay buffers.
    """
    import torch

    promoted = []
    for mod_name, mod in net.named_modules():
        if mod_name.split(".")[-1] != "initializers":
            continue
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.numel() > 1:
                delattr(mod, name)
                mod.register_parameter(name, torch.nn.Parameter(buf.detach().clone()))
                promoted.append(f"{mod_name}.{name}")
    return promoted


@dataclass
class Timed:
    """A child process run to its end: exit code, wall seconds from spawn to exit, its
    CPU seconds and peak RSS, the share of all cores other processes kept busy
    meanwhile, and what it printed."""

    code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    other_load: float
    stdout: str
    stderr: str


def run_timed_process(cmd: list[str], timeout: float, env: dict[str, str],
                      capture_stdout: bool = True) -> Timed:
    """Run ``cmd`` from the project root and wait for it with ``os.wait4`` (its own
    resource usage); killed after ``timeout`` seconds."""
    import tempfile
    import threading
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0, self0 = busy_cpu_s(), sum(os.times()[:2])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out if capture_stdout else subprocess.DEVNULL,
                                stderr=err, env=env, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        foreign = busy_cpu_s() - busy0 - cpu - (sum(os.times()[:2]) - self0)
        out.seek(0)
        err.seek(0)
        return Timed(code, wall, cpu, usage.ru_maxrss / 1024,
                     max(0.0, foreign / (wall * len(os.sched_getaffinity(0)))),
                     out.read().decode(errors="replace"), err.read().decode(errors="replace"))
