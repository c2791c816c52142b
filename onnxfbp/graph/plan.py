"""Graph: load an ONNX model, find its refinable layers and plan the reverse pass.

Data flow: ``load_model`` (onnx, external data checked to stay in the model's
folder) -> ``plan_model`` (onnx-graphsurgeon view of the graph) -> ``Plan``:

- the *logits* tensor: the class-score output, or the input of a final
  Softmax / LogSoftmax / Sigmoid (monotone: the argmax is the same);
- the reverse path: every node from which a target can flow back from the
  logits, each mapped to its rule (``rules.RULES``); a node is on it when its
  rule linearizes it (a ``vjp``: the default schedule's reverse step), and
  each path node records whether it also has an inverse (``PlanNode.inverse``:
  None, or why not; the sweep schedules carry targets only through inverses).
  A ``Mul`` of an activation and a function of it (SiLU as ``x * Sigmoid(x)``,
  Mish, HardSwish before opset 14) is planned as that one activation; other
  products of two activations (squeeze-excitation gates, attention) are path
  nodes whose targets flow into both factors. Nodes with no rule or a declined
  rule (no derivative: integer outputs, indices) are *boundaries*: targets stop
  there and the layers before them are left alone;
- the refinable layers (Conv, Gemm, MatMul with constant weights), each with
  where its weight and bias values live in the file (an initializer or a
  Constant node, directly or through Reshape / Transpose / Identity / Cast
  nodes, or a bias in a following Add: :mod:`onnxfbp.graph.weights`); layers
  that read one stored weight are refined together (:attr:`Layer.shared`);
- a node the planner cannot understand (an error planning it) is a boundary
  with the reason ``not understood: <error>``, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UnsupportedModelError
from ..quant.qdq import fused_qdq
from ..rules import NO_DERIVATIVE, RULES, NodeView, onnx_default
from .fused import fused_activation as _fused_activation
from .load import allow_nonfinite_weights, load_model
from .outputs import score_output as _score_output
from .shapes import shape_constants
from .weights import TensorSource, share_weights, users, weight_source
from .weights import static_values as static_values_of

__all__ = [
    "Layer",
    "Plan",
    "PlanNode",
    "TensorSource",
    "allow_nonfinite_weights",
    "load_model",
    "plan_model",
]

# Ops that are refinable layers where their second input (the weight) is constant.
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


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
    shared: tuple[str, ...] = ()  # the other layers reading the same stored weight
    layout: str = field(default="", repr=False)  # op and attributes; sharers must agree

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
    inverse: str | None = None  # None: the rule inverts it; else why not (vjp only)


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
    static_values = static_values_of(model, needed_static, static_nodes)
    folded = shape_constants(model, nodes, static, input_tensor)  # Slice bounds from Shape
    static |= set(folded)
    static_values.update(folded)
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
        if node.op in _LAYER_OPS and node.name in walk.on_path and node.inputs[1].name in static
    ]
    share_weights(layers, static_values)
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
        self.no_inverse: dict[str, str] = {}  # path node -> why its rule has no inverse

    def run(self, logits: str) -> None:
        stack = [logits]
        seen_tensors: set[str] = set()
        while stack:
            tname = stack.pop()
            if tname in seen_tensors or tname not in self.producer or tname in self.static:
                continue  # (a constant operand, e.g. a class token from a Constant node)
            seen_tensors.add(tname)
            node = self.producer[tname]
            if node.name in self.on_path or node.name in self.status:
                continue
            stack.extend(_visited(self, node))

    def _visit(self, node: gs.Node) -> list[str]:
        """Mark ``node``; the tensors the walk goes on to."""
        gated = fused_qdq(node, self.producer, self.static_values) \
            or _fused_activation(node, self.producer, self.consumers, self.static_values)
        if gated is not None:
            self.fused[node.name] = gated[:3]
            self.absorbed.update(gated[3])
            self.on_path.add(node.name)
            return [gated[2]]
        rule = RULES.get(node.op)
        if (node.domain or "") not in ("", "ai.onnx") or rule is None:
            domain = f" in domain {node.domain!r}" if (node.domain or "") not in ("", "ai.onnx") \
                else ""
            why = NO_DERIVATIVE.get(node.op, "the op table lacks it") if not domain \
                else "the op table lacks it"
            self._boundary(node, f"no rule for {node.op}{domain}: {why}")
            return []
        view = self._view(node)
        reason = rule.check(view)
        if reason is None and node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") \
                and len(node.outputs) != 1:
            reason = "unexpected outputs"
        if reason is not None:
            self._boundary(node, reason)
            return []
        data = rule.data_inputs(view)
        if data and all(node.inputs[i].name in self.static for i in data):
            return []  # a constant broadcast to the batch (a class token): nothing to pass
        self.on_path.add(node.name)
        no_inverse = rule.check_inverse(view)
        if no_inverse is not None:
            self.no_inverse[node.name] = no_inverse
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
            inverse=self.no_inverse.get(node.name),
        )


def _visited(walk: _Walk, node: gs.Node) -> list[str]:
    """``walk._visit(node)``; an error planning the node makes it a boundary whose
    reason is ``not understood: <error>`` (inspect lists it; nothing crashes)."""
    try:
        return walk._visit(node)
    except Exception as exc:  # noqa: BLE001 - an odd node is reported, never a crash
        walk.on_path.discard(node.name)
        walk._boundary(node, f"not understood: {_why(exc)}")
        return []


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
    attrs = _attrs(node)
    if node.op == "Split" and 1 not in consts and not attrs.get("split"):
        attrs.setdefault("num_outputs", len(node.outputs))  # equal parts, one per output
    return NodeView(node.op, node.name, attrs, consts, dynamic, len(node.inputs), opset)




def _layer(
    node: gs.Node, producer: dict[str, gs.Node], consumers: dict[str, list[gs.Node]],
    static: set[str], values: dict[str, np.ndarray], stored: set[str], on_path: set[str],
) -> Layer:
    """The :class:`Layer` of a Conv/Gemm/MatMul on the reverse path: where its weight
    and bias are stored, or why it is not refined (an unexpected form of the node
    gives ``not understood: <reason>`` rather than an error)."""
    try:
        return _layer_of(node, producer, consumers, static, values, stored, on_path)
    except Exception as exc:  # noqa: BLE001 - an odd node is reported, never a crash
        return Layer(name=node.name, op=node.op,
                     kind="conv" if node.op in ("Conv", "ConvTranspose") else "dense",
                     input=node.inputs[0].name if node.inputs else "",
                     output=node.outputs[0].name if node.outputs else "",
                     weight=TensorSource(""), weight_tensor="",
                     reason=f"not understood: {_why(exc)}")


def _why(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _layer_of(
    node: gs.Node, producer: dict[str, gs.Node], consumers: dict[str, list[gs.Node]],
    static: set[str], values: dict[str, np.ndarray], stored: set[str], on_path: set[str],
) -> Layer:
    kind = "conv" if node.op in ("Conv", "ConvTranspose") else "dense"
    weight_name = node.inputs[1].name
    source, reason, _ = weight_source(weight_name, producer, stored, values, _attrs)
    if reason is None and node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
        reason = "a ConvTranspose with groups > 1 passes targets but is not refined"
    layer = Layer(
        name=node.name, op=node.op, kind=kind, input=node.inputs[0].name,
        output=node.outputs[0].name, weight=source or TensorSource(weight_name),
        weight_tensor=weight_name, reason=reason,
    )
    if source is None or reason is not None:
        return layer
    readers = users(source.initializer, consumers, producer)
    if readers != {node.name}:
        layer.shared = tuple(sorted(readers - {node.name}))  # biases stay fixed
        layer.layout = f"{node.op} {sorted(_attrs(node).items())!r}"
        return layer

    def own(name: str, reader: str) -> TensorSource | None:
        src, _, _ = weight_source(name, producer, stored, values, _attrs)
        if src is None or users(src.initializer, consumers, producer) != {reader}:
            return None
        return src

    bias_index = 2
    if len(node.inputs) > bias_index and node.inputs[bias_index].name:
        bias_name = node.inputs[bias_index].name
        bsrc = own(bias_name, node.name)
        if bsrc is not None:
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
            bsrc = own(other.name, add.name)
            value = values.get(other.name)
            if value is None and isinstance(other, gs.Constant):
                value = np.asarray(other.values)
            channels = _out_channels(node, values)
            if bsrc is not None and value is not None \
                    and _is_channel_vector(value, kind, channels):
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
    if node.op == "ConvTranspose":
        return int(w.shape[1]) * int(node.attrs.get("group", 1))
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


def describe_layer_weight(layer: Layer, values: dict[str, np.ndarray]) -> tuple[int, ...]:
    return tuple(values[layer.weight_tensor].shape) if layer.weight_tensor in values else ()


Transform = Callable[[np.ndarray], np.ndarray]
