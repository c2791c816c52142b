"""The peer of the robustness matrix as one whole script: ONNX in, ONNX out, by
end-to-end backprop (``tools/matrix.py`` and ``tools/task_bench.py`` time this process
from start to exit).

Steps: import torch and onnx2torch; convert the model (a dynamic-batch copy, so graphs
exported with a fixed batch of 1 train on mini-batches); train with Adam, batch 64,
seeded shuffle, on the task's loss, every weight trainable
(``benchlib.train_initializers``: also those that onnx2torch keeps as buffers), dropout
in train mode, BatchNorm in eval mode (running statistics frozen);
``torch.onnx.export`` (TorchScript exporter, dynamic batch, opset 17), under the input
and output names of the original graph (every graph input and output is kept).

Tasks (the rules of onnxfbp's ``docs/tasks.md``), per trained output:

- integer labels ``[N]``: classification, cross-entropy of the logits (NLL when the
  output is a Softmax / LogSoftmax); metric accuracy;
- integer labels ``[N, d1..]`` against ``[N, C, d1..]``: dense classification,
  cross-entropy per position, label 255 ignored; metric mean IoU;
- float labels under a Sigmoid output, values in [0, 1]: binary masks, binary
  cross-entropy on the output's probabilities; metric mean IoU of the masks ``p >= 0.5``;
- other float labels, or ``--loss``: regression, ``--loss mse`` (default), ``l1`` or
  ``huber`` (delta 1) on the output reshaped as the labels; metric minus the MAE.

Inputs: the npz holds one array per graph input under its name (a single-input model
also reads ``x``); they are fed in the graph's input order. Outputs: ``--target
OUTPUT=KEY`` (repeatable, as onnxfbp's) trains OUTPUT on the labels under KEY; without
it the first graph output is trained on ``y``. With one target the loss is the task's
mean (over samples, or valid positions); with several, the losses are summed, each
normalized as onnxfbp's weighted loss: per sample, a dense or binary output's loss summed
over its positions and divided by their count, a regression output's summed over its
values (mse: half the squared error), then averaged over the batch.

``--tune`` (the tuned peer): a seeded 20 % of the adaptation data is held out; for each
lr in (1e-4, 3e-4, 1e-3) the converted model is trained from its original weights for
3 epochs on the other 80 % and scored on the held-out part after every epoch, which
covers epochs 1-3 for that lr. The score is the single target's metric (above); with
several targets, minus the summed normalized held-out loss. The (lr, epochs) with the
best score (ties: the earlier in lr-ascending, epochs-ascending order) is then retrained
from the original weights on ALL the adaptation data, and that model is exported. The
tuning counts in the script's time.

``--retain RETAIN.npz`` (original-domain data; one classification target): the
retain-aware peer, onnxfbp's ``--retain-data`` rule in backprop. Without labels in it,
the input model's predictions are the labels, and the bound is on the accuracy the
input model expects of the predictions, ``mean p0[i, pred_i]`` (as onnxfbp's). A seeded half of
the retain samples is held out (as onnxfbp's ``retain_holdout``); the other half joins
every training set. With ``--tune`` a candidate (lr, epochs) counts only if its accuracy
on the retain held-out half is at most ``--max-retain-drop`` (default 0.01) below the
input model's; the best held-out score among those is retrained as above (on all the
adaptation data and the retain training half), and where none keeps the bound the input
model is exported unchanged (``"epochs": 0`` in the report).

Usage:
    python tools/peer_adam.py MODEL.onnx OUT.onnx --data ADAPT.npz
        [--target OUTPUT=KEY ...] [--loss mse|l1|huber] [--lr 1e-3] [--epochs 1]
        [--tune] [--retain RETAIN.npz [--max-retain-drop 0.01]] [--seed 0] [--threads 2]
        [--report OUT.json]

Exit codes: 0 written; 2 the model cannot be converted or exported, or the data lacks
an input or a label key (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    EVAL_BATCH,
    dynamic_batch,
    freeze_batchnorm,
    import_onnx2torch,
    peer_loss,
    train_initializers,
)

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

BATCH = 64
TUNE_LRS = (1e-4, 3e-4, 1e-3)
TUNE_EPOCHS = 3
HOLDOUT = 0.2
OPSET = 17
IGNORE = 255  # dense labels: ignored position
REGRESSION = ("mse", "l1", "huber")


class PeerError(Exception):
    """A one-line reason the peer has no result for this model."""


@dataclass
class Head:
    """One trained output: its index among the graph outputs, the labels' key, the task
    (classification | dense | binary | regression), the output's final op kind
    (logits | softmax | logsoftmax | sigmoid) and the regression loss."""

    index: int
    key: str
    task: str
    kind: str
    loss: str = "mse"


def final_op(proto: onnx.ModelProto, output: str) -> str:
    """The op that produces ``output`` (Identity skipped): "softmax", "logsoftmax",
    "sigmoid" or "logits"."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer.get(output)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is not None and node.op_type in ("Softmax", "LogSoftmax", "Sigmoid"):
        return node.op_type.lower()
    return "logits"


def detect_task(y: np.ndarray, kind: str, loss: str | None) -> str:
    """The task of labels ``y`` for an output ending in ``kind`` (module docstring)."""
    import numpy as np

    if loss is None and np.issubdtype(y.dtype, np.integer):
        return "classification" if y.ndim == 1 else "dense"
    if loss is None and kind == "sigmoid" and y.size and y.min() >= 0 and y.max() <= 1:
        return "binary"
    return "regression"


def head_loss(head: Head, out: torch.Tensor, y: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The head's training loss: the task's mean, or (``normalized``) onnxfbp's
    per-sample normalization averaged over the batch."""
    import torch
    import torch.nn.functional as F

    n = len(y)
    if head.task == "classification":
        return peer_loss(head.kind)(out.reshape(n, -1), y)
    if head.task == "dense":
        z = out.reshape(n, -1, *y.shape[1:])
        logp = z if head.kind == "logsoftmax" else (
            torch.log(z.clamp_min(1e-12)) if head.kind == "softmax" else F.log_softmax(z, 1))
        red = "sum" if normalized else "mean"
        value = F.nll_loss(logp, y, ignore_index=IGNORE, reduction=red)
        return value / (y[0].numel() * n) if normalized else value
    if head.task == "binary":  # mean over positions and samples in both cases
        return F.binary_cross_entropy(out.reshape(y.shape).clamp(1e-7, 1 - 1e-7), y)
    r = out.reshape(y.shape) - y
    if head.loss == "l1":
        per = r.abs()
    elif head.loss == "huber":
        per = F.huber_loss(out.reshape(y.shape), y, delta=1.0, reduction="none")
    else:
        per = 0.5 * r * r if normalized else r * r
    return per.reshape(n, -1).sum(1).mean() if normalized else per.mean()


def forward(net: torch.nn.Module, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The net's outputs, always a tuple in the graph's output order."""
    out = net(*xs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def total_loss(heads: list[Head], outs: tuple[torch.Tensor, ...],
               ys: list[torch.Tensor]) -> torch.Tensor:
    normalized = len(heads) > 1
    parts = [head_loss(h, outs[h.index], y, normalized) for h, y in zip(heads, ys, strict=True)]
    return sum(parts[1:], parts[0])


def mean_iou(pred: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Mean over the classes present in prediction or truth of intersection / union."""
    import torch

    valid = truth != IGNORE
    t, p = truth[valid].long(), pred[valid].long()
    conf = torch.bincount(t * k + p, minlength=k * k).reshape(k, k).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if bool(present.any()) else 0.0


def score(net: torch.nn.Module, heads: list[Head], xs: list[torch.Tensor],
          ys: list[torch.Tensor]) -> float:
    """Held-out score, higher is better: one head's metric (accuracy, mean IoU, minus
    MAE), or minus the summed normalized loss of several heads. Runs in eval mode and
    leaves the net in training mode with BatchNorm frozen."""
    import torch

    net.eval()
    with torch.inference_mode():
        parts = [forward(net, [x[i:i + EVAL_BATCH] for x in xs])
                 for i in range(0, len(ys[0]), EVAL_BATCH)]
        outs = tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))
        if len(heads) > 1:
            value = -float(total_loss(heads, outs, ys))
        else:
            value = metric(heads[0], outs[heads[0].index], ys[0])
    net.train()
    freeze_batchnorm(net)
    return value


def metric(head: Head, out: torch.Tensor, y: torch.Tensor) -> float:
    if head.task == "regression":
        return -float((out.reshape(y.shape) - y).abs().mean())
    if head.task == "classification":
        return float((out.reshape(len(y), -1).argmax(1) == y).float().mean())
    if head.task == "binary":
        return mean_iou((out.reshape(y.shape) >= 0.5).long(), (y >= 0.5).long(), 2)
    z = out.reshape(len(y), -1, *y.shape[1:])
    return mean_iou(z.argmax(1), y, z.shape[1])


def train(net: torch.nn.Module, heads: list[Head], xs: list[torch.Tensor],
          ys: list[torch.Tensor], lr: float, epochs: int, seed: int,
          after_epoch: Callable[[int], None] | None = None) -> None:
    """Adam, batch 64, ``epochs`` seeded shuffles of the data; ``after_epoch(epoch)`` is
    called after each epoch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    freeze_batchnorm(net)
    n = len(ys[0])
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad(set_to_none=True)
            outs = forward(net, [x[idx] for x in xs])
            total_loss(heads, outs, [y[idx] for y in ys]).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(epoch)


def export(net: torch.nn.Module, examples: tuple[torch.Tensor, ...], path: Path,
           in_names: list[str], out_names: list[str]) -> None:
    """``torch.onnx.export`` with a dynamic batch, then the graph's inputs and outputs
    renamed to the original model's (the TorchScript exporter rejects names such as
    ``36`` that the original exporter wrote)."""
    import onnx
    import torch

    tmp_in = [f"peer_in{i}" for i in range(len(in_names))]
    tmp_out = [f"peer_out{i}" for i in range(len(out_names))]
    torch.onnx.export(net, examples, str(path), input_names=tmp_in, output_names=tmp_out,
                      opset_version=OPSET, dynamo=False,
                      dynamic_axes={n: {0: "N"} for n in [*tmp_in, *tmp_out]})
    proto = onnx.load(str(path))
    rename = dict(zip([*tmp_in, *tmp_out], [*in_names, *out_names], strict=True))
    for vi in [*proto.graph.input, *proto.graph.output]:
        vi.name = rename.get(vi.name, vi.name)
    for node in proto.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    onnx.save(proto, str(path))


def load_data(path: Path, proto: onnx.ModelProto, targets: list[tuple[str, str]],
              loss: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Head]]:
    """The inputs in graph order, the labels per target and the heads."""
    import numpy as np
    import torch

    inits = {t.name for t in proto.graph.initializer}
    in_names = [i.name for i in proto.graph.input if i.name not in inits]
    out_names = [o.name for o in proto.graph.output]
    with np.load(path) as z:
        keys = set(z.files)
        if len(in_names) == 1 and in_names[0] not in keys and "x" in keys:
            xs = [z["x"]]
        else:
            missing = [n for n in in_names if n not in keys]
            if missing:
                raise PeerError(f"{path.name} has no array for input(s) {', '.join(missing)}")
            xs = [z[n] for n in in_names]
        heads, ys = [], []
        for output, key in targets:
            if output not in out_names:
                raise PeerError(f"--target {output}: no such output ({', '.join(out_names)})")
            if key not in keys:
                raise PeerError(f"{path.name} has no labels under {key!r}")
            y = z[key]
            kind = final_op(proto, output)
            task = detect_task(y, kind, loss)
            y = y.astype(np.int64 if task in ("classification", "dense") else np.float32)
            heads.append(Head(out_names.index(output), key, task, kind, loss or "mse"))
            ys.append(torch.from_numpy(y))
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in xs], ys, heads


@dataclass
class RetainSplit:
    """``--retain``: the retain samples that train (joined to every training set) and
    the held-out half whose accuracy may drop at most ``max_drop`` below ``before``."""

    x_train: list[torch.Tensor]
    y_train: list[torch.Tensor]
    x_hold: list[torch.Tensor]
    y_hold: list[torch.Tensor]
    max_drop: float
    before: float = 0.0
    credit: torch.Tensor | None = None  # unlabelled: the input model's softmax on x_hold

    def join(self, xs: list[torch.Tensor], ys: list[torch.Tensor]
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        import torch

        return ([torch.cat([a, b]) for a, b in zip(xs, self.x_train, strict=True)],
                [torch.cat([a, b]) for a, b in zip(ys, self.y_train, strict=True)])

    def kept(self, net: torch.nn.Module, heads: list[Head]) -> tuple[bool, float]:
        """Whether the held-out half keeps the bound, and its score: accuracy, or
        unlabelled, the accuracy the input model expects, mean ``p0[i, pred_i]``."""
        if self.credit is None:
            acc = score(net, heads, self.x_hold, self.y_hold)
        else:
            pred = outputs(net, self.x_hold, heads[0]).argmax(1)
            acc = float(self.credit[range(len(pred)), pred].mean())
        return acc >= self.before - self.max_drop - 1e-12, acc


def outputs(net: torch.nn.Module, xs: list[torch.Tensor], head: Head) -> torch.Tensor:
    """A classification head's class probabilities ``[N, C]`` (eval mode; the net is
    left in training mode with BatchNorm frozen)."""
    import torch

    net.eval()
    with torch.inference_mode():
        out = torch.cat([forward(net, [x[i:i + EVAL_BATCH] for x in xs])[head.index]
                         for i in range(0, len(xs[0]), EVAL_BATCH)])
    net.train()
    freeze_batchnorm(net)
    z = out.reshape(len(out), -1)
    if head.kind == "softmax":
        return z
    return z.exp() if head.kind == "logsoftmax" else torch.softmax(z, 1)


def split_retain(xs: list[torch.Tensor], ys: list[torch.Tensor], seed: int,
                 max_drop: float, probs: torch.Tensor | None = None) -> RetainSplit:
    """A seeded half of the retain samples held out (at least one each side);
    ``probs``: unlabelled, the input model's probabilities (``ys`` its predictions)."""
    import numpy as np
    import torch

    n = len(ys[0])
    order = np.random.default_rng([seed, 2]).permutation(n)
    n_hold = min(max(1, n // 2), n - 1)
    hold, fit = torch.from_numpy(order[:n_hold]), torch.from_numpy(order[n_hold:])
    return RetainSplit([x[fit] for x in xs], [y[fit] for y in ys],
                       [x[hold] for x in xs], [y[hold] for y in ys], max_drop,
                       credit=None if probs is None else probs[hold])


def tune(net: torch.nn.Module, heads: list[Head], xs: list[torch.Tensor],
         ys: list[torch.Tensor], seed: int, retain: RetainSplit | None = None
         ) -> tuple[float, int, list[dict[str, Any]]]:
    """The (lr, epochs) with the best held-out score (module docstring) and every
    candidate's score; with ``retain``, among those that keep its bound (epochs 0:
    none does). The net is left at its original weights."""
    import numpy as np
    import torch

    initial = {k: v.clone() for k, v in net.state_dict().items()}
    n = len(ys[0])
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, int(round(HOLDOUT * n)))
    hold, fit = torch.from_numpy(order[:n_hold]), torch.from_numpy(order[n_hold:])
    xh, yh = [x[hold] for x in xs], [y[hold] for y in ys]
    xf, yf = [x[fit] for x in xs], [y[fit] for y in ys]
    if retain is not None:
        xf, yf = retain.join(xf, yf)
    rows: list[dict[str, Any]] = []
    for cand in TUNE_LRS:
        net.load_state_dict(initial)

        def after(epoch: int, cand: float = cand) -> None:
            row = {"lr": cand, "epochs": epoch, "holdout_score": score(net, heads, xh, yh)}
            if retain is not None:
                row["retain_kept"], row["retain_accuracy"] = retain.kept(net, heads)
            rows.append(row)

        train(net, heads, xf, yf, cand, TUNE_EPOCHS, seed, after)
    net.load_state_dict(initial)
    allowed = [r for r in rows if r.get("retain_kept", True)]
    if not allowed:
        return 0.0, 0, rows
    best = max(allowed, key=lambda r: r["holdout_score"])  # first: smaller lr, fewer epochs
    return best["lr"], best["epochs"], rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--target", action="append", default=[], metavar="OUTPUT=KEY",
                   help="train OUTPUT on the labels under KEY (repeatable; default: the "
                        "first output on y)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tune", action="store_true", help="pick lr and epochs on a held-out 20 %%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", type=Path, help="write the chosen settings and timings here")
    p.add_argument("--retain", type=Path, metavar="RETAIN.npz",
                   help="labelled original-domain data: trained on, and its held-out half "
                        "must keep its accuracy (module docstring)")
    p.add_argument("--max-retain-drop", type=float, default=0.01)
    p.add_argument("--loss", choices=REGRESSION,
                   help="float labels: this regression loss (default: the task of the labels)")
    args = p.parse_args(argv)
    bad = [t for t in args.target if "=" not in t]
    if bad:
        p.error(f"--target {bad[0]}: expected OUTPUT=KEY")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    import onnx
    import torch

    onnx2torch = import_onnx2torch()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    timings = {"import_s": time.perf_counter() - t0}
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t = time.perf_counter()
    proto = onnx.load(str(args.model))
    out_names = [o.name for o in proto.graph.output]
    targets = [tuple(s.split("=", 1)) for s in args.target] or [(out_names[0], "y")]
    try:
        xs, ys, heads = load_data(args.data, proto, targets, args.loss)
    except PeerError as exc:
        print(f"peer_adam: error: {exc}", file=sys.stderr)
        return 2
    try:
        net = onnx2torch.convert(dynamic_batch(proto))
    except Exception as exc:
        print(f"peer_adam: error: onnx2torch cannot convert {args.model.name} "
              f"({type(exc).__name__}: {str(exc)[:200]}); the peer has no result for this model",
              file=sys.stderr)
        return 2
    promoted = train_initializers(net)
    timings["convert_s"] = time.perf_counter() - t

    lr, epochs = args.lr, args.epochs
    report: dict[str, Any] = {"output_kind": heads[0].kind, "initializers_trained": promoted,
                              "tasks": {out_names[h.index]: h.task for h in heads}}
    retain = None
    if args.retain is not None:
        if len(heads) != 1 or heads[0].task != "classification":
            print("peer_adam: error: --retain needs one classification target", file=sys.stderr)
            return 2
        import numpy as np

        with np.load(args.retain) as z:
            labelled = heads[0].key in z.files
        probs = None
        try:
            rx, ry, _ = load_data(args.retain, proto, targets if labelled else [], args.loss)
        except PeerError as exc:
            print(f"peer_adam: error: {exc}", file=sys.stderr)
            return 2
        if not labelled:  # the input model's predictions are the labels (as onnxfbp's)
            probs = outputs(net, rx, heads[0])
            ry = [probs.argmax(1)]
        retain = split_retain(rx, ry, args.seed, args.max_retain_drop, probs)
        _, retain.before = retain.kept(net, heads)
        report["retain"] = {"train": len(retain.y_train[0]), "heldout": len(retain.y_hold[0]),
                            "before": retain.before, "labelled": labelled}
    if args.tune:
        t = time.perf_counter()
        lr, epochs, report["tuning"] = tune(net, heads, xs, ys, args.seed, retain)
        timings["tune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if retain is not None:
        xs, ys = retain.join(xs, ys)
    if epochs > 0:
        train(net, heads, xs, ys, lr, epochs, args.seed)
    timings["train_s"] = time.perf_counter() - t
    report.update({"lr": lr, "epochs": epochs})

    t = time.perf_counter()
    net.eval()
    inits = {i.name for i in proto.graph.initializer}
    in_names = [i.name for i in proto.graph.input if i.name not in inits]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(net, tuple(x[:2] for x in xs), args.output, in_names, out_names)
    except Exception as exc:
        print(f"peer_adam: error: torch.onnx.export failed for {args.model.name} "
              f"({type(exc).__name__}: {str(exc)[:200]}); the peer has no result for this model",
              file=sys.stderr)
        return 2
    timings["export_s"] = time.perf_counter() - t
    report["timings"] = timings
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
