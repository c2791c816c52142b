"""Train a small PP-LCNet-like classifier in PaddlePaddle and export it with paddle2onnx
(``paddle.onnx.export``): the corpus model ``paddle_se_cnn`` (``tools/corpus.py paddle``
runs this script in a separate environment that has ``paddlepaddle`` and ``paddle2onnx``;
it needs only numpy, paddle and paddle2onnx, never the project).

    PADDLE_PY tools/corpus_paddle.py TRAIN.npz OUT.onnx [--epochs 4]

``TRAIN.npz`` holds ``input`` float32 [N, 1, 28, 28] and ``y`` int64 [N]. The network:
Conv 3x3 s2; depthwise Conv 3x3; pointwise Conv; depthwise Conv 3x3 s2;
squeeze-excitation ``x * Hardsigmoid(Conv(ReLU(Conv(GAP(x)))))``; pointwise Conv (each
Conv with BatchNorm and HardSwish); GAP; Linear. Seeded (paddle.seed 0), CPU.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import paddle
from paddle import nn


class SE(nn.Layer):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.c1, self.c2 = nn.Conv2D(c, r, 1), nn.Conv2D(r, c, 1)

    def forward(self, x):  # noqa: ANN001, ANN201 - paddle tensors
        s = self.pool(x)
        return x * nn.functional.hardsigmoid(self.c2(nn.functional.relu(self.c1(s))))


def cbh(cin: int, cout: int, k: int, s: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2D(cin, cout, k, s, k // 2, groups=groups, bias_attr=False),
                         nn.BatchNorm2D(cout), nn.Hardswish())


class LCNet(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbh(1, 16, 3, 2)                 # 14
        self.dw1, self.pw1 = cbh(16, 16, 3, 1, 16), cbh(16, 32, 1, 1)
        self.dw2 = cbh(32, 32, 3, 2, groups=32)     # 7
        self.se = SE(32, 8)
        self.pw2 = cbh(32, 64, 1, 1)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):  # noqa: ANN001, ANN201 - paddle tensors
        x = self.pw1(self.dw1(self.stem(x)))
        x = self.pw2(self.se(self.dw2(x)))
        return self.fc(paddle.flatten(self.pool(x), 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=12)
    args = p.parse_args(argv)
    paddle.seed(0)
    paddle.set_device("cpu")
    with np.load(args.train) as z:
        x, y = z["input"].astype(np.float32), z["y"].astype(np.int64)
    net = LCNet()
    sched = paddle.optimizer.lr.CosineAnnealingDecay(2e-3, args.epochs)
    opt = paddle.optimizer.Adam(learning_rate=sched, parameters=net.parameters())
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        net.train()
        order, total = rng.permutation(len(y)), 0.0
        for s in range(0, len(y), 64):
            idx = order[s:s + 64]
            loss = nn.functional.cross_entropy(net(paddle.to_tensor(x[idx])),
                                               paddle.to_tensor(y[idx]))
            loss.backward()
            opt.step()
            opt.clear_grad()
            total += float(loss) * len(idx)
        sched.step()
        print(f"  paddle epoch {epoch + 1}/{args.epochs}: loss {total / len(y):.4f}", flush=True)
    net.eval()
    spec = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "input")]
    prefix = args.out.removesuffix(".onnx")
    paddle.onnx.export(net, prefix, input_spec=spec, opset_version=11)
    return 0


if __name__ == "__main__":
    sys.exit(main())
