"""A quantized layer's grid in the solver's layout (``(groups, d, k)``, bias row
last), for rounding with the layer's Gram (:mod:`.rounding`).

For weight ``W`` stored as ``(q - zp) * s`` and a bias stored likewise (int32,
its own scale), :func:`layer_grid` gives, entry by entry of the solver's block,
the scale, the zero point and the integer range of the row, so that a rounding
of the block ``B`` onto ``(q - zero) * scale`` with ``lo <= q <= hi`` is a
rounding of the stored integers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..fit.layers import LayerBlock
from ..graph.plan import Layer
from .qdq import QuantWeight

__all__ = ["LayerGrid", "layer_grid"]


@dataclass
class LayerGrid:
    layout: Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # (W, b) -> block
    scale: np.ndarray  # (groups, d, k)
    zero: np.ndarray
    lo: np.ndarray  # (d,)
    hi: np.ndarray


def layer_grid(layer: Layer, block: LayerBlock, qw: QuantWeight, bias_q: QuantWeight | None,
               bias_shape: tuple[int, ...] | None) -> LayerGrid | None:
    """The grid of ``layer``'s block, or None where it has none (a Gemm with alpha or
    beta other than 1, or a bias row whose bias is not quantized)."""
    if layer.op == "Gemm" and (float(block.view.attr("alpha")) != 1.0
                               or float(block.view.attr("beta")) != 1.0):
        return None
    if block.has_bias_row and (bias_q is None or bias_shape is None):
        return None

    def layout(w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        view = dataclasses.replace(block.view, static={**block.view.static, 1: w})
        return np.asarray(LayerBlock(layer, view, b if block.has_bias_row else None,
                                     None).weights())

    def spread(a: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(a, shape).astype(np.float64)

    has_b = block.has_bias_row and bias_q is not None and bias_shape is not None
    scale = layout(spread(qw._expand(qw.scale), qw.shape),
                   spread(bias_q._expand(bias_q.scale), bias_shape)
                   if has_b and bias_q is not None and bias_shape else None)
    zero = layout(spread(qw._expand(qw.zero_point), qw.shape),
                  spread(bias_q._expand(bias_q.zero_point), bias_shape)
                  if has_b and bias_q is not None and bias_shape else None)
    d = scale.shape[1]
    lo = np.full(d, qw.qrange[0], np.float64)
    hi = np.full(d, qw.qrange[1], np.float64)
    if has_b and bias_q is not None:
        lo[-1], hi[-1] = bias_q.qrange
    return LayerGrid(layout, scale, zero, lo, hi)
