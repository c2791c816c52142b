"""onnxfbp: refine an exported ONNX classifier with new labelled data by
feature-level reverse propagation (targets reconstructed from labels, then
block-wise regularized least squares), without its training code.

Typical use::

    from onnxfbp import refine, evaluate
    result = refine("model.onnx", "refined.onnx", x_adapt, y_adapt)
    print(result.heldout_before.accuracy, "->", result.heldout_after.accuracy)
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# OpenBLAS threads spin for 2**28 cycles after every call by default and take the
# cores the next onnxruntime run needs (rot benchmark on 2 cores, default shell:
# 8.9 s, with this 7.6 s). Effective when NumPy is not loaded yet (the command
# line); a value already set is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from ._early import install as _install_early_signal_handlers  # noqa: E402

_install_early_signal_handlers()  # console script: a signal during the imports exits 130

from .config import RefineConfig  # noqa: E402
from .data import LabelledData, from_arrays, load_data  # noqa: E402
from .errors import (  # noqa: E402
    DataError,
    GateError,
    ModelError,
    OnnxfbpError,
    OutputError,
    UnsupportedModelError,
)
from .output.results import EvalResult, LayerReport, RefineResult  # noqa: E402
from .refine import evaluate, refine  # noqa: E402
from .schedules.state import ModelState  # noqa: E402

__all__ = [
    "DataError",
    "EvalResult",
    "GateError",
    "LabelledData",
    "LayerReport",
    "ModelError",
    "ModelState",
    "OnnxfbpError",
    "OutputError",
    "RefineConfig",
    "RefineResult",
    "UnsupportedModelError",
    "__version__",
    "evaluate",
    "from_arrays",
    "load_data",
    "refine",
]
