"""The trained outputs of a graph: which output, the tensor its target is set on
(the input of a final monotone activation) and its kind and class count.

- ``[N, C]`` outputs: ``C`` classes (or values); ``[N, C, d1..]`` outputs: ``C``
  classes per position (dense) on axis 1;
- without ``--output-name`` / ``--target`` the first float ``[N, C]`` output,
  else the first float output.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedModelError

__all__ = ["score_output"]

# Monotone output activations: the label target is set on their input (same argmax).
_OUTPUT_ACTIVATIONS = {
    "Softmax": "probabilities",
    "LogSoftmax": "log-probabilities",
    "Sigmoid": "sigmoid-probabilities",
}


def score_output(
    graph: gs.Graph,
    producer: dict[str, gs.Node],
    consumers: dict[str, list[gs.Node]],
    output_name: str | None,
) -> tuple[str, str, str, int | None]:
    """The class-score output, the logits tensor (before a monotone output
    activation), the output kind and the class count."""
    outputs = [t.name for t in graph.outputs]
    if output_name is None:
        output_name = _pick_score_output(graph)
    elif output_name not in outputs:
        raise UnsupportedModelError(f"the model has no output {output_name!r}; it has {outputs}")
    logits, kind = output_name, "logits"
    cursor = output_name
    while cursor in producer:
        prod = producer[cursor]
        if prod.op in _OUTPUT_ACTIVATIONS:
            logits = prod.inputs[0].name
            kind = _OUTPUT_ACTIVATIONS[prod.op]
            break
        if prod.op in ("Identity", "Reshape", "Flatten", "Squeeze") \
                and len(consumers.get(prod.inputs[0].name, [])) == 1:
            cursor = prod.inputs[0].name
            continue
        break
    out_shape = next(t.shape for t in graph.outputs if t.name == output_name)
    channel = -1 if not out_shape or len(out_shape) <= 2 else 1  # [N, C, d1..]: classes on 1
    n_classes = out_shape[channel] if out_shape and isinstance(out_shape[channel], int) \
        else None
    return output_name, logits, kind, n_classes


def _pick_score_output(graph: gs.Graph) -> str:
    candidates = [t for t in graph.outputs if t.dtype in (np.float32, np.float16, np.float64, None)]
    ranked = [t for t in candidates if t.shape and len(t.shape) == 2]
    chosen = (ranked or candidates)
    if not chosen:
        raise UnsupportedModelError(
            "no class-score output found (need a float [N, classes] output); pass --output NAME"
        )
    return str(chosen[0].name)
