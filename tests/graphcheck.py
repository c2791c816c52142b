"""Assertion helper: two ONNX files differ only in initializer values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def changed_initializers(original: Path | str, refined: Path | str) -> list[str]:
    """Names of initializers whose values differ; AssertionError if anything else does.

    Compared: nodes (op, name, inputs, outputs, attributes, domain), graph inputs,
    outputs, opsets, IR version, producer, initializer names, dtypes and shapes.
    """
    a = onnx.load(str(original))
    b = onnx.load(str(refined))
    assert a.ir_version == b.ir_version
    assert list(a.opset_import) == list(b.opset_import)
    assert (a.producer_name, a.producer_version) == (b.producer_name, b.producer_version)
    assert list(a.graph.node) == list(b.graph.node), "nodes differ"
    assert list(a.graph.input) == list(b.graph.input), "graph inputs differ"
    assert list(a.graph.output) == list(b.graph.output), "graph outputs differ"
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    changed = []
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        va, vb = numpy_helper.to_array(ta), numpy_helper.to_array(tb)
        assert va.dtype == vb.dtype and va.shape == vb.shape, ta.name
        assert np.isfinite(vb).all() if vb.dtype.kind == "f" else True, ta.name
        if not np.array_equal(va, vb):
            changed.append(ta.name)
    return changed
