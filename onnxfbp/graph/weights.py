"""Where a layer's weight lives in the file, and how a refined value goes back there.

A weight (or bias) tensor read by a layer is *stored* either

- in an initializer (``store == "initializer"``), or
- in the ``value`` (or ``value_float`` / ``value_floats``) attribute of a
  ``Constant`` node (``store == "constant"``, the layout paddle2onnx writes: no
  initializers at all),

and reaches the layer through a chain of value-preserving constant-only nodes
(Identity, Cast between float types, Reshape, Transpose, Flatten, Squeeze,
Unsqueeze). :class:`TensorSource` is that place and chain: ``apply`` maps the
stored value to the tensor the layer reads, ``write_back`` maps a new layer
weight back to the stored value (same dtype and shape), so the written model
differs from the input only in stored values.

:func:`lift_constants` is the working copy that onnxruntime runs with weights fed
as inputs (a Constant node's value becomes an initializer of the same name);
:func:`static_values` evaluates a model's constant subgraphs (onnxruntime first,
the ONNX reference evaluator second).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import ModelError
from ..rules import RULES, NodeView

if TYPE_CHECKING:
    from .plan import Layer

__all__ = [
    "CHAIN_OPS",
    "TensorSource",
    "constant_value",
    "constant_values",
    "lift_constants",
    "share_weights",
    "static_values",
    "users",
    "weight_source",
]

# Ops through which a weight may reach its layer from where it is stored (value-preserving).
CHAIN_OPS = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Cast")
_FLOAT_TYPES: dict[int, Any] = {onnx.TensorProto.FLOAT: np.float32,
                                onnx.TensorProto.DOUBLE: np.float64,
                                onnx.TensorProto.FLOAT16: np.float16}
CONSTANT_ATTRS = ("value", "value_float", "value_floats")  # the float forms a weight may take


@dataclass(frozen=True)
class TensorSource:
    """Where a weight tensor's value comes from: the stored tensor ``initializer``
    (an initializer's name, or with ``store == "constant"`` the output of the
    Constant node that holds it), then a chain of value-preserving nodes (op,
    attributes, shape constant) applied in order."""

    initializer: str
    chain: tuple[tuple[str, dict[str, Any], np.ndarray | None], ...] = ()
    store: str = "initializer"

    def apply(self, value: np.ndarray) -> np.ndarray:
        for op, attrs, const in self.chain:
            value = _chain_forward(op, attrs, const, value)
        return value

    def write_back(self, new_value: np.ndarray, original: np.ndarray) -> np.ndarray:
        """The stored value that makes the chain produce ``new_value``: Transposes
        undone, reshaped to the stored shape and cast to the stored dtype (a Cast
        in the chain is undone by that final cast)."""
        for op, attrs, _ in reversed(self.chain):
            if op == "Transpose":
                perm = attrs.get("perm") or list(range(new_value.ndim))[::-1]
                new_value = new_value.transpose(np.argsort(perm))
            # Reshape-like ops: the final reshape to the stored shape does it.
        return np.asarray(new_value).reshape(original.shape).astype(original.dtype)


def _chain_forward(
    op: str, attrs: dict[str, Any], const: np.ndarray | None, v: np.ndarray
) -> np.ndarray:
    if op == "Cast":
        return np.asarray(v).astype(_FLOAT_TYPES[int(attrs["to"])])
    view = NodeView(op, op, attrs, {1: const} if const is not None else {}, (0,), 2)
    return np.asarray(RULES[op].forward(view, [v]))


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (any of its value attributes but the sparse
    and string ones), or None."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), dtype=np.int64)
    return None


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The value of every Constant node of the main graph, by its output's name."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and (node.domain or "") in ("", "ai.onnx") \
                and len(node.output) == 1:
            value = constant_value(node)
            if value is not None:
                out[node.output[0]] = value
    return out


def _default_domain(model: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    """The model's opset imports with ``ai.onnx`` written as the default domain ``""``
    (ONNX nodes of the default domain carry ``""``; the reference evaluator looks
    their opset up under that name)."""
    out: dict[str, int] = {}
    for o in model.opset_import:
        domain = "" if o.domain in ("", "ai.onnx") else o.domain
        out[domain] = max(out.get(domain, 0), int(o.version))
    return [onnx.helper.make_opsetid(d, v) for d, v in out.items()]


def static_values(
    model: onnx.ModelProto, names: set[str], static_nodes: list[onnx.NodeProto]
) -> dict[str, np.ndarray]:
    """Values of the initializers, of every Constant node, and of the constant
    tensors ``names`` computed by ``static_nodes`` (once, on CPU): by onnxruntime,
    or where it declines the subgraph by the ONNX reference evaluator; a
    :class:`ModelError` names both reasons if neither evaluates it."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update({k: v for k, v in constant_values(model).items() if k not in values})
    wanted = sorted(n for n in names if n not in values)
    if not wanted or not static_nodes:
        return values
    nodes = _ancestors(static_nodes, set(wanted))
    read = {name for node in nodes for name in node.input}
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in nodes for a in node.attribute):  # subgraphs read outer names
        read |= {t.name for t in model.graph.initializer}
    graph = onnx.helper.make_graph(
        [_in_default_domain(n) for n in nodes], "static", [],
        [onnx.helper.make_empty_tensor_value_info(n) for n in wanted],
        [t for t in model.graph.initializer if t.name in read],
    )
    sub = onnx.helper.make_model(graph, opset_imports=_default_domain(model))
    sub.ir_version = model.ir_version
    errors = []
    for label, evaluate in (("onnxruntime", _by_onnxruntime),
                            ("the ONNX reference evaluator", _by_reference)):
        try:
            results = evaluate(sub, wanted)
        except Exception as exc:  # noqa: BLE001 - the next evaluator, then the error
            errors.append(f"{label}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            continue
        values.update({n: np.asarray(v) for n, v in zip(wanted, results, strict=True)})
        return values
    raise ModelError(
        f"cannot evaluate the model's constant subgraphs ({'; '.join(errors)}); "
        "check that onnxruntime runs the model"
    )


def _ancestors(nodes: list[onnx.NodeProto], wanted: set[str]) -> list[onnx.NodeProto]:
    """The nodes of ``nodes`` (topological order) that ``wanted`` depends on."""
    needed = set(wanted)
    keep = []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def _in_default_domain(node: onnx.NodeProto) -> onnx.NodeProto:
    if node.domain != "ai.onnx":
        return node
    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.domain = ""
    return out


def _by_onnxruntime(sub: onnx.ModelProto, wanted: list[str]) -> list[Any]:
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(sub.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return list(session.run(wanted, {}))


def _by_reference(sub: onnx.ModelProto, wanted: list[str]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415

    return list(ReferenceEvaluator(sub).run(wanted, {}))


def weight_source(
    name: str, producer: dict[str, gs.Node], stored: set[str], values: dict[str, np.ndarray],
    attrs: Any,
) -> tuple[TensorSource | None, str | None, list[str]]:
    """Trace ``name`` back to where it is stored (an initializer in ``stored``, or a
    Constant node) through value-preserving nodes (``attrs``: a node's attributes).

    Returns the source, or a reason, and the names of the nodes along the way."""
    chain: list[tuple[str, dict[str, Any], np.ndarray | None]] = []
    via: list[str] = []
    cursor = name
    while cursor not in stored:
        node = producer.get(cursor)
        if node is not None and node.op == "Constant" and len(node.outputs) == 1:
            if not any(key in node.attrs for key in CONSTANT_ATTRS) or cursor not in values:
                return None, f"weight {name!r} is held by a Constant node of a form " \
                    "onnxfbp does not write (sparse, integer or string)", via
            return (*_checked(name, TensorSource(cursor, tuple(chain), "constant"), values), via)
        if node is None or node.op not in CHAIN_OPS or (node.domain or "") not in ("", "ai.onnx"):
            op = node.op if node is not None else "a graph input"
            return None, f"weight {name!r} is computed by {op}, not stored", via
        if node.op == "Cast" and int(node.attrs.get("to", 0)) not in _FLOAT_TYPES:
            return None, f"weight {name!r} is cast to a non-float type, not stored", via
        const = None
        if len(node.inputs) > 1 and node.inputs[1].name:
            const = values.get(node.inputs[1].name)
            if const is None and isinstance(node.inputs[1], gs.Constant):
                const = np.asarray(node.inputs[1].values)
        chain.insert(0, (node.op, attrs(node), const))
        via.append(node.name)
        cursor = node.inputs[0].name
    return (*_checked(name, TensorSource(cursor, tuple(chain)), values), via)


def _checked(
    name: str, source: TensorSource, values: dict[str, np.ndarray]
) -> tuple[TensorSource | None, str | None]:
    """``source``, or a reason when its stored value is not a float tensor."""
    value = values.get(source.initializer)
    if value is not None and np.asarray(value).dtype.kind != "f":
        return None, f"weight {name!r} is stored as {np.asarray(value).dtype}, not a float"
    if value is not None and source.store == "constant" and not np.isfinite(value).all():
        # (initializers are checked when the model is loaded; Constant nodes may
        # hold masks such as -inf, so a non-finite one is only left alone)
        return None, f"weight {name!r} (a Constant node) holds NaN or Inf; left unchanged"
    return source, None


def users(
    stored: str, consumers: dict[str, list[gs.Node]], producer: dict[str, gs.Node]
) -> set[str]:
    """Names of the non-chain nodes that read the stored tensor ``stored`` (through
    weight chains)."""
    out: set[str] = set()
    stack = [stored]
    while stack:
        name = stack.pop()
        for node in consumers.get(name, []):
            if node.op in CHAIN_OPS and node.inputs[0].name == name:
                stack.extend(t.name for t in node.outputs)
            else:
                out.add(node.name)
    return out


def share_weights(layers: list[Layer], values: dict[str, np.ndarray]) -> None:
    """Layers that read one stored weight are refined together (their rows
    stacked; biases kept) when every reader is such a layer reading it in the
    same layout (the same chain result) with the same op and attributes;
    otherwise each gets the plain reason why not."""
    by_name = {layer.name: layer for layer in layers}

    def layout(layer: Layer) -> np.ndarray | None:
        stored = values.get(layer.weight.initializer)
        if stored is None:
            return None
        probe = np.arange(stored.size, dtype=np.float64).reshape(stored.shape)
        return layer.weight.apply(probe)

    for layer in layers:
        if not layer.shared or layer.reason is not None:
            continue
        mine = layout(layer)
        strangers = []
        for name in layer.shared:
            other = by_name.get(name)
            theirs = layout(other) if other is not None else None
            if other is None or other.reason is not None or other.layout != layer.layout \
                    or mine is None or theirs is None or mine.shape != theirs.shape \
                    or not np.array_equal(mine, theirs):
                strangers.append(name)
        if strangers:
            layer.reason = (
                f"its weight {layer.weight.initializer!r} is also read by {strangers}, "
                "which are not layers on the reverse path reading it as this one does; "
                "left unchanged")


def lift_constants(model: onnx.ModelProto, names: set[str] | list[str]) -> onnx.ModelProto:
    """``model`` with each Constant node whose output is in ``names`` replaced by an
    initializer of that name and value (the model itself when there is none), so
    that onnxruntime can be fed those weights as inputs."""
    wanted = set(names) - {t.name for t in model.graph.initializer}
    lifted = [n for n in model.graph.node
              if n.op_type == "Constant" and len(n.output) == 1 and n.output[0] in wanted]
    if not lifted:
        return model
    out = copy.deepcopy(model)
    keep = [n for n in out.graph.node
            if not (n.op_type == "Constant" and len(n.output) == 1 and n.output[0] in wanted)]
    for node in lifted:
        value = constant_value(node)
        assert value is not None
        out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def write_constant(node: onnx.NodeProto, new: np.ndarray) -> None:
    """Put ``new`` (already cast to the stored dtype and shape) into the Constant
    ``node``'s value attribute, in the attribute's own form."""
    for attr in node.attribute:
        if attr.name == "value":
            replacement = numpy_helper.from_array(new, attr.t.name)
            if attr.t.HasField("doc_string"):
                replacement.doc_string = attr.t.doc_string
            attr.t.CopyFrom(replacement)
            return
        if attr.name == "value_float":
            attr.f = float(new.reshape(-1)[0])
            return
        if attr.name == "value_floats":
            del attr.floats[:]
            attr.floats.extend(float(v) for v in new.reshape(-1))
            return
    raise ValueError(f"Constant node {node.name!r} holds no float value to write")
