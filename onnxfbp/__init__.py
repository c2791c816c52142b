"""onnxfbp: refine an exported ONNX classifier with new labelled data by
feature-level reverse propagation (targets reconstructed from labels, then
block-wise regularized least squares), without its training code.

Typical use::

    from onnxfbp import refine, evaluate
    result = refine("model.onnx", "refined.onnx", x_adapt, y_adapt)
    print(result.heldout_before.accuracy, "->", result.heldout_after.accuracy)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .data import LabelledData, from_arrays, load_data  # noqa: E402
from .errors import (  # noqa: E402
    DataError,
    GateError,
    ModelError,
    OnnxfbpError,
    OutputError,
    UnsupportedModelError,
)
from .refine import (  # noqa: E402
    EvalResult,
    LayerReport,
    RefineConfig,
    Refiner,
    RefineResult,
    evaluate,
    refine,
)

__all__ = [
    "DataError",
    "EvalResult",
    "GateError",
    "LabelledData",
    "LayerReport",
    "ModelError",
    "OnnxfbpError",
    "OutputError",
    "RefineConfig",
    "RefineResult",
    "Refiner",
    "UnsupportedModelError",
    "__version__",
    "evaluate",
    "from_arrays",
    "load_data",
    "refine",
]
