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

A MatMul of two activations ``A B`` (attention's ``Q K^T`` and ``P V``) is no
layer: it has no inverse, only its reverse step ``r B^T`` to ``A`` and ``A^T r``
to ``B``.

Reverse steps ``J^T r``: dense ``alpha r B`` (transB) or ``alpha r B^T``; Conv
``A^T r``, the transposed convolution (ONNX: ``ConvTranspose(r, W)`` with the
same geometry and ``output_padding`` restoring the input size; on the CPU with
stride 1, one group and 16 or more input channels a ``Conv`` of ``r`` with ``W``
flipped in space and its channel axes swapped, padded by ``d (k - 1) - p``).
At a few input positions only (:meth:`ConvRule.sparse_vjp`), stride 1 and one
group: ``J^T r [n, c, i, j] = sum_{o, a, b} W[o, c, a, b] r[n, o, i + p_t - a d_h,
j + p_l - b d_w]``, one im2col row of ``r`` in the transposed geometry per position
times the flipped, channel-swapped ``W``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import Array, InverseRule, NodeView, decode, register, unbroadcast, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

__all__ = [
    "WINDOW_DEFAULTS",
    "ConvGeometry",
    "col2im",
    "conv_geometry",
    "conv_weight",
    "dense_weight",
    "gather_patches",
    "im2col",
    "transposed_conv",
]

# ONNX defaults of a 2-D window (Conv, MaxPool, AveragePool)
WINDOW_DEFAULTS: dict[str, Any] = {
    "strides": [1, 1], "dilations": [1, 1], "pads": [0, 0, 0, 0], "auto_pad": "NOTSET",
}

# onnxruntime's CPU ConvTranspose (a product, then col2im) against the same adjoint as
# a Conv (its NCHWc kernels), 250 samples of 14x14 to 32x32, 2 cores: ConvTranspose is
# 1.3-3x slower where the forward Conv has 16 or more input channels (the adjoint's
# output channels), and up to 3x faster where it has 1-8.
CONV_FORM_MIN_CHANNELS = 16


# --------------------------------------------------------------------------- dense


def dense_weight(node: NodeView) -> np.ndarray:
    """The effective ``W`` (d_in x d_out) of ``o = x W (+ b)`` for Gemm/MatMul."""
    if node.op_type == "Gemm":
        b = node.const(1)
        w = b.T if node.attr("transB") else b
        return np.asarray(w * node.attr("alpha"))
    return np.asarray(node.const(1))


@register
class GemmRule(InverseRule):
    """Gemm ``o = alpha * x B' + beta * C`` and MatMul ``o = x W``.

    Inverse: ``x* = x0 + r (W^T W + mu s I)^-1 W^T`` with ``s = ||W||_F^2 / d_out``.
    Adjoint of the linear part: ``y W^T``.
    """

    op_types = ("Gemm", "MatMul")
    defaults = {"Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}}
    linear = True
    parametric = True

    def check(self, node: NodeView) -> str | None:
        if _bilinear(node):
            return None  # MatMul of two activations (attention): its vjp
        if node.op_type == "Gemm" and node.attr("transA"):
            return "Gemm with transA=1 is not supported"
        if 1 not in node.static:
            return "second input (weights) must be constant"
        if node.static[1].ndim != 2:
            return "weights must be a 2-D matrix"
        return super().check(node)

    def check_inverse(self, node: NodeView) -> str | None:
        return "MatMul of two activations is not invertible here" if _bilinear(node) else None

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        return (0, 1) if _bilinear(node) else (0,)

    def vjp(self, node: NodeView, r: Array, xs: Sequence[Array], o0: Array) -> list[Array]:
        """``A B``: ``r B^T`` to ``A`` and ``A^T r`` to ``B`` (last two axes; summed
        over the batch axes an operand was broadcast along); else the adjoint."""
        if not _bilinear(node):
            return super().vjp(node, r, xs, o0)
        xp = xp_of(r)
        a, b = (xp.asarray(x, dtype=r.dtype) for x in xs)
        da = r @ xp.swapaxes(b, -1, -2)
        db = xp.swapaxes(a, -1, -2) @ r
        return [unbroadcast(d, tuple(x.shape), xp.sum).astype(x.dtype, copy=False)
                for d, x in ((da, xs[0]), (db, xs[1]))]

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        if _bilinear(node):
            return xs[0] @ xs[1]
        out = self.apply_linear(node, xs[0])
        if node.op_type == "Gemm" and 2 in node.static:
            out = out + node.attr("beta") * xp_of(out).asarray(node.const(2))
        return out

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        return x @ xp.asarray(dense_weight(node), dtype=x.dtype)

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        xp = xp_of(y)
        return y @ xp.asarray(dense_weight(node), dtype=y.dtype).T

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        if _bilinear(node):
            out_shape = b.shape(o)
            if min(len(b.shape(x)) for x in xs) < 2:
                return None  # a vector operand: no last-two-axes transpose
            ta, tb = (b.op("Transpose", [b.act(x)], perm=_swap_last(len(b.shape(x))))
                      for x in xs)
            da = b.op("MatMul", [r, tb])
            db = b.op("MatMul", [ta, r])
            return [b.unbroadcast(da, _with_dims(out_shape, b.shape(xs[0])), b.shape(xs[0])),
                    b.unbroadcast(db, _with_dims(out_shape, b.shape(xs[1])), b.shape(xs[1]))]
        w = b.static(1)
        gemm = node.op_type == "Gemm"
        if gemm and node.attr("transA"):
            return None
        if not (gemm and node.attr("transB")):
            w = b.op("Transpose", [w], perm=[1, 0])
        dx = b.op("MatMul", [r, w])
        alpha = float(node.attr("alpha")) if gemm else 1.0
        return [dx if alpha == 1.0 else b.op("Mul", [dx, b.const(alpha)])]

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


def _bilinear(node: NodeView) -> bool:
    """A MatMul of two activations."""
    return node.op_type == "MatMul" and tuple(node.dynamic) == (0, 1)


def _swap_last(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def _with_dims(out_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of an operand's residual before un-broadcasting: the output's batch
    axes and the operand's own last two."""
    return (*out_shape[:-2], *x_shape[-2:])


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
    strides = tuple(node.attr("strides"))
    dilations = tuple(node.attr("dilations"))
    auto_pad = decode(node.attr("auto_pad"))
    pads: list[int] = list(node.attr("pads"))
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
        group=int(node.attr("group")) if node.op_type == "Conv" else 1,
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


def _patch_offsets(
    chw: tuple[int, int, int], g: ConvGeometry, keep: np.ndarray, out_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Where the im2col rows of the output positions ``keep`` (flat indices into the
    ``out_hw`` grid) read an input of shape (C, H, W): flat offsets (P, C, kh, kw)
    and whether each tap is inside the input, not in the padding (P, kh, kw);
    a tap in the padding reads a clipped offset, to be zeroed."""
    c, h, w = chw
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    pt, pl = g.pads[:2]
    rows = ((keep // out_hw[1]) * sh - pt)[:, None] + dh * np.arange(kh)  # P, kh
    cols = ((keep % out_hw[1]) * sw - pl)[:, None] + dw * np.arange(kw)  # P, kw
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    offsets = (
        np.arange(c)[None, :, None, None] * (h * w)
        + np.clip(rows, 0, h - 1)[:, None, :, None] * w
        + np.clip(cols, 0, w - 1)[:, None, None, :]
    )
    return offsets, inside


def gather_patches(
    x: Array, g: ConvGeometry, keep: np.ndarray, out_hw: tuple[int, int]
) -> Array:
    """The im2col patches of ``x`` (N, C, H, W) at the output positions ``keep``
    (flat indices into the ``out_hw`` grid): (N, len(keep), C, kh * kw).

    One ``take`` of flat offsets (:func:`_patch_offsets`). Taps in the padding
    read a zero appended to each sample: one copy of ``x`` rather than a mask
    multiplied into the (larger) gathered patches (the shared CNN's conv2 rows
    at 48 positions, 100 samples: 5.4 -> 5.0 ms; conv1's kept branch 8.5 -> 7.6 ms)."""
    xp = xp_of(x)
    n, c, h, w = x.shape
    offsets, inside = _patch_offsets((c, h, w), g, keep, out_hw)
    flat = x.reshape(n, -1)
    if not inside.all():
        offsets = np.where(inside[:, None], offsets, c * h * w)
        flat = xp.concatenate([flat, xp.zeros((n, 1), dtype=x.dtype)], axis=1)
    picked = xp.take(flat, xp.asarray(offsets.reshape(-1)), axis=1)
    return picked.reshape(n, len(keep), c, -1)


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
    defaults = {"Conv": {**WINDOW_DEFAULTS, "group": 1}}
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

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x_shape = b.shape(xs[0])
        g = self.geometry(node, x_shape)
        (kh, kw), (dh, dw) = g.kernel, g.dilations
        pads = list(g.adjoint_pads())
        if (b.provider == "CPUExecutionProvider" and g.group == 1 and tuple(g.strides) == (1, 1)
                and x_shape[1] >= CONV_FORM_MIN_CHANNELS and min(pads) >= 0):
            # stride 1: the correlation of r with the kernel flipped in space and its two
            # channel axes swapped, padded by d (k - 1) - p on each side
            swapped = b.op("Transpose", [b.static(1)], perm=[1, 0, 2, 3])
            flipped = b.op("Slice", [swapped, b.const([-1, -1], np.int64),
                                     b.const([-(2**63), -(2**63)], np.int64),
                                     b.const([2, 3], np.int64), b.const([-1, -1], np.int64)])
            return [b.op("Conv", [r, flipped], kernel_shape=[kh, kw], dilations=[dh, dw],
                         pads=pads)]
        return transposed_conv(b, r, b.static(1), g, x_shape, b.shape(o), g.group)

    def sparse_check(self, node: NodeView, x_shape: tuple[int, ...]) -> str | None:
        if 1 not in node.static:
            return "weights must be constant"
        g = self.geometry(node, x_shape)
        return None if g.group == 1 and tuple(g.strides) == (1, 1) else "strides or groups"

    def sparse_vjp(
        self, node: NodeView, r: Array, pos: np.ndarray, grid: tuple[int, int],
        fwd: Array | None,
    ) -> Array:
        """``r`` is the whole output residual (N, O, H', W'): one im2col row of it per
        distinct position in the transposed geometry, times the flipped kernel."""
        xp = xp_of(r)
        w = xp.asarray(conv_weight(node), dtype=r.dtype)  # (O, C, kh, kw)
        g = self.geometry(node, (0, 0, *grid))
        transposed = ConvGeometry(g.kernel, (1, 1), g.dilations, g.adjoint_pads())
        c, n = w.shape[1], r.shape[0]
        landed, spread = np.unique(pos, return_inverse=True)  # one row per position
        patches = gather_patches(r, transposed, landed, grid)  # N, U, O, k k
        flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)  # C, (O k k)
        d = (patches.reshape(n * len(landed), -1) @ flipped.T).reshape(n, len(landed), c)
        return xp.take(d.transpose(0, 2, 1), xp.asarray(spread.reshape(-1)), axis=2)

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


def transposed_conv(
    b: AdjointBuilder, r: str, w: str, g: ConvGeometry, x_shape: tuple[int, ...],
    o_shape: tuple[int, ...], group: int,
) -> list[str] | None:
    """``ConvTranspose(r, w)`` with the window geometry ``g``, ``output_padding``
    restoring the input size; None where that needs more than ONNX allows
    (``ceil_mode`` windows reaching past the padding)."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    oh, ow = o_shape[2:]
    pt, pl, pb, pr = g.pads
    extra = [
        x_shape[2] - ((oh - 1) * sh + (kh - 1) * dh + 1 - pt - pb),
        x_shape[3] - ((ow - 1) * sw + (kw - 1) * dw + 1 - pl - pr),
    ]
    if not all(0 <= e < max(s, d) for e, s, d in zip(extra, (sh, sw), (dh, dw), strict=True)):
        return None
    return [
        b.op(
            "ConvTranspose", [r, w], kernel_shape=[kh, kw], strides=[sh, sw],
            dilations=[dh, dw], pads=[pt, pl, pb, pr], group=group, output_padding=extra,
        )
    ]
