"""2-D ConvTranspose: a pass-through op of the default schedule and a refinable layer.

``ConvTranspose(x, W)`` (``W``: C_in x C_out/g x kh x kw, strides ``s``, pads
``p``, dilations ``d``, ``output_padding`` ``q``) is the adjoint of the Conv with
the same ``W`` (read as C_out_conv = C_in) and geometry, on an output of size
``s (H - 1) + q + d (k - 1) + 1 - p_begin - p_end``. So its forward is
:meth:`ConvRule.adjoint` and its reverse step ``J^T r`` is that Conv's forward
(ONNX: ``Conv(r, W)``, same attributes).

As a layer (one group) it equals a stride-1 Conv over the input dilated by ``s``
(``s - 1`` zeros between entries) and padded by ``d (k - 1) - p_begin`` before and
``d (k - 1) - p_end + q`` after (cropped where negative), with the kernel
flipped in space and its two channel axes swapped:
``W_conv[o, c, i, j] = W[c, o, k_h - 1 - i, k_w - 1 - j]``. Its least-squares rows
are the im2col patches of that input (:func:`as_conv`); the refined kernel is
written back in ConvTranspose layout. A ConvTranspose with several groups
passes targets but is not refined (:mod:`onnxfbp.graph.plan` says so).

No inverse here: the sweep schedules stop at a ConvTranspose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, decode, register, xp_of
from .linear import WINDOW_DEFAULTS, ConvGeometry, ConvRule

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

__all__ = ["ConvTransposeRule", "as_conv", "from_conv_kernel", "to_conv_kernel"]

_CONV = ConvRule()


def _conv_view(node: NodeView) -> NodeView:
    """The Conv whose adjoint this ConvTranspose is."""
    attrs = {k: node.attr(k) for k in ("strides", "pads", "dilations", "group")}
    return NodeView("Conv", node.name, attrs, {1: node.const(1)}, (0,), 2, node.opset)


def _out_size(node: NodeView, x_shape: tuple[int, ...]) -> tuple[int, ...]:
    w = np.asarray(node.const(1))
    (sh, sw), (dh, dw) = node.attr("strides"), node.attr("dilations")
    pt, pl, pb, pr = node.attr("pads")
    qh, qw = node.attr("output_padding")
    n, _, h, wd = x_shape
    oh = sh * (h - 1) + qh + dh * (w.shape[2] - 1) + 1 - pt - pb
    ow = sw * (wd - 1) + qw + dw * (w.shape[3] - 1) + 1 - pl - pr
    return (n, w.shape[1] * int(node.attr("group")), oh, ow)


@register
class ConvTransposeRule(InverseRule):
    """2-D ConvTranspose with constant weights (any strides, pads, dilations,
    output_padding below the stride, groups; explicit pads)."""

    op_types = ("ConvTranspose",)
    defaults = {"ConvTranspose": {**WINDOW_DEFAULTS, "group": 1, "output_padding": [0, 0],
                                  "output_shape": None}}
    linear = True
    parametric = True

    def check(self, node: NodeView) -> str | None:
        if 1 not in node.static:
            return "weights must be constant"
        if np.asarray(node.static[1]).ndim != 4:
            return "only 2-D transposed convolutions are supported"
        if decode(node.attr("auto_pad")) not in ("NOTSET", "VALID") or node.attr("output_shape"):
            return "auto_pad SAME_* or output_shape is not supported (explicit pads only)"
        if any(int(q) >= int(s) for q, s in
               zip(node.attr("output_padding"), node.attr("strides"), strict=True)):
            return "output_padding at or above the stride is not supported"
        return super().check(node)

    def _view(self, node: NodeView) -> NodeView:
        if decode(node.attr("auto_pad")) == "VALID":
            attrs = {**node.attrs, "pads": [0, 0, 0, 0], "auto_pad": "NOTSET"}
            node = NodeView(node.op_type, node.name, attrs, node.static, node.dynamic,
                            node.n_inputs, node.opset)
        return node

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        out = self.apply_linear(node, xs[0])
        if 2 in node.static:
            out = out + xp_of(out).asarray(node.const(2), dtype=out.dtype).reshape(1, -1, 1, 1)
        return out

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        node = self._view(node)
        return _CONV.adjoint(_conv_view(node), x, _out_size(node, tuple(x.shape)))

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        return _CONV.apply_linear(_conv_view(self._view(node)), y)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        node = self._view(node)
        w = np.asarray(node.const(1))
        return [b.op("Conv", [r, b.static(1)], kernel_shape=list(w.shape[2:]),
                     strides=list(node.attr("strides")), pads=list(node.attr("pads")),
                     dilations=list(node.attr("dilations")), group=int(node.attr("group")))]


def to_conv_kernel(w: np.ndarray) -> np.ndarray:
    """ConvTranspose kernel (C_in, C_out, kh, kw) -> the equivalent stride-1 Conv's
    (C_out, C_in, kh, kw): flipped in space, channel axes swapped (one group)."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def from_conv_kernel(w: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_conv_kernel`."""
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def as_conv(node: NodeView, x: Array) -> tuple[Array, ConvGeometry]:
    """The input of the stride-1 Conv equal to this ConvTranspose (one group): ``x``
    dilated by the strides and padded (cropped) as in the module docstring, and
    that Conv's geometry (no further padding)."""
    xp = xp_of(x)
    node = ConvTransposeRule()._view(node)
    w = np.asarray(node.const(1))
    kh, kw = w.shape[2:]
    (sh, sw), (dh, dw) = node.attr("strides"), node.attr("dilations")
    pt, pl, pb, pr = node.attr("pads")
    qh, qw = node.attr("output_padding")
    n, c, h, wd = x.shape
    before = (dh * (kh - 1) - pt, dw * (kw - 1) - pl)
    after = (dh * (kh - 1) - pb + qh, dw * (kw - 1) - pr + qw)
    full_h = sh * (h - 1) + 1 + max(before[0], 0) + max(after[0], 0)
    full_w = sw * (wd - 1) + 1 + max(before[1], 0) + max(after[1], 0)
    out = xp.zeros((n, c, full_h, full_w), dtype=x.dtype)
    top, left = max(before[0], 0), max(before[1], 0)
    out[:, :, top : top + sh * (h - 1) + 1 : sh, left : left + sw * (wd - 1) + 1 : sw] = x
    crop_t, crop_l = max(-before[0], 0), max(-before[1], 0)
    crop_b, crop_r = max(-after[0], 0), max(-after[1], 0)
    out = out[:, :, crop_t : full_h - crop_b, crop_l : full_w - crop_r]
    geometry = ConvGeometry((int(kh), int(kw)), (1, 1), (int(dh), int(dw)), (0, 0, 0, 0), 1)
    return out, geometry
