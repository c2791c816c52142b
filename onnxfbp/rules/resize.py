"""Resize and Upsample (nearest and linear, on the last two axes).

Both interpolate each resized axis separately, so the op is linear:
``o = M_h x M_w^T`` over the last two axes, with ``M_a`` (out_a x in_a) the
interpolation matrix of axis ``a``: nearest puts one 1 per row (the source index
from the coordinate transformation and ``nearest_mode``), linear two weights
``1 - f`` and ``f`` at ``floor(x)`` and ``floor(x) + 1`` (the source coordinate
``x`` clamped to ``[0, in - 1]``). Coordinate transformations: half_pixel,
pytorch_half_pixel, align_corners, asymmetric, tf_half_pixel_for_nn; Upsample
(opset 7-9) is asymmetric with floor for nearest.

The scale of an axis is the ``scales`` input where given, else
``out / in`` from the shapes at run time (a ``sizes`` input computed from the
input's shape needs no constant).

Reverse step ``J^T r = M_h^T r M_w`` (ONNX: two MatMuls with constant
matrices). No inverse here: the sweep schedules stop at a Resize. Cubic
interpolation, ``tf_crop_and_resize``, antialiasing, ``axes`` and aspect-ratio
policies are declined by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, decode, register, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
          "tf_half_pixel_for_nn")


def _scales_index(node: NodeView) -> int:
    return 1 if node.op_type == "Upsample" or node.opset < 11 else 2


def _source(mode: str, out: int, size: int, scale: float) -> np.ndarray:
    """Source coordinate of each output index along one axis."""
    i = np.arange(out, dtype=np.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if mode == "align_corners":
        return i * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    if mode == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    return i / scale  # asymmetric


def _nearest(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    if mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    return np.ceil(x - 0.5)  # round_prefer_floor


def interpolation_matrix(node: NodeView, axis: int, size: int, out: int) -> np.ndarray:
    """``M`` (out x size) of one axis (``axis`` counted in the input's rank)."""
    upsample = node.op_type == "Upsample" or node.opset < 11
    mode = decode(node.attr("mode"))
    transform = "asymmetric" if upsample else decode(node.attr("coordinate_transformation_mode"))
    scale = out / size
    scales = node.static.get(_scales_index(node))
    if scales is None and upsample:
        scales = node.attrs.get("scales")
    if scales is not None and np.asarray(scales).size:
        scale = float(np.asarray(scales, dtype=np.float64).ravel()[axis])
    src = _source(transform, out, size, scale)
    m = np.zeros((out, size))
    rows = np.arange(out)
    if mode == "nearest":
        near = "floor" if upsample else decode(node.attr("nearest_mode"))
        m[rows, np.clip(_nearest(src, near), 0, size - 1).astype(np.int64)] = 1.0
        return m
    src = np.clip(src, 0, size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    frac = src - lo
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


@register
class ResizeRule(InverseRule):
    """Resize / Upsample, nearest or linear, resizing only the last two axes."""

    op_types = ("Resize", "Upsample")
    defaults = {
        "Resize": {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                   "nearest_mode": "round_prefer_floor", "antialias": 0, "axes": None,
                   "keep_aspect_ratio_policy": "stretch", "cubic_coeff_a": -0.75,
                   "exclude_outside": 0, "extrapolation_value": 0.0},
        "Upsample": {"mode": "nearest"},
    }
    linear = True

    def check(self, node: NodeView) -> str | None:
        mode = decode(node.attr("mode"))
        if mode not in ("nearest", "linear", "bilinear"):
            return f"Resize mode {mode!r} is not supported (nearest and linear are)"
        if node.op_type == "Resize":
            transform = decode(node.attr("coordinate_transformation_mode"))
            if transform not in _MODES:
                return f"coordinate_transformation_mode {transform!r} is not supported"
            if node.attr("antialias") or node.attr("axes") \
                    or decode(node.attr("keep_aspect_ratio_policy")) != "stretch":
                return "antialias, axes or keep_aspect_ratio_policy is not supported"
        return None  # roi, scales and sizes only shape the maps: no residual to them

    def data_inputs(self, node: NodeView) -> tuple[int, ...]:
        return (0,)

    def _matrices(
        self, node: NodeView, x_shape: tuple[int, ...], o_shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        rank = len(x_shape)
        if any(a != b for a, b in zip(x_shape[:-2], o_shape[:-2], strict=True)) or rank < 2:
            raise node.missing("form resizing an axis before the last two")
        mh = interpolation_matrix(node, rank - 2, x_shape[-2], o_shape[-2])
        mw = interpolation_matrix(node, rank - 1, x_shape[-1], o_shape[-1])
        return mh, mw

    def _out_shape(self, node: NodeView, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        sizes = node.static.get(3)
        if sizes is not None and np.asarray(sizes).size:
            return tuple(int(s) for s in np.asarray(sizes).ravel())
        scales = node.static.get(_scales_index(node))
        if (scales is None or not np.asarray(scales).size) and node.op_type == "Upsample":
            scales = node.attrs.get("scales")
        s = np.asarray(scales, dtype=np.float64).ravel()
        return tuple(int(np.floor(d * f)) for d, f in zip(x_shape, s, strict=True))

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        return self.apply_linear(node, xs[0])

    def apply_linear(self, node: NodeView, x: Array) -> Array:
        xp = xp_of(x)
        mh, mw = self._matrices(node, tuple(x.shape), self._out_shape(node, tuple(x.shape)))
        return (xp.asarray(mh, dtype=x.dtype) @ x @ xp.asarray(mw.T, dtype=x.dtype))

    def adjoint(self, node: NodeView, y: Array, x_shape: tuple[int, ...]) -> Array:
        xp = xp_of(y)
        mh, mw = self._matrices(node, x_shape, tuple(y.shape))
        return xp.asarray(mh.T, dtype=y.dtype) @ y @ xp.asarray(mw, dtype=y.dtype)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        mh, mw = self._matrices(node, b.shape(xs[0]), b.shape(o))
        return [b.op("MatMul", [b.op("MatMul", [b.const(mh.T), r]), b.const(mw)])]
