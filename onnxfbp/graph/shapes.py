"""Index inputs computed from the input's shape: Slice bounds, Split sizes...

Exporters with a symbolic batch write some index inputs as small graphs on
``Shape`` (torch's legacy exporter: ``chunk`` as ``Slice`` with
``starts = Shape(x)[-1] // 3 * k``). Such a value depends only on the shapes of
activations; where it does not depend on the batch size it is a constant of the
model, and the op's rule may use it.

:func:`shape_constants` finds the tensors computed from ``Shape`` / ``Size``
nodes and constants only that feed an index input (not the data input) of an op
whose rule reads that input's value, runs the model once on zeros with batch 1
and once with batch 2 (onnxruntime, CPU), and returns those whose values agree.
A model whose input has a symbolic dimension besides the batch, or that
onnxruntime does not run on zeros, gets none (the walk then names the op as a
boundary, as before).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["shape_constants"]

# ops whose rule reads these input indices' values (the rest only shape the data)
_READS = {"Slice": (1, 2, 3, 4), "Split": (1,), "Tile": (1,), "Pad": (1, 2, 3),
          "Gather": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceL2": (1,),
          "ReduceMax": (1,), "Where": (0,), "Squeeze": (1,), "Unsqueeze": (1,)}


def _derived(nodes: list[gs.Node], static: set[str]) -> set[str]:
    """Tensors computed from Shape / Size outputs and constants only."""
    derived: set[str] = set()
    for node in nodes:  # topological order
        names = [t.name for t in node.inputs if t.name]
        from_shape = node.op in ("Shape", "Size")
        if from_shape or (names and any(n in derived for n in names)
                          and all(n in derived or n in static for n in names)):
            derived.update(t.name for t in node.outputs)
    return derived


def shape_constants(
    model: onnx.ModelProto, nodes: list[gs.Node], static: set[str], input_tensor: gs.Tensor
) -> dict[str, np.ndarray]:
    """Batch-independent values of the shape-derived index inputs (see the module
    docstring); empty where there are none or they cannot be evaluated."""
    derived = _derived(nodes, static)
    wanted = sorted({
        node.inputs[i].name for node in nodes if node.op in _READS
        for i in _READS[node.op]
        if i < len(node.inputs) and node.inputs[i].name in derived
    })
    if not wanted:
        return {}
    dims = list(input_tensor.shape or [])
    symbolic = [k for k, d in enumerate(dims) if not isinstance(d, int)]
    if len(symbolic) > 1 or symbolic not in ([], [0]):
        return {}
    runs = [_run(model, input_tensor, dims, batch, wanted) for batch in (1, 2)]
    if runs[0] is None or runs[1] is None:
        return {}
    if not symbolic:  # a fixed batch: the one run's values
        return runs[0]
    return {n: v for n, v in runs[0].items()
            if v.shape == runs[1][n].shape and np.array_equal(v, runs[1][n])}


def _run(
    model: onnx.ModelProto, input_tensor: gs.Tensor, dims: list[object], batch: int,
    wanted: list[str],
) -> dict[str, np.ndarray] | None:
    import onnxruntime as ort  # noqa: PLC0415

    shape = [batch if not isinstance(d, int) else d for d in dims]
    dtype = input_tensor.dtype if input_tensor.dtype is not None else np.float32
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in known)
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        got = session.run(wanted, {input_tensor.name: np.zeros(shape, dtype=dtype)})
    except Exception:  # noqa: BLE001 (a probe: without it the ops stay boundaries)
        return None
    return {n: np.asarray(v) for n, v in zip(wanted, got, strict=True)}
