"""Activations that exporters write as a product: ``x * g(x)``.

SiLU / Swish, Mish and HardSwish before opset 14 have no single op in the
exporters' opsets; the planner treats such a ``Mul`` as the one activation (its
rule has an inverse and a closed-form slope), not as a product of two
activations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ..rules import onnx_default

__all__ = ["fused_activation"]


def fused_activation(
    node: gs.Node, producer: dict[str, gs.Node], consumers: dict[str, list[gs.Node]],
    values: dict[str, np.ndarray],
) -> tuple[str, dict[str, Any], str, list[str]] | None:
    """``x * g(x)`` as exporters write activations that had no single op: SiLU / Swish
    (``x * Sigmoid(x)``, ``x * Sigmoid(beta x)``), Mish (``x * Tanh(Softplus(x))``),
    HardSwish before opset 14 (``x * HardSigmoid(x)``, alpha 1/6, beta 1/2).
    Returns (op, attributes, x, the nodes of g) when ``node`` is such a Mul and g's
    nodes feed nothing else, else None."""
    if node.op != "Mul" or len(node.inputs) != 2 or (node.domain or "") not in ("", "ai.onnx"):
        return None

    def only(tensor: str, op: str) -> gs.Node | None:
        p = producer.get(tensor)
        if p is None or p.op != op or len(consumers.get(tensor, [])) != 1:
            return None
        return p

    for a, b in ((0, 1), (1, 0)):
        x, gate = node.inputs[a].name, node.inputs[b].name
        sig = only(gate, "Sigmoid")
        if sig is not None:
            inner = sig.inputs[0].name
            if inner == x:
                return "Swish", {"alpha": 1.0}, x, [sig.name]
            scale = only(inner, "Mul")
            if scale is not None and x in [t.name for t in scale.inputs]:
                other = next(t for t in scale.inputs if t.name != x)
                beta = values.get(other.name)
                if beta is None and isinstance(other, gs.Constant):
                    beta = np.asarray(other.values)
                beta = np.asarray(beta).reshape(-1) if beta is not None else np.zeros(0)
                if beta.size == 1 and float(beta[0]) > 0:
                    return "Swish", {"alpha": float(beta[0])}, x, [sig.name, scale.name]
        hard = only(gate, "HardSigmoid")
        if hard is not None and hard.inputs[0].name == x \
                and abs(float(hard.attrs.get("alpha", onnx_default("HardSigmoid", "alpha")))
                        - 1 / 6) < 1e-6 \
                and abs(float(hard.attrs.get("beta", onnx_default("HardSigmoid", "beta")))
                        - 0.5) < 1e-6:
            return "HardSwish", {}, x, [hard.name]
        tanh = only(gate, "Tanh")
        soft = only(tanh.inputs[0].name, "Softplus") if tanh is not None else None
        if tanh is not None and soft is not None and soft.inputs[0].name == x:
            return "Mish", {}, x, [tanh.name, soft.name]
    return None
