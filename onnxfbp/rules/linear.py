"""Dense and convolutional layers: Gemm, MatMul, Conv.

Each is affine in its activation input, ``o = A(x) + b``, with ``A`` linear. The
proximal inverse

    x* = x0 + argmin_d ||A d - r||^2 + mu ||d||^2,     r = t - o0

is, for dense ``A d = d W`` (``W``: d_in x d_out), the Woodbury form solved in
the output dimension:

    d = r (W^T W + mu I)^-1 W^T

and for convolutions it is solved matrix-free by a few conjugate-gradient steps
on ``(A^T A + mu I) d = A^T r``, with ``A^T`` the transposed convolution
(col2im of the patch gradients). ``mu`` is scaled by the mean eigenvalue of
``A^T A`` so that one setting fits every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of

__all__ = [
    "ConvGeometry",
    "col2im",
    "conv_geometry",
    "conv_weight",
    "dense_weight",
    "im2col",
]


# --------------------------------------------------------------------------- dense


def dense_weight(node: NodeView) -> np.ndarray:
    """The effective ``W`` (d_in x d_out) of ``o = x W (+ b)`` for Gemm/MatMul."""
    if node.op_type == "Gemm":
        b = node.const(1)
        w = b.T if node.attr("transB", 0) else b
        return np.asarray(w * node.attr("alpha", 1.0))
    return np.asarray(node.const(1))


@register
class GemmRule(InverseRule):
    """Gemm ``o = alpha * x B' + beta * C`` and MatMul ``o = x W``.

    Inverse: ``x* = x0 + r (W^T W + mu s I)^-1 W^T`` with ``s = ||W||_F^2 / d_out``.
    Adjoint of the linear part: ``y W^T``.
    """

    op_types = ("Gemm", "MatMul")
    linear = True
    parametric = True

    def check(self, node: NodeView) -> str | None:
        if node.op_type == "Gemm" and node.attr("transA", 0):
            return "Gemm with transA=1 is not supported"
        if 1 not in node.static:
            return "second input (weights) must be constant"
        if node.static[1].ndim != 2:
            return "weights must be a 2-D matrix"
        return super().check(node)

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        out = self.apply_linear(node, xs[0])
        if node.op_type == "Gemm" and 2 in node.static:
            out = out + node.attr("beta", 1.0) * xp_of(out).asarray(node.const(2))
        return out

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        return x @ xp.asarray(dense_weight(node), dtype=x.dtype)

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        xp = xp_of(y)
        return y @ xp.asarray(dense_weight(node), dtype=y.dtype).T

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        w = xp.asarray(dense_weight(node), dtype=xp.float64)
        d_out = w.shape[1]
        gram = w.T @ w
        scale = float(xp.trace(gram)) / d_out or 1.0
        r = (t - o0).reshape(-1, d_out).astype(xp.float64)
        # r (W^T W + mu s I)^-1 W^T, solved in the output dimension.
        coef = xp.linalg.solve(gram + mu * scale * xp.eye(d_out), r.T).T
        dx = (coef @ w.T).reshape(xs[0].shape)
        return [xs[0] + dx.astype(xs[0].dtype)]


# --------------------------------------------------------------------------- conv


@dataclass(frozen=True)
class ConvGeometry:
    """Spatial geometry of a 2-D convolution or pooling window."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    group: int = 1

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        pt, pl, pb, pr = self.pads
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return oh, ow

    def adjoint_pads(self) -> tuple[int, int, int, int]:
        """Pads ``d (k - 1) - p`` (top, left, bottom, right) under which a stride-1
        convolution's ``J^T r`` is the correlation of ``r`` with the kernel flipped
        in space and its channel axes swapped."""
        (kh, kw), (dh, dw) = self.kernel, self.dilations
        pt, pl, pb, pr = self.pads
        return (dh * (kh - 1) - pt, dw * (kw - 1) - pl, dh * (kh - 1) - pb, dw * (kw - 1) - pr)


def conv_geometry(
    node: NodeView, in_hw: tuple[int, int], kernel: tuple[int, int], ceil_mode: bool = False
) -> ConvGeometry:
    """Resolve strides, dilations, explicit or ``auto_pad`` pads for a 2-D window op."""
    strides = tuple(node.attr("strides", [1, 1]))
    dilations = tuple(node.attr("dilations", [1, 1]))
    auto_pad = node.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads: list[int] = list(node.attr("pads", [0, 0, 0, 0]))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for axis in range(2):
            size, s, k, d = in_hw[axis], strides[axis], kernel[axis], dilations[axis]
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            before, after = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
            pads[axis], pads[axis + 2] = before, after
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    if ceil_mode:
        for axis in range(2):
            size, s, k, d = in_hw[axis], strides[axis], kernel[axis], dilations[axis]
            span = size + pads[axis] + pads[axis + 2] - d * (k - 1) - 1
            if span % s:
                out = -(-span // s) + 1
                # Pytorch/ONNX rule: the last window must start inside the input or left pad.
                if (out - 1) * s >= size + pads[axis]:
                    out -= 1
                needed = (out - 1) * s + d * (k - 1) + 1 - size - pads[axis]
                pads[axis + 2] = max(pads[axis + 2], needed)
    return ConvGeometry(
        kernel=(int(kernel[0]), int(kernel[1])),
        strides=(int(strides[0]), int(strides[1])),
        dilations=(int(dilations[0]), int(dilations[1])),
        pads=(int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])),
        group=int(node.attr("group", 1)),
    )


def _pad(x: Array, g: ConvGeometry, value: float = 0.0) -> Array:
    """``x`` (N, C, H, W) padded by ``g.pads`` with ``value``, always a new array
    (a filled array and one slice copy: half the time of ``numpy.pad`` here)."""
    xp = xp_of(x)
    pt, pl, pb, pr = g.pads
    n, c, h, w = x.shape
    out = xp.full((n, c, h + pt + pb, w + pl + pr), value, dtype=x.dtype)
    out[:, :, pt : pt + h, pl : pl + w] = x
    return out


def windows(x: Array, g: ConvGeometry, pad_value: float = 0.0) -> Array:
    """View of shape (N, C, oh, ow, kh, kw): every window of the padded input."""
    xp = xp_of(x)
    xpad = _pad(x, g, pad_value)
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    view = xp.lib.stride_tricks.sliding_window_view(xpad, (span_h, span_w), axis=(2, 3))
    oh, ow = g.out_size(x.shape[2], x.shape[3])
    return view[:, :, : oh * sh : sh, : ow * sw : sw, ::dh, ::dw]


def im2col(x: Array, g: ConvGeometry) -> Array:
    """Patches of shape (group, N*oh*ow, C/group*kh*kw), rows ordered (n, oh, ow)."""
    n, c = x.shape[:2]
    win = windows(x, g)  # N, C, oh, ow, kh, kw
    oh, ow = win.shape[2:4]
    cg = c // g.group
    win = win.reshape(n, g.group, cg, oh, ow, *g.kernel)
    cols = win.transpose(1, 0, 3, 4, 2, 5, 6)  # G, N, oh, ow, Cg, kh, kw
    return cols.reshape(g.group, n * oh * ow, cg * g.kernel[0] * g.kernel[1])


def col2im(cols: Array, x_shape: tuple[int, ...], g: ConvGeometry, oh: int, ow: int) -> Array:
    """Adjoint of :func:`im2col`: sum every patch entry back into its input pixel."""
    xp = xp_of(cols)
    n, c, h, w = x_shape
    cg = c // g.group
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    pt, pl, pb, pr = g.pads
    patches = cols.reshape(g.group, n, oh, ow, cg, kh, kw).transpose(1, 0, 4, 5, 6, 2, 3)
    patches = patches.reshape(n, c, kh, kw, oh, ow)
    out = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
            colsl = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            out[:, :, rows, colsl] += patches[:, :, i, j]
    return out[:, :, pt : pt + h, pl : pl + w]


def conv_weight(node: NodeView) -> np.ndarray:
    """Conv weights (C_out, C_in/group, kh, kw)."""
    return np.asarray(node.const(1))


@register
class ConvRule(InverseRule):
    """2-D Conv ``o = A x + b`` (any strides, pads, auto_pad, dilations, group).

    ``A x`` is im2col(x) @ W_g^T per group; ``A^T y`` is col2im(y_g @ W_g).
    Inverse: ``x* = x0 + d``, ``d`` from ``cg_steps`` conjugate-gradient steps on
    ``(A^T A + mu s I) d = A^T r`` with ``s = ||A||_F^2 / dim(x)``.
    """

    op_types = ("Conv",)
    linear = True
    parametric = True
    cg_steps = 4

    def check(self, node: NodeView) -> str | None:
        if 1 not in node.static:
            return "weights must be constant"
        if node.static[1].ndim != 4:
            return "only 2-D convolutions are supported"
        return super().check(node)

    def geometry(self, node: NodeView, x_shape: tuple[int, ...]) -> ConvGeometry:
        w = conv_weight(node)
        return conv_geometry(node, (x_shape[2], x_shape[3]), (w.shape[2], w.shape[3]))

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        out = self.apply_linear(node, xs[0])
        if 2 in node.static:
            out = out + xp_of(out).asarray(node.const(2)).reshape(1, -1, 1, 1)
        return out

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        g = self.geometry(node, x.shape)
        w = xp.asarray(conv_weight(node), dtype=x.dtype)
        cout = w.shape[0]
        wg = w.reshape(g.group, cout // g.group, -1)
        cols = im2col(x, g)
        out = xp.matmul(cols, wg.transpose(0, 2, 1))  # G, N*oh*ow, Cout/G
        oh, ow = g.out_size(x.shape[2], x.shape[3])
        out = out.reshape(g.group, x.shape[0], oh, ow, cout // g.group)
        return out.transpose(1, 0, 4, 2, 3).reshape(x.shape[0], cout, oh, ow)

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        """``A^T y``: one GEMM per group, ``W_g^T`` (C_in/g*kh*kw, C_out/g) times
        ``y_g`` laid out (C_out/g, N*oh*ow), gives every kernel tap's contribution
        at every output position; the taps are then summed back onto the input
        grid one (kh, kw) offset at a time, channels first (contiguous adds)."""
        xp = xp_of(y)
        g = self.geometry(node, x_shape)
        w = xp.asarray(conv_weight(node), dtype=y.dtype)
        cout, cg, kh, kw = w.shape
        n, _, oh, ow = y.shape
        yt = xp.ascontiguousarray(y.transpose(1, 0, 2, 3)).reshape(g.group, cout // g.group, -1)
        wg = w.reshape(g.group, cout // g.group, cg * kh * kw).transpose(0, 2, 1)
        taps = xp.matmul(wg, yt).reshape(g.group * cg, kh, kw, n, oh, ow)
        _, c, h, wd = x_shape
        (sh, sw), (dh, dw) = g.strides, g.dilations
        pt, pl, pb, pr = g.pads
        out = xp.zeros((c, n, h + pt + pb, wd + pl + pr), dtype=y.dtype)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                out[:, :, rows, cols] += taps[:, i, j]
        return xp.ascontiguousarray(out.transpose(1, 0, 2, 3)[:, :, pt : pt + h, pl : pl + wd])

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        x0 = xs[0]
        w = conv_weight(node)
        oh, ow = t.shape[2:]
        # mean eigenvalue of A^T A: ||A||_F^2 / dim(x), ignoring border effects.
        frob = float((w.astype(np.float64) ** 2).sum()) * oh * ow
        scale = frob / (x0.shape[1] * x0.shape[2] * x0.shape[3]) or 1.0
        damp = mu * scale
        shape = tuple(x0.shape)
        r = (t - o0).astype(xp.float32)
        b = self.adjoint(node, r, shape)

        def normal_op(v: Array) -> Array:
            return self.adjoint(node, self.apply_linear(node, v), shape) + damp * v

        d = xp.zeros_like(b)
        res = b.copy()
        p = res.copy()
        rs = float((res * res).sum())
        for _ in range(self.cg_steps):
            if rs <= 1e-30:
                break
            ap = normal_op(p)
            alpha = rs / max(float((p * ap).sum()), 1e-30)
            d += alpha * p
            res -= alpha * ap
            rs_new = float((res * res).sum())
            p = res + (rs_new / rs) * p
            rs = rs_new
        return [x0 + d.astype(x0.dtype)]
