"""The peer of the robustness matrix as one whole script: ONNX in, ONNX out, by
end-to-end backprop (``tools/matrix.py`` times this process from start to exit).

Steps: import torch and onnx2torch; convert the model (a dynamic-batch copy, so graphs
exported with a fixed batch of 1 train on mini-batches); train with Adam, batch 64,
seeded shuffle, on cross-entropy of the logits (NLL when the graph ends in Softmax /
LogSoftmax), every weight trainable (``benchlib.train_initializers``: also those that
onnx2torch keeps as buffers), dropout in train mode, BatchNorm in eval mode (running
statistics frozen);
``torch.onnx.export`` (TorchScript exporter, dynamic batch, opset 17), under the input
and output names of the original graph.

``--tune`` (the tuned peer): a seeded 20 % of the adaptation data is held out; for each
lr in (1e-4, 3e-4, 1e-3) the converted model is trained from its original weights for
3 epochs on the other 80 % and scored on the held-out part after every epoch, which
covers epochs 1-3 for that lr. The (lr, epochs) with the best held-out accuracy (ties:
the earlier in lr-ascending, epochs-ascending order) is then retrained from the
original weights on ALL the adaptation data, and that model is exported. The tuning
counts in the script's time.

Usage:
    python tools/peer_adam.py MODEL.onnx OUT.onnx --data ADAPT.npz
        [--lr 1e-3] [--epochs 1] [--tune] [--seed 0] [--threads 2] [--report OUT.json]

``ADAPT.npz`` holds the model-ready inputs under ``x`` and the labels under ``y`` (the
file ``onnxfbp refine --data`` reads). Exit codes: 0 written; 2 the model cannot be
converted or exported (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    EVAL_BATCH,
    dynamic_batch,
    freeze_batchnorm,
    import_onnx2torch,
    output_kind,
    peer_loss,
    train_initializers,
)

if TYPE_CHECKING:
    import torch

BATCH = 64
TUNE_LRS = (1e-4, 3e-4, 1e-3)
# --loss for float labels (regression, the same losses as onnxfbp's --loss)
REGRESSION = {"mse": lambda: _reg("mse"), "l1": lambda: _reg("l1"), "huber": lambda: _reg("huber")}


def _reg(name: str) -> Any:
    import torch

    base = {"mse": torch.nn.MSELoss(), "l1": torch.nn.L1Loss(),
            "huber": torch.nn.HuberLoss(delta=1.0)}[name]
    return lambda out, y: base(out.reshape(y.shape), y)
TUNE_EPOCHS = 3
HOLDOUT = 0.2
OPSET = 17


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` classified as ``y`` in eval mode (float labels: minus the mean
    absolute error); the net is left in training mode with BatchNorm frozen."""
    import torch

    net.eval()
    with torch.inference_mode():
        out = torch.cat([net(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
    net.train()
    freeze_batchnorm(net)
    if y.is_floating_point():
        return -float((out.reshape(y.shape) - y).abs().mean())
    return float((out.argmax(1) == y).float().mean())


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, epochs: int,
          kind: str, seed: int, after_epoch: Any = None) -> None:
    """Adam, batch 64, ``epochs`` seeded shuffles of (x, y); ``after_epoch(epoch)`` is
    called after each epoch."""
    import torch

    loss_fn = peer_loss(kind) if kind not in REGRESSION else REGRESSION[kind]()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    freeze_batchnorm(net)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(epoch)


def export(net: torch.nn.Module, example: torch.Tensor, path: Path, in_name: str,
           out_name: str) -> None:
    """``torch.onnx.export`` with a dynamic batch, then the graph's input and output
    renamed to the original model's (the TorchScript exporter rejects names such as
    ``36`` that the original exporter wrote)."""
    import onnx
    import torch

    torch.onnx.export(net, (example,), str(path), input_names=["peer_in"],
                      output_names=["peer_out"], opset_version=OPSET, dynamo=False,
                      dynamic_axes={"peer_in": {0: "N"}, "peer_out": {0: "N"}})
    proto = onnx.load(str(path))
    rename = {"peer_in": in_name, "peer_out": out_name}
    for vi in [*proto.graph.input, *proto.graph.output]:
        vi.name = rename.get(vi.name, vi.name)
    for node in proto.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    onnx.save(proto, str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tune", action="store_true", help="pick lr and epochs on a held-out 20 %%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", type=Path, help="write the chosen settings and timings here")
    p.add_argument("--loss", choices=tuple(REGRESSION),
                   help="float labels: this regression loss (default: classification)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import numpy as np
    import onnx
    import torch

    onnx2torch = import_onnx2torch()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    timings = {"import_s": time.perf_counter() - t0}
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t = time.perf_counter()
    proto = onnx.load(str(args.model))
    kind = args.loss or output_kind(proto)
    in_name, out_name = proto.graph.input[0].name, proto.graph.output[0].name
    try:
        net = onnx2torch.convert(dynamic_batch(proto))
    except Exception as exc:
        print(f"peer_adam: error: onnx2torch cannot convert {args.model.name} "
              f"({type(exc).__name__}: {str(exc)[:200]}); the peer has no result for this model",
              file=sys.stderr)
        return 2
    promoted = train_initializers(net)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    with np.load(args.data) as z:
        xkey = "x" if "x" in z else in_name
        x = torch.from_numpy(z[xkey])
        y = torch.from_numpy(z["y"].astype(np.float32 if args.loss else np.int64))
    timings["convert_s"] = time.perf_counter() - t

    lr, epochs = args.lr, args.epochs
    report: dict[str, Any] = {"output_kind": kind, "initializers_trained": promoted}
    t = time.perf_counter()
    if args.tune:
        order = np.random.default_rng(args.seed).permutation(len(y))
        n_hold = max(1, int(round(HOLDOUT * len(y))))
        hold, fit = torch.from_numpy(order[:n_hold]), torch.from_numpy(order[n_hold:])
        scores: list[tuple[float, float, int]] = []
        for cand in TUNE_LRS:
            net.load_state_dict(initial)

            def score(epoch: int, cand: float = cand) -> None:
                scores.append((accuracy(net, x[hold], y[hold]), cand, epoch))

            train(net, x[fit], y[fit], cand, TUNE_EPOCHS, kind, args.seed, score)
        best = max(scores, key=lambda s: s[0])  # first maximum: smaller lr, fewer epochs
        _, lr, epochs = best
        report["tuning"] = [{"lr": c, "epochs": e, "holdout_acc": a} for a, c, e in scores]
        net.load_state_dict(initial)
        timings["tune_s"] = time.perf_counter() - t
        t = time.perf_counter()
    train(net, x, y, lr, epochs, kind, args.seed)
    timings["train_s"] = time.perf_counter() - t
    report.update({"lr": lr, "epochs": epochs})

    t = time.perf_counter()
    net.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(net, x[:2], args.output, in_name, out_name)
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
