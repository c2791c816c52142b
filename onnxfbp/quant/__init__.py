"""Quantized (QDQ) models: refine the float weights behind ``DequantizeLinear``
and write them back as integers (:mod:`.qdq`), round with the layer's Gram
(:mod:`.rounding`), recover from a float teacher (:mod:`.teacher`)."""

from .qdq import QuantMap, QuantWeight, float_view

__all__ = ["QuantMap", "QuantWeight", "float_view"]
