"""Benchmark yardstick for onnxfbp (issue 3): accuracy, time and memory against end-to-end
backprop, measured in one run on the same machine and data.

Every (scenario, method, repeat) runs in its own child process (``bench.py --worker``), so
each row gets that process's own peak RSS, read by the parent with ``os.wait4`` (rusage
``ru_maxrss``). The child loads a pre-shifted, pre-processed data file, imports what it
needs, and only then starts the clock: ``adapt s`` is the adaptation step alone (no
interpreter start, imports, data loading or evaluation); ``process s`` is the parent's
wall time of the whole child. Repeats are interleaved round-robin (repeat -> scenario ->
method) and medians are reported.

Methods
    none            the input model, evaluated with onnxruntime
    onnxfbp         ``refine(model, out, x, y)`` with defaults (seed = the repeat index);
                    out evaluated with onnxruntime
    onnxfbp-last    the same with ``max_layers=1``
    onnxfbp-jacobi  the same with ``schedule="jacobi"``: full-pass sweeps
                    (the default before the minibatch schedule)
    onnxfbp-3ep     the same with ``epochs=3``: how far more steps go (the
                    stretch target is adam-5's accuracy)
    adam-K          THE PEER: onnx2torch.convert, end-to-end Adam (lr 1e-3, batch 64,
                    seeded shuffle), cross-entropy on the logits (NLL on log-probabilities if
                    the graph ends in Softmax / LogSoftmax), K in {1, 2, 5} epochs; dropout
                    in train mode, BatchNorm kept in eval mode (running statistics frozen);
                    evaluated in torch (eval mode), no export back to ONNX. adapt s includes
                    the conversion.
    head-backprop   Adam, 1 epoch, only the last two parametric modules trainable
    logreg-last     multinomial logistic regression (L-BFGS, L2 with C chosen on a seeded 20 %
                    held-out split, then refit on all) on the input of the last Gemm/MatMul,
                    extracted with onnxruntime as an extra graph output
    adam-best20     the peer for 1..20 epochs, reporting the best epoch by EVAL accuracy: an
                    optimistic upper bound for the peer (default on the *-100 / *-500 scenarios)

Scenarios (shift seeds: 1 for the adaptation half, 2 for the evaluation half)
    mnist-rot, mnist-noise       mnist_pytorch25_legacy_cnn.onnx, MNIST test 5,000 + 5,000
    mnist-rot-100, mnist-rot-500 the first 100 / 500 adaptation images of mnist-rot
    cifar-shift                  cifar10_pytorch18_vnncomp_resnet2b.onnx (fixed batch 1; a
                                 dynamic-batch copy is made in memory for onnxruntime)

``--memory`` runs onnxfbp (or ``--methods``) on mnist-rot with 5,000 and with 50,000
adaptation samples (the 5,000 raw images rotated with seeds 1..10) and compares peak RSS,
both of the whole process and net of what was resident before the call (the caller's data).

Seeds: data shifts are fixed; the peer's shuffle, onnxfbp's split and mini-batch order and
logreg's held-out split use the repeat index. Children run with OMP_WAIT_POLICY=PASSIVE and
OPENBLAS_THREAD_TIMEOUT=4 (OpenBLAS otherwise spins and slows 10x when anything else runs
on a 2-core box); ``other load`` is the share of the cores other processes used while a
child ran.

Peak RSS caveat: on Linux a child's ``ru_maxrss`` is never below the parent's RSS at spawn
time (vfork + exec records the parent's high-water mark), so the parent stays lean: it never
imports numpy or loads data (a child prepares the data files). A child also reports its own
``VmHWM``; the two are stored side by side in ``--json``.

Usage (in a virtual environment with ``pip install -e ".[bench]"``)
    python tools/bench.py [--scenarios a,b] [--methods a,b]
        [--repeats N] [--json OUT.json] [--markdown] [--memory]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchlib import (
    CIFAR_MEAN,
    CIFAR_STD,
    EVAL_BATCH,
    child_env,
    datasets_module,
    dynamic_batch,
    freeze_batchnorm,
    import_onnx2torch,
    machine_info,
    ort_accuracy,
    ort_run,
    ort_session,
    output_kind,
    peer_loss,
    run_timed_process,
    versions,
)

if TYPE_CHECKING:
    import onnx
    import torch
    from numpy.typing import NDArray

PEER = "adam-1"
RESULT_MARK = "@@BENCH_RESULT@@ "

ADAPT_SEED, EVAL_SEED = 1, 2
LR, BATCH = 1e-3, 64
SWEEP_EPOCHS = 20
HOLDOUT_FRACTION = 0.2
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MEMORY_TILES = 10

MNIST_MODEL = "mnist_pytorch25_legacy_cnn.onnx"
CIFAR_MODEL = "cifar10_pytorch18_vnncomp_resnet2b.onnx"


@dataclass(frozen=True)
class Scenario:
    """One model + data split + shift."""

    name: str
    model: str
    dataset: str  # "mnist" | "cifar10"
    shift: str
    n_adapt: int = 5000
    n_eval: int = 5000
    sweep: bool = False  # also run adam-best20 by default
    tiles: int = 1  # adaptation set rotated with seeds ADAPT_SEED .. ADAPT_SEED + tiles - 1


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("mnist-rot", MNIST_MODEL, "mnist", "rot"),
        Scenario("mnist-noise", MNIST_MODEL, "mnist", "noise"),
        Scenario("mnist-rot-100", MNIST_MODEL, "mnist", "rot", n_adapt=100, sweep=True),
        Scenario("mnist-rot-500", MNIST_MODEL, "mnist", "rot", n_adapt=500, sweep=True),
        Scenario("cifar-shift", CIFAR_MODEL, "cifar10", "cifar"),
    )
}
MEMORY_SCENARIOS: dict[str, Scenario] = {
    "mnist-rot": SCENARIOS["mnist-rot"],
    "mnist-rot-x10": Scenario(
        "mnist-rot-x10",
        MNIST_MODEL,
        "mnist",
        "rot",
        n_adapt=5000 * MEMORY_TILES,
        tiles=MEMORY_TILES,
    ),
}
ALL_SCENARIOS = {**SCENARIOS, **MEMORY_SCENARIOS}
METHODS = (
    "none",
    "onnxfbp",
    "onnxfbp-last",
    "onnxfbp-jacobi",
    "onnxfbp-3ep",
    "adam-1",
    "adam-2",
    "adam-5",
    "head-backprop",
    "logreg-last",
    "adam-best20",
)
DEFAULT_SCENARIOS = ("mnist-rot", "mnist-noise", "mnist-rot-100", "mnist-rot-500", "cifar-shift")
PEER_EPOCHS = {"adam-1": 1, "adam-2": 2, "adam-5": 5}


# --------------------------------------------------------------------------- data


def prepare_data(names: list[str], out_dir: Path) -> None:
    """Write ``<scenario>.npz`` (x_adapt, y_adapt, x_eval, y_eval; float32 NCHW) per scenario."""
    import numpy as np

    datasets = datasets_module()
    cache: dict[tuple[str, str, int], tuple[NDArray[Any], NDArray[Any]]] = {}

    def shifted(ds: str, shift: str, tiles: int) -> tuple[NDArray[Any], NDArray[Any]]:
        key = (ds, shift, tiles)
        if key not in cache:
            images, labels = datasets.mnist_test() if ds == "mnist" else datasets.cifar10_test()
            half = len(labels) // 2
            imgs01 = images.astype(np.float32) / 255.0
            adapt = [
                datasets.shift_images(imgs01[:half], shift, ADAPT_SEED + k) for k in range(tiles)
            ]
            x_eval = datasets.shift_images(imgs01[half:], shift, EVAL_SEED)
            x_all = preprocess(np.concatenate([*adapt, x_eval]), ds)
            y_all = np.concatenate([np.tile(labels[:half], tiles), labels[half:]])
            cache[key] = (x_all, y_all)
        return cache[key]

    for name in names:
        sc = ALL_SCENARIOS[name]
        x_all, y_all = shifted(sc.dataset, sc.shift, sc.tiles)
        n_pool = len(y_all) - sc.n_eval
        np.savez(
            out_dir / f"{name}.npz",
            x_adapt=x_all[: sc.n_adapt],
            y_adapt=y_all[: sc.n_adapt],
            x_eval=x_all[n_pool:],
            y_eval=y_all[n_pool:],
        )


def preprocess(x01: NDArray[Any], dataset: str) -> NDArray[Any]:
    """Shifted images in [0, 1] -> the model's input (MANIFEST.tsv), float32 NCHW."""
    import numpy as np

    if dataset == "mnist":
        return np.ascontiguousarray(((x01 - 0.5) / 0.5)[:, None], dtype=np.float32)
    mean = np.asarray(CIFAR_MEAN, np.float32)
    std = np.asarray(CIFAR_STD, np.float32)
    return np.ascontiguousarray(((x01 - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


# --------------------------------------------------------------------------- onnxruntime


def last_linear_input(model: onnx.ModelProto) -> str:
    """Name of the tensor feeding the last Gemm / MatMul (the head's features)."""
    for node in reversed(model.graph.node):
        if node.op_type in ("Gemm", "MatMul"):
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            if trans_a:
                raise NotImplementedError(f"last Gemm {node.name!r} has transA=1")
            return node.input[0]
    raise NotImplementedError("graph has no Gemm / MatMul")


# --------------------------------------------------------------------------- methods


def rss_mb(field: str = "VmRSS") -> float:
    """This process's VmRSS / VmHWM in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_none(model: Path, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    before = rss_mb()
    acc = ort_accuracy(model, data["x_eval"], data["y_eval"], args.threads)
    return {"acc": acc, "adapt_s": 0.0, "rss_before_mb": before}


def run_onnxfbp(
    model: Path, data: dict[str, Any], args: argparse.Namespace, variant: str
) -> dict[str, Any]:
    """``refine(model, out, x, y)`` with defaults and ``seed`` = the repeat (variant
    ``last``: ``max_layers=1``; ``jacobi``: the full-pass sweeps of earlier versions;
    ``3ep``: 3 epochs);
    out scored with ORT.

    A ``GateError`` (refined model worse on refine's own held-out split, nothing written)
    means the user keeps the input model: the row gets the input model's accuracy.
    """
    try:
        from onnxfbp import RefineConfig, refine
    except ImportError as exc:
        return {"status": "unavailable", "note": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="bench-onnxfbp-") as tmp:
        out = Path(tmp) / "refined.onnx"
        settings: dict[str, Any] = {"seed": args.seed, "device": args.device}
        if variant == "last":
            settings["max_layers"] = 1
        elif variant == "jacobi":
            settings["schedule"] = "jacobi"
        elif variant == "3ep":
            settings["epochs"] = 3.0
        kwargs: dict[str, Any] = {"config": RefineConfig.of(**settings)}
        if args.device == "cuda":
            _warm_up_onnxfbp_cuda(model, data["x_adapt"][:BATCH])
        before = rss_mb()
        t0 = time.perf_counter()
        try:
            result = refine(str(model), str(out), data["x_adapt"], data["y_adapt"], **kwargs)
        except Exception as exc:
            if type(exc).__name__ != "GateError":
                raise
            adapt_s = time.perf_counter() - t0
            acc = ort_accuracy(model, data["x_eval"], data["y_eval"], args.threads)
            return {
                "acc": acc,
                "adapt_s": adapt_s,
                "rss_before_mb": before,
                "note": f"gate: input model kept ({exc})",
            }
        adapt_s = time.perf_counter() - t0
        acc = ort_accuracy(out, data["x_eval"], data["y_eval"], args.threads)
    return {
        "acc": acc,
        "adapt_s": adapt_s,
        "rss_before_mb": before,
        "note": _refine_note(result),
        "extra": _refine_extra(result),
    }


def _refine_note(result: Any) -> str:
    """Held-out accuracy before -> after and accepted layers, from a ``RefineResult``."""
    try:
        before, after = result.heldout_before.accuracy, result.heldout_after.accuracy
        accepted = sorted({lr.name for lr in result.layers if lr.accepted})
        return f"held-out {before:.4f}->{after:.4f}; updated: {', '.join(accepted) or 'none'}"
    except AttributeError:
        return ""


def _refine_extra(result: Any) -> dict[str, Any]:
    try:
        report = result.to_dict()
    except AttributeError:
        return {"result": repr(result)[:500]}
    return json.loads(json.dumps(report, default=str))


def _torch_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    import torch

    was_training = net.training
    net.eval()
    with torch.inference_mode():
        starts = range(0, len(x), EVAL_BATCH)
        pred = torch.cat([net(x[i : i + EVAL_BATCH]).argmax(1) for i in starts])
    net.train(was_training)
    if was_training:
        freeze_batchnorm(net)
    return float((pred == y).float().mean())


def _warm_up_cuda(net: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward pass, so the peer's clock does not count CUDA's start."""
    import torch

    net(x).sum().backward()
    torch.cuda.synchronize()


def _warm_up_onnxfbp_cuda(model: Path, x: NDArray[Any]) -> None:
    """CUDA context, cuDNN and cuBLAS loaded before onnxfbp's clock starts, as for the
    peer (:func:`_warm_up_cuda`): one run of the model on onnxruntime's CUDA provider,
    and a CuPy product and Cholesky factorization."""
    import cupy
    import onnx

    from onnxfbp.run.forward import inference_session

    session = inference_session(
        dynamic_batch(onnx.load(str(model))), ["CUDAExecutionProvider", "CPUExecutionProvider"],
        None,
    )
    session.run(None, {session.get_inputs()[0].name: x})
    a = cupy.ones((64, 64), cupy.float64) + 64 * cupy.eye(64)
    cupy.linalg.cholesky(a @ a.T)
    cupy.cuda.Device().synchronize()


def run_peer(
    model: Path,
    data: dict[str, Any],
    args: argparse.Namespace,
    epochs: int,
    head_only: bool = False,
    sweep: bool = False,
) -> dict[str, Any]:
    """End-to-end (or head-only) Adam fine-tuning of the onnx2torch conversion."""
    import onnx
    onnx2torch = import_onnx2torch()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    proto = onnx.load(str(model))
    kind = output_kind(proto)
    xe = torch.from_numpy(data["x_eval"]).to(device)
    ye = torch.from_numpy(data["y_eval"]).to(device)
    gen = torch.Generator().manual_seed(args.seed)

    loss_fn = peer_loss(kind)

    if device.type == "cuda":  # CUDA context and kernels loaded before the clock starts
        _warm_up_cuda(onnx2torch.convert(proto).to(device), xe[:BATCH])
    before = rss_mb()
    t0 = time.perf_counter()
    x = torch.from_numpy(data["x_adapt"]).to(device)
    y = torch.from_numpy(data["y_adapt"]).to(device)
    net = onnx2torch.convert(proto).to(device)
    convert_s = time.perf_counter() - t0
    params = list(net.parameters())
    note = ""
    if head_only:
        parametric = [
            (name, m)
            for name, m in net.named_modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        head = parametric[-2:]
        for p in params:
            p.requires_grad_(False)
        params = [p for _, m in head for p in m.parameters(recurse=False)]
        for p in params:
            p.requires_grad_(True)
        note = "trainable: " + ", ".join(name for name, _ in head)
    opt = torch.optim.Adam(params, lr=LR)
    net.train()
    freeze_batchnorm(net)
    train_s = 0.0
    curve: list[float] = []
    best = (-1.0, 0, 0.0)  # acc, epoch, seconds to reach it
    for epoch in range(1, epochs + 1):
        t1 = time.perf_counter()
        perm = torch.randperm(len(y), generator=gen).to(device)
        for i in range(0, len(y), BATCH):
            idx = perm[i : i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t1
        if sweep:
            curve.append(_torch_accuracy(net, xe, ye))
            if curve[-1] > best[0]:
                best = (curve[-1], epoch, convert_s + train_s)
    extra: dict[str, Any] = {"output_kind": kind, "convert_s": convert_s}
    if sweep:
        extra["eval_acc_per_epoch"] = curve
        return {
            "acc": best[0],
            "adapt_s": best[2],
            "rss_before_mb": before,
            "note": f"best epoch {best[1]}/{epochs} (picked on eval)",
            "extra": extra,
        }
    acc = _torch_accuracy(net, xe, ye)
    return {
        "acc": acc,
        "adapt_s": convert_s + train_s,
        "rss_before_mb": before,
        "note": note,
        "extra": extra,
    }


def _fit_logreg(
    f: NDArray[Any], y: NDArray[Any], c: float, k: int, w0: NDArray[Any] | None = None
) -> NDArray[Any]:
    """argmin mean CE(softmax(f W + b), y) + ||W||^2 / (2 C n)  (sklearn's C), via L-BFGS."""
    import numpy as np
    from scipy.optimize import minimize

    n, d = f.shape
    fb = np.hstack([f, np.ones((n, 1))])
    onehot = np.eye(k)[y]
    reg = np.ones((d + 1, 1))
    reg[-1] = 0.0  # bias not penalized
    reg /= c * n

    def obj(wflat: NDArray[Any]) -> tuple[float, NDArray[Any]]:
        w = wflat.reshape(d + 1, k)
        z = fb @ w
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -(onehot * logp).sum() / n + 0.5 * float((reg * w * w).sum())
        grad = fb.T @ ((np.exp(logp) - onehot) / n) + reg * w
        return loss, grad.ravel()

    start = np.zeros((d + 1) * k) if w0 is None else w0.ravel()
    res = minimize(obj, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x.reshape(d + 1, k)


def run_logreg(model: Path, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import onnx

    feat = last_linear_input(onnx.load(str(model)))
    y = data["y_adapt"]
    k = int(max(y.max(), data["y_eval"].max())) + 1
    before = rss_mb()
    t0 = time.perf_counter()
    sess = ort_session(model, args.threads, (feat,))
    f = ort_run(sess, data["x_adapt"], feat).astype(np.float64)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    f = (f - mu) / sd
    order = np.random.default_rng(args.seed).permutation(len(y))
    n_hold = max(1, int(round(HOLDOUT_FRACTION * len(y))))
    hold, fit = order[:n_hold], order[n_hold:]
    scores: list[tuple[float, float]] = []
    fits: dict[float, NDArray[Any]] = {}
    w = None
    for c in sorted(C_GRID):  # regularization path, each fit warm-started from the last
        w = fits[c] = _fit_logreg(f[fit], y[fit], c, k, w)
        pred = (np.hstack([f[hold], np.ones((len(hold), 1))]) @ w).argmax(1)
        scores.append((float((pred == y[hold]).mean()), c))
    best_c = max(scores, key=lambda s: s[0])[1]  # first (smallest C) among ties
    w = _fit_logreg(f, y, best_c, k, fits[best_c])
    adapt_s = time.perf_counter() - t0
    fe = (ort_run(sess, data["x_eval"], feat) - mu) / sd
    pred = (np.hstack([fe, np.ones((len(fe), 1))]) @ w).argmax(1)
    acc = float((pred == data["y_eval"]).mean())
    return {
        "acc": acc,
        "adapt_s": adapt_s,
        "rss_before_mb": before,
        "note": f"C={best_c:g} on {feat!r}",
        "extra": {"holdout_acc_by_C": {f"{c:g}": a for a, c in scores}},
    }


def worker(args: argparse.Namespace) -> int:
    """Child process: one method on one prepared scenario; prints one marked JSON line."""
    import numpy as np

    sc = ALL_SCENARIOS[args.scenario]
    model = datasets_module().models_dir() / sc.model
    with np.load(args.data) as z:
        data = {k: z[k] for k in z.files}
    method = args.worker
    row: dict[str, Any] = {
        "scenario": sc.name,
        "method": method,
        "n_adapt": len(data["y_adapt"]),
        "n_eval": len(data["y_eval"]),
        "seed": args.seed,
    }
    try:
        if method == "none":
            res = run_none(model, data, args)
        elif method in ("onnxfbp", "onnxfbp-last", "onnxfbp-jacobi", "onnxfbp-3ep"):
            res = run_onnxfbp(model, data, args, method.partition("-")[2])
        elif method in PEER_EPOCHS:
            res = run_peer(model, data, args, PEER_EPOCHS[method])
        elif method == "head-backprop":
            res = run_peer(model, data, args, 1, head_only=True)
        elif method == "adam-best20":
            res = run_peer(model, data, args, SWEEP_EPOCHS, sweep=True)
        elif method == "logreg-last":
            res = run_logreg(model, data, args)
        else:
            raise ValueError(f"unknown method {method!r}")
        row.update({"status": "ok", **res})
    except Exception as exc:  # the row records it; the run goes on
        traceback.print_exc()
        row.update({"status": "failed", "note": f"{type(exc).__name__}: {exc}"[:300]})
    row["vmhwm_mb"] = rss_mb("VmHWM")
    print(RESULT_MARK + json.dumps(row), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


@dataclass
class ChildResult:
    """What the parent sees of one child process."""

    code: int
    wall_s: float
    peak_rss_mb: float  # the child's own ru_maxrss (wait4)
    cpu_s: float  # the child's user + system time
    foreign_cpu: float  # share of all cores busy with other processes meanwhile, 0..1
    stdout: str
    stderr: str


def run_child(argv: list[str], timeout: float, quiet_threads: bool = True) -> ChildResult:
    """Run ``bench.py argv`` in a fresh interpreter and wait for it with ``os.wait4``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    t = run_timed_process(cmd, timeout, child_env(quiet_threads))
    return ChildResult(code=t.code, wall_s=t.wall_s, peak_rss_mb=t.peak_rss_mb, cpu_s=t.cpu_s,
                       foreign_cpu=t.other_load, stdout=t.stdout, stderr=t.stderr)


def run_method(
    scenario: str, method: str, data: Path, repeat: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One child for (scenario, method, repeat); its JSON row plus what the parent measured."""
    argv = ["--worker", method, "--scenario", scenario, "--data", str(data)]
    argv += ["--seed", str(repeat), "--threads", str(args.threads), "--device", args.device]
    child = run_child(argv, args.timeout, quiet_threads=not args.default_env)
    marked = [ln for ln in child.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    rows = [json.loads(ln[len(RESULT_MARK) :]) for ln in marked]
    if rows:
        row = rows[-1]
    else:
        tail = (child.stderr.strip().splitlines() or [""])[-1]
        note = f"no result (exit {child.code}): {tail}"[:300]
        row = {"scenario": scenario, "method": method, "status": "failed", "note": note}
    row.update(
        {
            "repeat": repeat,
            "process_s": child.wall_s,
            "peak_rss_mb": child.peak_rss_mb,
            "cpu_s": child.cpu_s,
            "foreign_cpu": child.foreign_cpu,
            "exit_code": child.code,
        }
    )
    if row["status"] == "failed":
        row["stderr_tail"] = child.stderr[-2000:]
    acc = f"{row['acc']:.4f}" if "acc" in row else row["status"]
    adapt = row.get("adapt_s") or 0.0
    print(
        f"  [{repeat}] {scenario:<14} {method:<13} acc={acc:<11} adapt={adapt:7.2f}s"
        f" proc={child.wall_s:6.1f}s rss={child.peak_rss_mb:6.0f}MiB"
        f" other-load={child.foreign_cpu:4.0%} {row.get('note', '')}",
        file=sys.stderr,
    )
    return row


def prepare(names: list[str], data_dir: Path, timeout: float) -> None:
    """Shift and preprocess the scenarios' data once, in a child (keeps the parent lean)."""
    print(f"preparing data: {', '.join(names)}", file=sys.stderr)
    child = run_child(["--prepare", ",".join(names), "--data-dir", str(data_dir)], timeout)
    if child.code != 0:
        sys.exit(f"bench: data preparation failed (exit {child.code}):\n{child.stderr[-3000:]}")
    print(f"  done in {child.wall_s:.1f} s", file=sys.stderr)


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Median per (scenario, method) over the ok repeats; ratios against the peer."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["scenario"], {}).setdefault(r["method"], {"runs": []})["runs"].append(r)
    for methods in out.values():
        for cell in methods.values():
            rows = cell.pop("runs")
            ok = [r for r in rows if r["status"] == "ok"]
            statuses = sorted({r["status"] for r in rows})
            cell.update(
                {
                    "status": "ok" if ok else statuses[0],
                    "repeats": len(rows),
                    "ok": len(ok),
                    "acc": median(ok, "acc"),
                    "adapt_s": median(ok, "adapt_s"),
                    "process_s": median(ok or rows, "process_s"),
                    "peak_rss_mb": median(ok or rows, "peak_rss_mb"),
                    "rss_before_mb": median(ok, "rss_before_mb"),
                    "foreign_cpu": max(r["foreign_cpu"] for r in rows),
                    "note": next((r.get("note") for r in reversed(rows) if r.get("note")), ""),
                }
            )
        peer = methods.get(PEER, {})
        for cell in methods.values():
            both = cell["acc"] is not None and peer.get("acc") is not None
            cell["acc_vs_peer"] = cell["acc"] - peer["acc"] if both else None
            t, tp = cell["adapt_s"], peer.get("adapt_s")
            cell["time_vs_peer"] = t / tp if t and tp else None
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = (
    "method",
    "eval acc",
    "adapt s",
    "process s",
    "peak RSS MiB",
    "RSS at start MiB",
    f"time / {PEER}",
    f"acc - {PEER}",
    "other load",
    "note",
)


def table_rows(methods: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row of strings per method, in COLUMNS order."""
    rows = []
    for name, c in methods.items():
        acc = _fmt(c["acc"], ".4f") if c["status"] == "ok" else c["status"]
        rows.append(
            [
                name,
                acc,
                _fmt(c["adapt_s"], ".2f"),
                _fmt(c["process_s"], ".1f"),
                _fmt(c["peak_rss_mb"], ".0f"),
                _fmt(c["rss_before_mb"], ".0f"),
                _fmt(c["time_vs_peer"], ".2f"),
                _fmt(c["acc_vs_peer"], "+.4f"),
                _fmt(c["foreign_cpu"], ".0%"),
                c["note"].replace("|", "/"),
            ]
        )
    return rows


def print_tables(summary: dict[str, dict[str, dict[str, Any]]], repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size((200, 40)).columns, 160))
    for scenario, methods in summary.items():
        sc = ALL_SCENARIOS[scenario]
        table = Table(
            title=f"{scenario}: {sc.model}, {sc.n_adapt} adapt / {sc.n_eval} eval, "
            f"shift {sc.shift}, median of {repeats}"
        )
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i in (0, len(COLUMNS) - 1) else "right")
        for row in table_rows(methods):
            table.add_row(*row)
        console.print(table)


def markdown(summary: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]) -> str:
    m, v = meta["machine"], meta["versions"]
    lines = [
        f"### Run of {meta['date']}",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB RAM ({m['os']})"
        + (f"; GPU {m['gpu']}: onnxfbp and the peers adapt on it (`--device cuda`)"
           if m.get("gpu") else ""),
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- {meta['repeats']} repeat(s), interleaved round-robin, medians. `adapt s`: the "
        "adaptation step alone (data preloaded, imports excluded); `process s`: the whole child "
        "process; peak RSS: the child's own `ru_maxrss`; `RSS at start`: its RSS after imports "
        "and data loading, just before the adaptation step; `other load`: share of all cores "
        "busy with other processes while the child ran (max over repeats; above ~10 % the "
        "times are unreliable).",
        f"- Peer `{PEER}`: onnx2torch + Adam lr {LR:g}, batch {BATCH}, BatchNorm in eval mode, "
        "evaluated in torch. `adam-best20` picks the epoch on the eval set (an upper bound).",
        "- Children's threads: "
        + ("the shell's defaults (`--default-env`)." if meta.get("default_env") else
           "`OMP_WAIT_POLICY=PASSIVE`, `OPENBLAS_THREAD_TIMEOUT=4`."),
        "",
    ]
    for scenario, methods in summary.items():
        sc = ALL_SCENARIOS[scenario]
        lines += [
            f"#### {scenario} ({sc.model}, {sc.n_adapt} adapt / {sc.n_eval} eval, "
            f"shift `{sc.shift}`)",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join([" --- "] + [" ---: "] * (len(COLUMNS) - 2) + [" --- "]) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in table_rows(methods)]
        lines.append("")
    if meta.get("memory"):
        lines += ["#### Memory (`--memory`)", "", *[f"- {ln}" for ln in meta["memory"]], ""]
    return "\n".join(lines)


def memory_report(runs: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Peak RSS at 5,000 vs 50,000 samples, whole process and net of the resident data."""
    lines = []
    for method in methods:
        small = [r for r in runs if r["method"] == method and r["scenario"] == "mnist-rot"]
        large = [r for r in runs if r["method"] == method and r["scenario"] == "mnist-rot-x10"]
        if not all(r["status"] == "ok" for r in small + large):
            lines.append(f"{method}: {(small + large)[0].get('note') or 'failed'}")
            continue
        p5, p50 = median(small, "peak_rss_mb"), median(large, "peak_rss_mb")
        b5, b50 = median(small, "rss_before_mb"), median(large, "rss_before_mb")
        assert p5 and p50 and b5 is not None and b50 is not None
        net5, net50 = p5 - b5, p50 - b50
        verdict = "OK" if net50 <= 1.2 * net5 else "ABOVE TARGET"
        lines += [
            f"{method}: peak RSS 5,000 samples {p5:.0f} MiB, 50,000 samples {p50:.0f} MiB, "
            f"ratio {p50 / p5:.2f}x (includes the caller's data: "
            f"{b5:.0f} vs {b50:.0f} MiB resident before the call)",
            f"{method}: peak minus RSS before the call {net5:.0f} MiB vs {net50:.0f} MiB, "
            f"ratio {net50 / max(net5, 1e-9):.2f}x (target <= 1.2x): {verdict}",
        ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenarios", help=f"comma list of {', '.join(SCENARIOS)} (default all)")
    p.add_argument(
        "--methods",
        help=f"comma list of {', '.join(METHODS)} (default all; "
        "onnxfbp-3ep only when named, adam-best20 only on the *-100/*-500 scenarios)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument("--markdown", action="store_true", help="print a block for BENCHMARKS.md")
    p.add_argument(
        "--memory",
        action="store_true",
        help="peak RSS of onnxfbp (or --methods) on 5,000 vs 50,000 samples",
    )
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    p.add_argument(
        "--default-env",
        action="store_true",
        help="children keep the shell's thread settings (no OMP_WAIT_POLICY=PASSIVE, "
        "OPENBLAS_THREAD_TIMEOUT=4): what a user's default shell gives",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="where onnxfbp and the peers adapt (scoring, untimed: onnxruntime on the CPU for "
        "ONNX outputs, torch on this device for the peers)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _split(value: str | None, allowed: tuple[str, ...] | dict[str, Any], what: str) -> list[str]:
    items = [s.strip() for s in (value or "").split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        sys.exit(f"bench: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    """Parent (default), ``--worker`` child or ``--prepare`` child."""
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.prepare:
        prepare_data(args.prepare.split(","), args.data_dir)
        return 0
    if args.repeats < 1:
        sys.exit("bench: --repeats must be >= 1")
    chosen_methods = _split(args.methods, METHODS, "method")
    if args.memory:
        scenarios = list(MEMORY_SCENARIOS)
        plan = {s: chosen_methods or ["onnxfbp"] for s in scenarios}
    else:
        scenarios = _split(args.scenarios, SCENARIOS, "scenario") or list(DEFAULT_SCENARIOS)
        plan = {
            s: chosen_methods or [m for m in METHODS if m != "onnxfbp-3ep"
                                  and (m != "adam-best20" or SCENARIOS[s].sweep)]
            for s in scenarios
        }
    meta = {
        "command": shlex.join(["python", "tools/bench.py", *sys.argv[1:]]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "versions": versions(),
        "repeats": args.repeats,
        "default_env": args.default_env,
    }
    data_dir = Path(tempfile.mkdtemp(prefix="onnxfbp-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        prepare(scenarios, data_dir, args.timeout)
        for repeat in range(args.repeats):
            for s in scenarios:
                for method in plan[s]:
                    runs.append(run_method(s, method, data_dir / f"{s}.npz", repeat, args))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta["parent_peak_rss_mb"] = parent_mb
    if any(r["peak_rss_mb"] <= 1.05 * parent_mb for r in runs):
        print(
            f"warning: some children's peak RSS is within 5 % of the parent's ({parent_mb:.0f} "
            "MiB) and may be the parent's, not theirs",
            file=sys.stderr,
        )
    busy = max(r["foreign_cpu"] for r in runs)
    meta["max_other_load"] = busy
    if busy > 0.1:
        print(
            f"warning: other processes kept up to {busy:.0%} of the cores busy during a "
            "measurement; times are unreliable (see the 'other load' column)",
            file=sys.stderr,
        )
    summary = summarize(runs)
    print_tables(summary, args.repeats)
    if args.memory:
        meta["memory"] = memory_report(runs, plan[scenarios[0]])
        print("\n".join(meta["memory"]))
    if args.markdown:
        print(markdown(summary, meta))
    if args.json:
        args.json.write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=1))
    failed = [f"{r['scenario']}/{r['method']}" for r in runs if r["status"] == "failed"]
    if failed:
        print(f"bench: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
