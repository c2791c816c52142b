"""Graph: load an ONNX model, find its refinable layers and plan the reverse pass.

Data flow: ``load_model`` (onnx, external data checked to stay in the model's
folder) -> ``plan_model`` (onnx-graphsurgeon view of the graph) -> ``Plan``:

- the *logits* tensor: the class-score output, or the input of a final
  Softmax / LogSoftmax / Sigmoid (monotone: the argmax is the same);
- the reverse path: every node from which a target can flow back from the
  logits, each mapped to its inverse rule (``rules.RULES``); a ``Mul`` of an
  activation and a function of it (SiLU as ``x * Sigmoid(x)``, Mish, HardSwish
  before opset 14) is planned as that one activation; nodes with no rule
  or a declined rule are *transitional boundaries*: targets stop there and the
  layers before them are left alone;
- the refinable layers (Conv, Gemm, MatMul with constant weights), each with
  where its weight and bias values live in the file (an initializer directly,
  or through Reshape / Transpose / Identity nodes, or a bias in a following Add).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from ..errors import ModelError, UnsupportedModelError
from ..rules import RULES, NodeView, onnx_default
from .load import allow_nonfinite_weights, load_model
from .outputs import score_output as _score_output

__all__ = [
    "Layer",
    "Plan",
    "PlanNode",
    "TensorSource",
    "allow_nonfinite_weights",
    "load_model",
    "plan_model",
]

# Ops through which a weight may be reached from its initializer (value-preserving).
_WEIGHT_CHAIN_OPS = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


@dataclass(frozen=True)
class TensorSource:
    """Where a weight tensor's value comes from: an initializer, then a chain of
    value-preserving nodes (op, attributes, shape constant) applied in order."""

    initializer: str
    chain: tuple[tuple[str, dict[str, Any], np.ndarray | None], ...] = ()

    def apply(self, value: np.ndarray) -> np.ndarray:
        for op, attrs, const in self.chain:
            value = _chain_forward(op, attrs, const, value)
        return value

    def write_back(self, new_value: np.ndarray, original: np.ndarray) -> np.ndarray:
        """The initializer value that makes the chain produce ``new_value``."""
        for op, attrs, _ in reversed(self.chain):
            if op == "Transpose":
                perm = attrs.get("perm") or list(range(new_value.ndim))[::-1]
                new_value = new_value.transpose(np.argsort(perm))
            # Reshape-like ops: the final reshape to the initializer's shape does it.
        return new_value.reshape(original.shape).astype(original.dtype)


def _chain_forward(
    op: str, attrs: dict[str, Any], const: np.ndarray | None, v: np.ndarray
) -> np.ndarray:
    view = NodeView(op, op, attrs, {1: const} if const is not None else {}, (0,), 2)
    return np.asarray(RULES[op].forward(view, [v]))


@dataclass
class Layer:
    """A refinable node: ``o = A(x) + b`` with constant weights.

    ``kind`` is ``dense`` (Gemm/MatMul, weight as ``x @ W``, W: d_in x d_out) or
    ``conv``. ``output`` is the tensor after the bias (the Add's output when the
    bias is a separate Add node).
    """

    name: str
    op: str
    kind: str
    input: str
    output: str
    weight: TensorSource
    weight_tensor: str
    bias: TensorSource | None = None
    bias_tensor: str | None = None
    bias_add_node: str | None = None
    reason: str | None = None  # why it is not refined, if it is not

    @property
    def refinable(self) -> bool:
        return self.reason is None


@dataclass
class PlanNode:
    """A node on the reverse path, with what its rule needs."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    view: NodeView
    data_inputs: tuple[int, ...]  # input indices targets flow to
    static_names: dict[int, str]  # input index -> static tensor name


@dataclass
class Plan:
    """Everything the pipeline needs to know about a model before computing."""

    model: onnx.ModelProto
    input_name: str
    input_shape: list[int | str]
    output_name: str  # the class-score output of the graph
    logits: str  # tensor the label target is set on
    output_kind: str  # logits | probabilities | log-probabilities
    n_classes: int | None
    nodes: list[PlanNode]  # reverse path, in topological (forward) order
    layers: list[Layer]  # all parametric nodes found, forward order
    boundaries: list[str] = field(default_factory=list)  # "op (opset N) 'name': reason"
    all_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # name, op, status
    static_values: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 13
    input_shapes: dict[str, list[int | str]] = field(default_factory=dict)  # every data input
    # every trained output: (output, its target tensor, kind, classes); the first is the above
    heads: list[tuple[str, str, str, int | None]] = field(default_factory=list)

    @property
    def head_logits(self) -> list[str]:
        return [h[1] for h in self.heads] or [self.logits]

    @property
    def input_names(self) -> list[str]:
        return list(self.input_shapes) or [self.input_name]

    @property
    def refinable(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.refinable]

    def node_views(self, values: dict[str, np.ndarray]) -> dict[str, NodeView]:
        """Node views whose static inputs come from ``values`` (current weights)."""
        out = {}
        for pn in self.nodes:
            static = {i: values.get(n, self.static_values.get(n))
                      for i, n in pn.static_names.items()}
            out[pn.name] = NodeView(
                pn.op, pn.name, pn.view.attrs, {i: v for i, v in static.items() if v is not None},
                pn.view.dynamic, pn.view.n_inputs, pn.view.opset,
            )
        return out


def _attrs(node: gs.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.attrs.items():
        if isinstance(value, gs.Tensor):
            continue
        out[key] = value.encode() if key == "auto_pad" and isinstance(value, str) else value
    return out


def _static_values(
    model: onnx.ModelProto, names: set[str], static_nodes: list[onnx.NodeProto]
) -> dict[str, np.ndarray]:
    """Evaluate constant subgraphs (Constant nodes, weight chains) once, on CPU."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wanted = sorted(n for n in names if n not in values)
    if wanted and static_nodes:
        graph = onnx.helper.make_graph(
            static_nodes, "static", [],
            [onnx.helper.make_empty_tensor_value_info(n) for n in wanted],
            list(model.graph.initializer),
        )
        sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
        sub.ir_version = model.ir_version
        try:
            results = ReferenceEvaluator(sub).run(None, {})
        except Exception as exc:
            raise ModelError(f"cannot evaluate the model's constant subgraphs: {exc}") from exc
        values.update({n: np.asarray(v) for n, v in zip(wanted, results, strict=True)})
    return values


def plan_model(model: onnx.ModelProto, output_name: str | None = None,
               targets: tuple[str, ...] = ()) -> Plan:
    """Analyse ``model``: logits tensor, reverse path with rules, refinable layers.
    ``targets``: further outputs trained together with ``output_name`` (each
    with its own target tensor, :attr:`Plan.heads`; the path reaches back from all)."""
    graph = gs.import_onnx(model)
    opset = opset_version(model)
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [t for t in graph.inputs if t.name not in init_names]
    if not graph_inputs:
        raise UnsupportedModelError("the model has no data input; nothing to feed the data to")
    input_tensor = graph_inputs[0]
    nodes = list(graph.nodes)
    static, static_nodes, static_node_names = _statics(model, graph, nodes)
    producer = {t.name: n for n in nodes for t in n.outputs}
    consumers: dict[str, list[gs.Node]] = {}
    for n in nodes:
        for t in n.inputs:
            consumers.setdefault(t.name, []).append(n)
    output_name, logits, kind, n_classes = _score_output(graph, producer, consumers, output_name)

    # Values of the constants that feed computing nodes (weights through chains too).
    needed_static = {
        t.name for n in nodes if n.name not in static_node_names for t in n.inputs
        if t.name in static and t.name
    }
    static_values = _static_values(model, needed_static, static_nodes)
    heads = [(output_name, logits, kind, n_classes)] + [
        _score_output(graph, producer, consumers, name) for name in targets
        if name != output_name]
    walk = _Walk(producer, consumers, static, static_values, opset)
    for head in heads:
        walk.run(head[1])
    plan_nodes = [walk.plan_node(node) for node in nodes if node.name in walk.on_path]
    layers = [
        _layer(node, producer, consumers, static, static_values, init_names, walk.on_path)
        for node in nodes
        if node.op in ("Conv", "Gemm", "MatMul") and node.name in walk.on_path
    ]
    status = walk.status
    for node in nodes:
        if node.name in walk.on_path or node.name in walk.absorbed:
            status[node.name] = "rule"
        constant = all(t.name in static for t in node.outputs)
        status.setdefault(node.name, "constant" if constant else "not on the reverse path")
    return Plan(
        model=model,
        input_name=input_tensor.name,
        input_shape=list(input_tensor.shape or []),
        input_shapes={t.name: list(t.shape or []) for t in graph_inputs},
        output_name=output_name,
        logits=logits,
        heads=heads,
        output_kind=kind,
        n_classes=n_classes,
        nodes=plan_nodes,
        layers=layers,
        boundaries=walk.boundaries,
        all_nodes=[(n.name, n.op, status[n.name]) for n in nodes],
        static_values=static_values,
        opset=opset,
    )


def node_names(model: onnx.ModelProto) -> list[str]:
    """The name of every node of ``model``'s graph, in graph order: its own, or for
    an unnamed node ``<op>#<k>``, the ``k``-th (from 0) node of that op type in
    graph order (``Conv#3``: the fourth Conv). Plan, inspect, refine and the
    reports all name nodes this way; the written model keeps its nodes unnamed."""
    seen: dict[str, int] = {}
    out = []
    for node in model.graph.node:
        k = seen.get(node.op_type, 0)
        seen[node.op_type] = k + 1
        out.append(node.name or f"{node.op_type}#{k}")
    return out


def _statics(
    model: onnx.ModelProto, graph: gs.Graph, nodes: list[gs.Node]
) -> tuple[set[str], list[onnx.NodeProto], set[str]]:
    """Static (constant) tensors, the nodes that compute them (topological order)
    and their names; unnamed nodes get their :func:`node_names` name on the way."""
    static: set[str] = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    static |= {""}
    static_nodes: list[onnx.NodeProto] = []
    static_node_names: set[str] = set()
    names = node_names(model)  # gs keeps the graph's node order
    proto_by_name = dict(zip(names, model.graph.node, strict=True))
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = names[i]
        if all(t.name in static for t in node.inputs) \
                and node.op not in ("RandomNormal", "RandomUniform"):
            static.update(t.name for t in node.outputs)
            static_nodes.append(proto_by_name[node.name])
            static_node_names.add(node.name)
    return static, static_nodes, static_node_names


class _Walk:
    """The reverse walk from the logits through data inputs: the nodes on the path,
    the boundaries where targets stop (with the reason), fused activations."""

    def __init__(
        self,
        producer: dict[str, gs.Node],
        consumers: dict[str, list[gs.Node]],
        static: set[str],
        static_values: dict[str, np.ndarray],
        opset: int,
    ) -> None:
        self.producer, self.consumers = producer, consumers
        self.static, self.static_values, self.opset = static, static_values, opset
        self.on_path: set[str] = set()
        self.boundaries: list[str] = []
        self.status: dict[str, str] = {}
        self.fused: dict[str, tuple[str, dict[str, Any], str]] = {}  # Mul -> (op, attrs, input)
        self.absorbed: set[str] = set()  # nodes computed inside a fused activation

    def run(self, logits: str) -> None:
        stack = [logits]
        seen_tensors: set[str] = set()
        while stack:
            tname = stack.pop()
            if tname in seen_tensors or tname not in self.producer:
                continue
            seen_tensors.add(tname)
            node = self.producer[tname]
            if node.name in self.on_path or node.name in self.status:
                continue
            stack.extend(self._visit(node))

    def _visit(self, node: gs.Node) -> list[str]:
        """Mark ``node``; the tensors the walk goes on to."""
        gated = _fused_activation(node, self.producer, self.consumers, self.static_values)
        if gated is not None:
            self.fused[node.name] = gated[:3]
            self.absorbed.update(gated[3])
            self.on_path.add(node.name)
            return [gated[2]]
        rule = RULES.get(node.op)
        if (node.domain or "") not in ("", "ai.onnx") or rule is None:
            self._boundary(node, "no inverse rule")
            return []
        view = self._view(node)
        reason = rule.check(view)
        if reason is None and node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") \
                and len(node.outputs) != 1:
            reason = "unexpected outputs"
        if reason is not None:
            self._boundary(node, reason)
            return []
        self.on_path.add(node.name)
        return [node.inputs[i].name for i in rule.data_inputs(view)]

    def _boundary(self, node: gs.Node, why: str) -> None:
        self.status[node.name] = why
        self.boundaries.append(f"{node.op} (opset {self.opset}) {node.name!r}: {why}")

    def _view(self, node: gs.Node) -> NodeView:
        dynamic = tuple(i for i, t in enumerate(node.inputs) if t.name not in self.static)
        return _view(node, dynamic, self.static, self.opset, self.static_values)

    def plan_node(self, node: gs.Node) -> PlanNode:
        """The :class:`PlanNode` of a node on the path."""
        if node.name in self.fused:
            op, attrs, x_name = self.fused[node.name]
            return PlanNode(
                name=node.name, op=op, inputs=[x_name], outputs=[t.name for t in node.outputs],
                view=NodeView(op, node.name, attrs, {}, (0,), 1, self.opset), data_inputs=(0,),
                static_names={},
            )
        view = self._view(node)
        return PlanNode(
            name=node.name, op=node.op,
            inputs=[t.name for t in node.inputs], outputs=[t.name for t in node.outputs],
            view=view, data_inputs=RULES[node.op].data_inputs(view),
            static_names={i: t.name for i, t in enumerate(node.inputs)
                          if t.name in self.static and t.name},
        )


def _view(
    node: gs.Node, dynamic: tuple[int, ...], static: set[str], opset: int,
    values: dict[str, np.ndarray],
) -> NodeView:
    consts = {}
    for i, t in enumerate(node.inputs):
        if t.name in static and t.name:
            if isinstance(t, gs.Constant):
                consts[i] = np.asarray(t.values)
            elif t.name in values:
                consts[i] = values[t.name]
            else:
                consts[i] = np.zeros((0,))  # known static, value evaluated later
    return NodeView(node.op, node.name, _attrs(node), consts, dynamic, len(node.inputs), opset)


def _fused_activation(
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
                if beta is not None and np.asarray(beta).size == 1 and float(beta) > 0:
                    return "Swish", {"alpha": float(beta)}, x, [sig.name, scale.name]
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


def _weight_source(
    name: str, producer: dict[str, gs.Node], consumers: dict[str, list[gs.Node]],
    init_names: set[str], values: dict[str, np.ndarray],
) -> tuple[TensorSource | None, str | None, list[str]]:
    """Trace ``name`` back to an initializer through value-preserving nodes.

    Returns the source, or a reason, and the nodes along the way."""
    chain: list[tuple[str, dict[str, Any], np.ndarray | None]] = []
    via: list[str] = []
    cursor = name
    while cursor not in init_names:
        node = producer.get(cursor)
        if node is None or node.op not in _WEIGHT_CHAIN_OPS:
            op = node.op if node is not None else "a graph input"
            return None, f"weight {name!r} is computed by {op}, not stored", via
        const = None
        if len(node.inputs) > 1 and node.inputs[1].name:
            const = values.get(node.inputs[1].name)
            if const is None and isinstance(node.inputs[1], gs.Constant):
                const = np.asarray(node.inputs[1].values)
        chain.insert(0, (node.op, _attrs(node), const))
        via.append(node.name)
        cursor = node.inputs[0].name
    return TensorSource(cursor, tuple(chain)), None, via


def _layer(
    node: gs.Node, producer: dict[str, gs.Node], consumers: dict[str, list[gs.Node]],
    static: set[str], values: dict[str, np.ndarray], init_names: set[str], on_path: set[str],
) -> Layer:
    kind = "conv" if node.op == "Conv" else "dense"
    weight_name = node.inputs[1].name
    source, reason, via = _weight_source(weight_name, producer, consumers, init_names, values)
    layer = Layer(
        name=node.name, op=node.op, kind=kind, input=node.inputs[0].name,
        output=node.outputs[0].name, weight=source or TensorSource(weight_name),
        weight_tensor=weight_name, reason=reason,
    )
    if reason is not None:
        return layer
    users = _users(source.initializer, consumers, producer)  # type: ignore[union-attr]
    if users != {node.name}:
        layer.reason = f"weight {source.initializer!r} is shared by nodes {sorted(users)}"  # type: ignore[union-attr]
        return layer
    bias_index = 2
    if len(node.inputs) > bias_index and node.inputs[bias_index].name:
        bias_name = node.inputs[bias_index].name
        bsrc, breason, _ = _weight_source(bias_name, producer, consumers, init_names, values)
        if bsrc is not None and _users(bsrc.initializer, consumers, producer) == {node.name}:
            bias_value = values.get(bsrc.initializer)
            if bias_value is not None and bias_value.size == _out_channels(node, values):
                layer.bias, layer.bias_tensor = bsrc, bias_name
        return layer
    # No bias input: a following Add of a per-channel constant is the bias.
    outs = consumers.get(node.outputs[0].name, [])
    if len(outs) == 1 and outs[0].op == "Add" and outs[0].name in on_path:
        add = outs[0]
        other = next((t for t in add.inputs if t.name != node.outputs[0].name), None)
        if other is not None and other.name in static:
            bsrc, _, _ = _weight_source(other.name, producer, consumers, init_names, values)
            value = values.get(other.name)
            if value is None and isinstance(other, gs.Constant):
                value = np.asarray(other.values)
            channels = _out_channels(node, values)
            if bsrc is not None and value is not None \
                    and _is_channel_vector(value, kind, channels) \
                    and _users(bsrc.initializer, consumers, producer) == {add.name}:
                layer.bias, layer.bias_tensor, layer.bias_add_node = bsrc, other.name, add.name
                layer.output = add.outputs[0].name
    return layer


def _out_channels(node: gs.Node, values: dict[str, np.ndarray]) -> int:
    w = values.get(node.inputs[1].name)
    if w is None and isinstance(node.inputs[1], gs.Constant):
        w = np.asarray(node.inputs[1].values)
    assert w is not None
    if node.op == "Conv":
        return int(w.shape[0])
    if node.op == "Gemm" and node.attrs.get("transB", onnx_default("Gemm", "transB")):
        return int(w.shape[0])
    return int(w.shape[-1])


def _is_channel_vector(value: np.ndarray, kind: str, channels: int) -> bool:
    if value.size != channels:
        return False
    shape = list(value.shape)
    if kind == "dense":
        return shape[-1] == channels if shape else False
    # conv output is (N, C, H, W): the constant must broadcast along axis 1.
    return shape in ([channels, 1, 1], [1, channels, 1, 1])


def _users(
    initializer: str, consumers: dict[str, list[gs.Node]], producer: dict[str, gs.Node]
) -> set[str]:
    """Names of the non-chain nodes that read ``initializer`` (through weight chains)."""
    users: set[str] = set()
    stack = [initializer]
    while stack:
        name = stack.pop()
        for node in consumers.get(name, []):
            if node.op in _WEIGHT_CHAIN_OPS and node.inputs[0].name == name:
                stack.extend(t.name for t in node.outputs)
            else:
                users.add(node.name)
    return users


def describe_layer_weight(layer: Layer, values: dict[str, np.ndarray]) -> tuple[int, ...]:
    return tuple(values[layer.weight_tensor].shape) if layer.weight_tensor in values else ()


Transform = Callable[[np.ndarray], np.ndarray]
