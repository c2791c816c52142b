"""Build the model corpus of today's architectures and tasks (issues #19 and #21), or
write the labelled data of one corpus model.

    python tools/corpus.py [--only NAME ...] [--out models/corpus] [--no-dynamo]
    python tools/corpus.py paddle --python PADDLE_ENV/bin/python
    python tools/corpus.py data NAME --n N [--part adapt|eval|train] [--shift S]
                                     [--seed K] --out FILE.npz

Building a model trains it on MNIST test images 0-5999 (``tools/corpus_data.py`` has
the split and each task's samples), exports it with the legacy TorchScript exporter
(``dynamo=False``, opset 17: ``NAME.onnx``) and the dynamo exporter (``NAME.dynamo.onnx``;
a failure is recorded in the MANIFEST, not fatal), checks every file against torch
in onnxruntime, and writes ``NAME.const.onnx``, the legacy file with every initializer
turned into a ``Constant`` node (paddle2onnx's layout: no initializers at all;
``constant_rewrite``). The metric of each file is measured on the held-out images
8000-9999, clean and under the model's documented shift (seed 2), and every row of
``MANIFEST.tsv`` is rewritten. Seeds are fixed and torch runs deterministic kernels on
one thread (a rebuild on the same machine and versions should give the same weights;
not checked byte for byte).

The ``data`` form writes an npz: inputs under the graph input names, labels under
``y`` (``y_class`` and ``y_angle`` for ``two_output``), shaped as documented in
``tools/corpus_data.py``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import corpus_nets as nets  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from corpus_data import SPLITS, TASKS, sample  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "corpus"
OPSET = 17
BATCH = 64
LR = 2e-3
EVAL_SEED = 2
MANIFEST = "MANIFEST.tsv"
COLUMNS = ("file", "name", "architecture", "exporter", "opset", "nodes", "initializers",
           "task", "inputs", "outputs", "labels", "preprocessing", "training_data",
           "clean_metric", "shift", "shifted_metric", "notes")
PREP = "x = pixel / 255 in [0, 1], NCHW float32, no normalization"
TRAIN_DATA = "MNIST test images 0-5999 (held out: 6000-7999 adapt, 8000-9999 eval)"

Arrays = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class Spec:
    """One corpus model: its net, task, graph names, labels, shift and training length."""

    net: Callable[[], torch.nn.Module]
    architecture: str
    task: str  # classify | regress | segment | mask | multi
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    labels: str
    shift: str
    epochs: int


SPECS: dict[str, Spec] = {
    "se_cnn": Spec(nets.SeCNN, "MobileNetV3-small-like: depthwise-separable inverted "
                   "residuals, squeeze-excitation (HardSigmoid gate), HardSwish, Gemm head",
                   "classify", ("input",), ("logits",), "y int64 [N]", "rot", 12),
    "vit_tiny": Spec(nets.VitTiny, "ViT: 7x7 patch Conv, class token, 2 blocks of 4-head "
                     "attention (MatMul, Softmax), LayerNorm, GELU (Erf), Linear head",
                     "classify", ("input",), ("logits",), "y int64 [N]", "rot", 16),
    "fcn_cls": Spec(nets.FcnCls, "encoder-decoder: strided Convs, ConvTranspose, Concat "
                    "skip, Resize (bilinear), strided Convs, GAP, Linear classifier",
                    "classify", ("input",), ("logits",), "y int64 [N]", "rot", 8),
    "effnet_tiny": Spec(nets.EffNetTiny, "EfficientNet-like: MBConv with SE (SiLU, "
                        "Sigmoid gate), SiLU, residual Add, Linear head",
                        "classify", ("input",), ("logits",), "y int64 [N]", "rot", 8),
    "rot_regress": Spec(nets.RotRegress, "CNN regressor of the rotation angle (Conv, "
                        "MaxPool, Gemm)", "regress", ("input",), ("angle",),
                        "y float32 [N, 1] = degrees / 45", "noise", 8),
    "bbox_regress": Spec(nets.BoxRegress, "CNN regressor of a digit's box on a 56x56 "
                         "canvas (strided Convs, Gemm)", "regress", ("input",), ("box",),
                         "y float32 [N, 4] = (x0, y0, x1, y1) / 56", "contrast", 8),
    "seg_fcn": Spec(nets.SegFcn, "U-Net-like segmenter: strided Convs, image-level "
                    "context (GAP, Conv, broadcast Add), ConvTranspose, Resize (bilinear), "
                    "skip Concats, 1x1 Conv to 11 classes",
                    "segment", ("input",), ("logits",),
                    "y int64 [N, 56, 56]: 0 background, digit + 1, 255 ignore", "rot", 8),
    "mask_sigmoid": Spec(nets.MaskNet, "dense binary mask: strided Conv encoder, Resize "
                         "(nearest) decoder, skip Concat, Sigmoid output", "mask",
                         ("input",), ("mask",), "y float32 [N, 1, 56, 56] in {0, 1}",
                         "noise", 4),
    "two_input_sum": Spec(nets.TwoInputSum, "two CNN trunks with 10-way Gemm heads (one "
                          "per input), Concat, Gemm MLP: 19 classes = sum of the two digits",
                          "classify", ("a", "b"), ("logits",), "y int64 [N] in 0..18", "rot",
                          8),
    "two_output": Spec(nets.TwoOutput, "CNN trunk, two Gemm heads: class logits and "
                       "rotation angle", "multi", ("input",), ("logits", "angle"),
                       "y_class int64 [N]; y_angle float32 [N, 1] = degrees / 45",
                       "noise", 8),
}
assert tuple(SPECS) == TASKS


# ------------------------------------------------------------------------ training


def seed_everything(seed: int) -> None:
    """Seed torch and numpy, deterministic kernels, one thread."""
    np.random.seed(seed)  # noqa: NPY002 - the legacy global RNG, should anything use it
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def label_keys(name: str) -> tuple[str, ...]:
    return ("y_class", "y_angle") if name == "two_output" else ("y",)


def loss_of(spec: Spec, out: Any, lab: list[torch.Tensor]) -> torch.Tensor:
    """The training loss of a task (cross-entropy, MSE, BCE; both heads summed)."""
    if spec.task == "classify":
        return F.cross_entropy(out, lab[0])
    if spec.task == "regress":
        return F.mse_loss(out, lab[0])
    if spec.task == "segment":
        weight = torch.tensor([0.2] + [1.0] * 10)  # background is ~95 % of the pixels
        return F.cross_entropy(out, lab[0], weight=weight, ignore_index=255)
    if spec.task == "mask":
        return F.binary_cross_entropy(out, lab[0])
    return F.cross_entropy(out[0], lab[0]) + F.mse_loss(out[1], lab[1])


def train(name: str) -> torch.nn.Module:
    """Train corpus model ``name`` with Adam; epoch e draws its samples with seed e
    (new angles / positions / pairs each epoch for the tasks that draw any)."""
    spec = SPECS[name]
    seed_everything(0)
    net = spec.net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.epochs)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for epoch in range(spec.epochs):
        data = sample(name, "train", seed=100 + epoch)
        xs = [torch.from_numpy(data[k]) for k in spec.inputs]
        ys = [torch.from_numpy(data[k]) for k in label_keys(name)]
        aux = [torch.from_numpy(data[k]) for k in ("y_a", "y_b") if k in data]
        order = torch.randperm(len(xs[0]), generator=gen)
        total = 0.0
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            opt.zero_grad()
            batch = [x[idx] for x in xs]
            if aux:  # two_input_sum: supervise the per-digit heads too
                out, la, lb = net.parts(*batch)  # type: ignore[operator]
                loss = (loss_of(spec, out, [ys[0][idx]]) + F.cross_entropy(la, aux[0][idx])
                        + F.cross_entropy(lb, aux[1][idx]))
            else:
                loss = loss_of(spec, net(*batch), [y[idx] for y in ys])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        print(f"  {name} epoch {epoch + 1}/{spec.epochs}: loss {total / len(order):.4f}",
              flush=True)
    net.eval()
    return net


# ------------------------------------------------------------------------- export


def export_legacy(net: torch.nn.Module, spec: Spec, example: tuple[torch.Tensor, ...],
                  path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch axis on every input and output."""
    axes = {n: {0: "batch"} for n in (*spec.inputs, *spec.outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_axes=axes, do_constant_folding=True)


def export_dynamo(net: torch.nn.Module, spec: Spec, example: tuple[torch.Tensor, ...],
                  path: Path) -> None:
    """Dynamo exporter (its default opset), dynamic batch, weights inside the file."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {n: {0: batch} for n in net.forward.__code__.co_varnames[1:len(spec.inputs) + 1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, example, dynamo=True, input_names=list(spec.inputs),
                                    output_names=list(spec.outputs), dynamic_shapes=shapes,
                                    verbose=False)
    assert program is not None
    program.save(str(path), external_data=False)


def constant_rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer of the main graph turned into a
    ``Constant`` node (placed first, output named as the initializer), no initializers
    left and none listed among the graph inputs: the layout paddle2onnx writes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {t.name for t in g.initializer}
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in g.initializer]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    keep = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep)
    onnx.checker.check_model(out)
    return out


# -------------------------------------------------------------------- measurement


def run_onnx(path: Path, data: Arrays, inputs: tuple[str, ...]) -> list[NDArray[Any]]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs: list[list[NDArray[Any]]] = []
    n = len(data[inputs[0]])
    for s in range(0, n, 500):
        outs.append(sess.run(None, {k: data[k][s:s + 500] for k in inputs}))
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _miou(pred: NDArray[Any], y: NDArray[Any], classes: int) -> float:
    valid = y != 255
    ious = []
    for c in range(classes):
        p, t = (pred == c) & valid, (y == c) & valid
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return float(np.mean(ious))


def metrics(spec: Spec, outs: list[NDArray[Any]], data: Arrays) -> dict[str, float]:
    """The task's metrics: accuracy; MAE and RMSE; pixel accuracy and mean IoU."""
    if spec.task == "classify":
        return {"accuracy": float((outs[0].argmax(1) == data["y"]).mean())}
    if spec.task == "regress":
        err = outs[0] - data["y"]
        return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean()))}
    if spec.task == "segment":
        pred, y = outs[0].argmax(1), data["y"]
        return {"pixel_accuracy": float((pred == y)[y != 255].mean()),
                "mean_iou": _miou(pred, y, 11)}
    if spec.task == "mask":
        pred, y = (outs[0] > 0.5).astype(np.int64), data["y"].astype(np.int64)
        return {"pixel_accuracy": float((pred == y).mean()), "mean_iou": _miou(pred, y, 2)}
    return {"accuracy": float((outs[0].argmax(1) == data["y_class"]).mean()),
            "angle_mae": float(np.abs(outs[1] - data["y_angle"]).mean())}


def fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


def check_against_torch(path: Path, net: torch.nn.Module, spec: Spec, data: Arrays) -> float:
    """Largest |onnxruntime - torch| over the outputs of 64 samples (must be < 1e-3)."""
    small = {k: v[:64] for k, v in data.items()}
    with torch.no_grad():
        ref = net(*[torch.from_numpy(small[k]) for k in spec.inputs])
    refs = ref if isinstance(ref, tuple) else (ref,)
    got = run_onnx(path, small, spec.inputs)
    diff = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, refs, strict=True))
    if not diff < 1e-3:
        raise SystemExit(f"corpus: error: {path.name} differs from torch by {diff:.3g}")
    return diff


def describe(path: Path) -> dict[str, str]:
    m = onnx.load(str(path))
    ops = sorted({n.op_type for n in m.graph.node})
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))

    def shape(v: onnx.ValueInfoProto) -> str:
        dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
        return f"{v.name}[{','.join(dims)}]"

    inits = {t.name for t in m.graph.initializer}
    return {"opset": str(opset), "nodes": str(len(m.graph.node)),
            "initializers": str(len(inits)), "ops": ",".join(ops),
            "inputs": " ".join(shape(v) for v in m.graph.input if v.name not in inits),
            "outputs": " ".join(shape(v) for v in m.graph.output)}


# --------------------------------------------------------------------------- build


def build(name: str, out: Path, dynamo: bool) -> list[dict[str, str]]:
    """Train, export, check and measure corpus model ``name``; its MANIFEST rows."""
    spec = SPECS[name]
    t0 = time.perf_counter()
    net = train(name)
    train_s = time.perf_counter() - t0
    clean = sample(name, "eval")
    shifted = sample(name, "eval", shift=spec.shift, seed=EVAL_SEED)
    example = tuple(torch.from_numpy(clean[k][:2]) for k in spec.inputs)
    files: list[tuple[Path, str, str]] = []
    legacy = out / f"{name}.onnx"
    export_legacy(net, spec, example, legacy)
    files.append((legacy, "torch legacy (TorchScript, dynamo=False)", ""))
    const = out / f"{name}.const.onnx"
    onnx.save(constant_rewrite(onnx.load(str(legacy))), str(const))
    files.append((const, "torch legacy + constant-node rewrite (tools/corpus.py "
                  "constant_rewrite: no initializers, paddle2onnx layout)", ""))
    if dynamo:
        path = out / f"{name}.dynamo.onnx"
        try:
            export_dynamo(net, spec, example, path)
            files.append((path, "torch dynamo (dynamo=True)", ""))
        except Exception as exc:  # noqa: BLE001 - recorded in the MANIFEST
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"  {name}: the dynamo export failed: {why}", flush=True)
            path.unlink(missing_ok=True)
            files.append((path, "torch dynamo (dynamo=True)", f"EXPORT FAILED: {why}"))
    rows = []
    for path, exporter, failure in files:
        row = {"file": path.name, "name": name, "architecture": spec.architecture,
               "exporter": exporter, "task": spec.task, "labels": spec.labels,
               "preprocessing": PREP, "training_data": TRAIN_DATA, "shift": spec.shift,
               "notes": failure}
        if not failure:
            diff = check_against_torch(path, net, spec, clean)
            row.update(describe(path))
            row["clean_metric"] = fmt(metrics(spec, run_onnx(path, clean, spec.inputs), clean))
            row["shifted_metric"] = fmt(metrics(spec, run_onnx(path, shifted, spec.inputs),
                                                shifted))
            row["notes"] = (f"ops: {row.pop('ops')}; max |ort - torch| {diff:.1e}; "
                            f"size {path.stat().st_size} B; trained in {train_s:.0f} s")
            print(f"  {path.name}: clean {row['clean_metric']}; {spec.shift} "
                  f"{row['shifted_metric']}", flush=True)
        rows.append(row)
    return rows


def write_manifest(out: Path, rows: list[dict[str, str]]) -> None:
    """Replace the rows of the given files in ``out/MANIFEST.tsv`` (others kept),
    ordered by the corpus order then file name."""
    path = out / MANIFEST
    old: dict[str, dict[str, str]] = {}
    if path.is_file():
        with path.open(newline="") as f:
            old = {r["file"]: r for r in csv.DictReader(f, delimiter="\t")}
    old.update({r["file"]: r for r in rows})
    order = {n: i for i, n in enumerate(TASKS)}
    ordered = sorted(old.values(), key=lambda r: (order.get(r["name"], 99), r["file"]))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, delimiter="\t", restval="", extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(ordered)
    tmp.replace(path)


def write_data(args: argparse.Namespace) -> int:
    try:
        data = sample(args.name, args.part, args.n, args.shift, args.seed)
    except ValueError as exc:
        print(f"corpus: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(out)
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in data.items())
    print(f"wrote {out}: {shapes}")
    return 0


def build_paddle(python: str, out: Path) -> list[dict[str, str]]:
    """``paddle_se_cnn``: ``tools/corpus_paddle.py`` run by ``python`` (an environment
    with paddlepaddle and paddle2onnx), trained on the same images, measured here."""
    import subprocess
    import tempfile

    spec, name = SPECS["se_cnn"], "paddle_se_cnn"
    path = out / f"{name}.onnx"
    with tempfile.TemporaryDirectory(prefix="corpus-paddle-") as tmp:
        train_npz = Path(tmp) / "train.npz"
        np.savez(train_npz, **sample("se_cnn", "train"))
        t0 = time.perf_counter()
        subprocess.run([python, str(Path(__file__).with_name("corpus_paddle.py")),
                        str(train_npz), str(Path(tmp) / "m.onnx")], check=True, cwd=tmp)
        train_s = time.perf_counter() - t0
        onnx.save(onnx.load(str(Path(tmp) / "m.onnx")), str(path))
    m = onnx.load(str(path))
    clean = sample("se_cnn", "eval")
    shifted = sample("se_cnn", "eval", shift=spec.shift, seed=EVAL_SEED)
    feed = replace(spec, inputs=(m.graph.input[0].name,), outputs=(m.graph.output[0].name,))
    row = {"file": path.name, "name": name, "exporter":
           f"paddle2onnx {m.producer_version or ''} (paddle.onnx.export, opset 11)".strip(),
           "architecture": "PP-LCNet-like (PaddlePaddle): Conv+BN+HardSwish, depthwise Conv, "
           "squeeze-excitation (HardSigmoid gate), pointwise Conv, GAP, Linear",
           "task": "classify", "labels": spec.labels, "preprocessing": PREP,
           "training_data": TRAIN_DATA, "shift": spec.shift, **describe(path)}
    x_clean, x_shift = {feed.inputs[0]: clean["input"]}, {feed.inputs[0]: shifted["input"]}
    row["clean_metric"] = fmt(metrics(feed, run_onnx(path, x_clean, feed.inputs), clean))
    row["shifted_metric"] = fmt(metrics(feed, run_onnx(path, x_shift, feed.inputs), shifted))
    row["notes"] = (f"ops: {row.pop('ops')}; BatchNormalization kept; weights are "
                    f"initializers (paddle2onnx 2.x); size {path.stat().st_size} B; "
                    f"trained and exported in {train_s:.0f} s")
    print(f"  {path.name}: clean {row['clean_metric']}; rot {row['shifted_metric']}")
    return [row]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["paddle"]:
        p = argparse.ArgumentParser(prog="corpus.py paddle")
        p.add_argument("--python", required=True,
                       help="the Python of an environment with paddlepaddle and paddle2onnx")
        p.add_argument("--out", default=str(OUT))
        a = p.parse_args(argv[1:])
        write_manifest(Path(a.out), build_paddle(a.python, Path(a.out)))
        return 0
    if argv[:1] == ["data"]:
        p = argparse.ArgumentParser(prog="corpus.py data", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", choices=TASKS)
        p.add_argument("--n", type=int, default=None, help="samples (default: the whole part)")
        p.add_argument("--part", choices=tuple(SPLITS), default="adapt")
        p.add_argument("--shift", default="none")
        p.add_argument("--seed", type=int, default=1, help="shift / draw seed (eval uses 2)")
        p.add_argument("--out", required=True)
        return write_data(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="corpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--no-dynamo", action="store_true", help="skip the dynamo exports")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        print(f"building {name}", flush=True)
        write_manifest(out, build(name, out, dynamo=not args.no_dynamo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
