"""The torch modules of the model corpus (``tools/corpus.py`` trains and exports them).

Each model is tiny (well under 1 MB of weights) and built from the blocks that deployed
models are made of today:

- ``SeCNN``       MobileNetV3-small-like: depthwise-separable inverted residuals,
                  squeeze-excitation ``x * HardSigmoid(Conv(ReLU(Conv(GAP(x)))))``,
                  HardSwish, a Gemm head.
- ``EffNetTiny``  EfficientNet-like: MBConv (1x1 expand, depthwise, SE with SiLU and a
                  Sigmoid gate, 1x1 project, residual), SiLU (``x * Sigmoid(x)``).
- ``VitTiny``     a ViT: 7x7 patch-embedding Conv, class token, learned position
                  embedding, 2 pre-norm blocks of 4-head self-attention (MatMul of two
                  activations, Softmax) and a GELU MLP, LayerNorm, a Linear head.
- ``FcnCls``      encoder-decoder (strided Convs, ConvTranspose, Resize) then GAP and a
                  Linear classifier.
- ``RotRegress``  CNN regressing a digit's rotation angle, output ``[N, 1]``.
- ``BoxRegress``  CNN regressing a digit's box on a 56x56 canvas, output ``[N, 4]``.
- ``SegFcn``      U-Net-like segmenter (strided Convs, ConvTranspose, Resize, skip Concats),
                  output ``[N, 11, 56, 56]`` logits.
- ``MaskNet``     dense binary mask model, Resize decoder, Sigmoid output ``[N, 1, 56, 56]``.
- ``TwoInputSum`` two digit images ``a``, ``b`` -> logits of their sum ``[N, 19]``.
- ``TwoOutput``   one digit -> class logits ``[N, 10]`` and its rotation angle ``[N, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

Tensor = torch.Tensor


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (folded into the Conv by the legacy exporter)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class SqueezeExcite(nn.Module):
    """``x * gate(Conv(act(Conv(GAP(x)))))``: the squeeze-excitation block."""

    def __init__(self, c: int, r: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.act = nn.Conv2d(c, r, 1), act()
        self.fc2, self.gate = nn.Conv2d(r, c, 1), gate()

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise kxk -> SE -> 1x1 project (+ x when shapes agree)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, act: type[nn.Module],
                 se_act: type[nn.Module], se_gate: type[nn.Module]) -> None:
        super().__init__()
        self.expand = nn.Sequential(conv_bn(cin, mid, 1), act())
        self.dw = nn.Sequential(conv_bn(mid, mid, 3, stride, groups=mid), act())
        self.se = SqueezeExcite(mid, max(4, mid // 4), se_act, se_gate)
        self.project = conv_bn(mid, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class SeCNN(nn.Module):
    """MobileNetV3-small-like classifier for [N, 1, 28, 28]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16, 3, 2), nn.Hardswish())  # 14x14
        self.blocks = nn.Sequential(
            InvertedResidual(16, 48, 24, 2, nn.ReLU, nn.ReLU, nn.Hardsigmoid),  # 7x7
            InvertedResidual(24, 72, 24, 1, nn.Hardswish, nn.ReLU, nn.Hardsigmoid),
        )
        self.last = nn.Sequential(conv_bn(24, 96, 1), nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EffNetTiny(nn.Module):
    """EfficientNet-like classifier for [N, 1, 28, 28]: MBConv blocks with SE and SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 16, 3, 2), nn.SiLU())  # 14x14
        self.blocks = nn.Sequential(
            InvertedResidual(16, 64, 24, 2, nn.SiLU, nn.SiLU, nn.Sigmoid),  # 7x7
            InvertedResidual(24, 96, 24, 1, nn.SiLU, nn.SiLU, nn.Sigmoid),
        )
        self.last = nn.Sequential(conv_bn(24, 64, 1), nn.SiLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    """Multi-head self-attention written out: Softmax(Q K^T / sqrt(d)) V."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        t, d = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.hd ** -0.5, dim=-1)
        return self.proj(torch.matmul(att, v).transpose(1, 2).reshape(-1, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class VitTiny(nn.Module):
    """ViT for [N, 1, 28, 28]: 16 patches of 7x7, a class token, 2 blocks, dim 32."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, 7)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim, 4, 2 * dim), Block(dim, 4, 2 * dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch(x).flatten(2).transpose(1, 2)  # [N, 16, dim]
        x = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class FcnCls(nn.Module):
    """Encoder-decoder then a classifier: Conv s2 -> Conv s2 (7x7) -> ConvTranspose (14)
    -> Concat skip -> Conv -> Resize x2 (28, bilinear) -> Conv s2 -> Conv s2 (7) -> GAP
    -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Conv2d(1, 16, 3, 2, 1)    # 14
        self.e2 = nn.Conv2d(16, 32, 3, 2, 1)   # 7
        self.up = nn.ConvTranspose2d(32, 32, 2, 2)  # 14
        self.c1 = nn.Conv2d(48, 32, 3, 1, 1)
        self.c2 = nn.Conv2d(32, 48, 3, 2, 1)   # 28 -> 14
        self.c3 = nn.Conv2d(48, 64, 3, 2, 1)   # 7
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        e1 = F.relu(self.e1(x))
        u = F.relu(self.up(F.relu(self.e2(e1))))
        y = F.relu(self.c1(torch.cat([u, e1], 1)))
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)  # 28
        y = F.relu(self.c3(F.relu(self.c2(y))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _trunk28(width: int = 16) -> nn.Sequential:
    """A plain CNN trunk for [N, 1, 28, 28] -> [N, 2 * width * 7 * 7]."""
    return nn.Sequential(nn.Conv2d(1, width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten())


class RotRegress(nn.Module):
    """CNN -> angle [N, 1] (degrees / 45, so the ``rot`` range is [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _trunk28()
        self.fc1, self.fc2 = nn.Linear(32 * 49, 64), nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(self.trunk(x))))


class BoxRegress(nn.Module):
    """CNN on a [N, 1, 56, 56] canvas -> box [N, 4] = (x0, y0, x1, y1) / 56."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, 2, 1)   # 28
        self.c2 = nn.Conv2d(16, 32, 3, 2, 1)  # 14
        self.c3 = nn.Conv2d(32, 32, 3, 2, 1)  # 7
        self.fc1, self.fc2 = nn.Linear(32 * 49, 64), nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class SegFcn(nn.Module):
    """U-Net-like: 56 -> 28 -> 14 -> 7 (strided Convs), image-level context at 7x7
    (``m + ReLU(Conv(GAP(m)))``, a broadcast Add), ConvTranspose back to 14, Resize to 28
    and to 56 (bilinear), skip Concats, a 1x1 Conv to 11 classes (background + 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Conv2d(1, 16, 3, 2, 1)    # 28
        self.e2 = nn.Conv2d(16, 32, 3, 2, 1)   # 14
        self.e3 = nn.Conv2d(32, 48, 3, 2, 1)   # 7
        self.m1, self.m2 = nn.Conv2d(48, 48, 3, 1, 1), nn.Conv2d(48, 48, 3, 1, 1)
        self.ctx = nn.Conv2d(48, 48, 1)
        self.up = nn.ConvTranspose2d(48, 32, 2, 2)  # 14
        self.d2 = nn.Conv2d(64, 32, 3, 1, 1)
        self.d1 = nn.Conv2d(48, 16, 3, 1, 1)
        self.out = nn.Conv2d(16, 11, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = F.relu(self.e1(x))
        e2 = F.relu(self.e2(e1))
        m = F.relu(self.m2(F.relu(self.m1(F.relu(self.e3(e2))))))
        m = m + F.relu(self.ctx(F.adaptive_avg_pool2d(m, 1)))
        d2 = F.relu(self.d2(torch.cat([F.relu(self.up(m)), e2], 1)))
        u = F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False)
        y = self.out(F.relu(self.d1(torch.cat([u, e1], 1))))
        return F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)


class MaskNet(nn.Module):
    """Encoder (strided Convs), Resize decoder, Sigmoid mask [N, 1, 56, 56]."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Conv2d(1, 8, 3, 1, 1)     # 56
        self.e2 = nn.Conv2d(8, 16, 3, 2, 1)    # 28
        self.e3 = nn.Conv2d(16, 16, 3, 1, 1)
        self.d1 = nn.Conv2d(24, 8, 3, 1, 1)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = F.relu(self.e1(x))
        e = F.relu(self.e3(F.relu(self.e2(e1))))
        u = F.interpolate(e, scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.out(F.relu(self.d1(torch.cat([u, e1], 1)))))


class TwoInputSum(nn.Module):
    """Two digit images -> logits of the sum of their labels (19 classes): a CNN trunk
    and a 10-way Linear per input, Concat of the two, a 2-layer MLP. Trained with the
    two per-digit heads supervised too (``parts``), which the sum alone learns slowly."""

    def __init__(self) -> None:
        super().__init__()
        self.ta, self.tb = _trunk28(8), _trunk28(8)
        self.ha, self.hb = nn.Linear(16 * 49, 10), nn.Linear(16 * 49, 10)
        self.fc1, self.fc2 = nn.Linear(20, 64), nn.Linear(64, 19)

    def parts(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        la, lb = self.ha(self.ta(a)), self.hb(self.tb(b))
        return self.fc2(F.relu(self.fc1(torch.cat([la, lb], 1)))), la, lb

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.parts(a, b)[0]


class TwoOutput(nn.Module):
    """One rotated digit -> (class logits [N, 10], angle [N, 1] in degrees / 45)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _trunk28()
        self.fc = nn.Linear(32 * 49, 64)
        self.cls, self.ang = nn.Linear(64, 10), nn.Linear(64, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc(self.trunk(x)))
        return self.cls(h), self.ang(h)
