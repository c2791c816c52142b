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

import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from .errors import ModelError, UnsupportedModelError
from .rules import RULES, NodeView

__all__ = [
    "Layer",
    "Plan",
    "PlanNode",
    "TensorSource",
    "load_model",
    "plan_model",
]

# Ops through which a weight may be reached from its initializer (value-preserving).
_WEIGHT_CHAIN_OPS = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
# Monotone output activations: the label target is set on their input (same argmax).
_OUTPUT_ACTIVATIONS = {
    "Softmax": "probabilities",
    "LogSoftmax": "log-probabilities",
    "Sigmoid": "sigmoid-probabilities",
}


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a model and its external data; refuse what onnxfbp cannot use safely.

    Raises :class:`ModelError` (one line: what is wrong, what to do) for a missing,
    unreadable, truncated or non-ONNX file, external data that is missing, short or
    outside the model's folder, and an IR version or opset onnxruntime cannot run.
    """
    import onnxruntime as ort  # noqa: PLC0415

    from .paths import check_input_file  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise ModelError(f"model {path} is a folder; pass the .onnx file inside it")
    check_input_file(path, "model file", ModelError)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ModelError(
            f"cannot read model {path}: {exc.strerror or exc}; check its permissions"
        ) from exc
    if not raw:
        raise ModelError(
            f"model file {path} is empty; pass the .onnx file exported by your framework"
        )
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: truncated, corrupt or "
            "another format); pass the .onnx file exported by your framework"
        ) from exc
    del raw
    if not model.graph.node:
        raise ModelError(
            f"{path} has no graph nodes: it is not an ONNX model, or an empty one; "
            "pass the .onnx file exported by your framework"
        )

    # IR version and opsets: a one-Identity-node probe with the same header is loaded
    # by onnxruntime (milliseconds), so an unsupported opset is named before any work.
    probes: dict[tuple[tuple[str, int], ...], bool] = {}
    ir = int(model.ir_version)

    def accepts(opsets: tuple[tuple[str, int], ...]) -> bool:
        if opsets not in probes:
            vi = onnx.helper.make_tensor_value_info
            graph = onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                [vi("x", onnx.TensorProto.FLOAT, [1])], [vi("y", onnx.TensorProto.FLOAT, [1])],
            )
            probe = onnx.helper.make_model(
                graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets])
            probe.ir_version = ir
            options = ort.SessionOptions()
            options.log_severity_level = 4
            try:
                ort.InferenceSession(probe.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"])
                probes[opsets] = True
            except Exception:
                probes[opsets] = False
        return probes[opsets]

    imports = tuple(sorted((o.domain or "", int(o.version)) for o in model.opset_import))
    if not imports:
        raise ModelError(
            f"{path} declares no opset: it is truncated or not a complete ONNX export; "
            "pass the .onnx file exported by your framework"
        )
    if not accepts(imports):
        if not accepts((("", 13),)):
            raise ModelError(
                f"{path.name} has ONNX IR version {ir}, which onnxruntime {ort.__version__} cannot "
                "load; re-export the model with an older exporter or upgrade onnxruntime"
            )
        main_version = next((v for d, v in imports if d in ("", "ai.onnx")), 13)
        for domain, version in imports:
            if domain in ("", "ai.onnx"):
                base_probe: tuple[tuple[str, int], ...] = (("", version),)
            else:
                base_probe = (("", main_version), (domain, version))
            if accepts(base_probe):
                continue
            lo, hi = 0, version - 1  # the newest version onnxruntime accepts, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if accepts(tuple((d, mid if d == domain else v) for d, v in base_probe)):
                    lo = mid
                else:
                    hi = mid - 1
            name = domain or "ai.onnx"
            runs = f"it runs {name} up to opset {lo}" if lo else f"it has no {name} domain"
            raise ModelError(
                f"{path.name} uses opset {version} of {name}, which onnxruntime "
                f"{ort.__version__} cannot run ({runs}); re-export the model with an older "
                "opset or upgrade onnxruntime"
            )
        listed = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in imports)
        raise ModelError(
            f"onnxruntime {ort.__version__} cannot load {path.name} (IR version {ir}, opsets "
            f"{listed}); re-export the model with an older exporter or upgrade onnxruntime"
        )

    base = path.resolve().parent
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if "\0" in location or len(os.fsencode(location)) > 4096 or any(
                len(os.fsencode(part)) > 255 for part in Path(location).parts):
            raise ModelError(
                f"external data of {tensor.name!r} has an impossible file name "
                f"({location[:40]!r}...: a NUL byte or over the filesystem's limits); "
                "re-export the model"
            )
        try:
            target = (base / location).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise ModelError(
                f"external data file {location} of {tensor.name!r} cannot be resolved "
                f"({getattr(exc, 'strerror', None) or exc}); copy the real file next to "
                f"{path.name}"
            ) from None
        if not location:
            raise ModelError(
                f"weight {tensor.name!r} is stored as external data without a file name; "
                "re-export the model (onnx.save_model(..., save_as_external_data=True))"
            )
        if Path(location).is_absolute() or location.startswith(("/", "\\")):
            raise ModelError(
                f"external data of {tensor.name!r} has an absolute location ({location}); "
                "refusing it: keep the data file next to the model, named relative to it"
            )
        if base != target and base not in target.parents:
            raise ModelError(
                f"external data of {tensor.name!r} points outside the model folder "
                f"({location}); refusing it: keep the data file next to the model"
            )
        if not os.path.lexists(target):
            raise ModelError(
                f"external data file {location} for {tensor.name!r} is missing; "
                f"copy it next to {path.name}"
            )
        check_input_file(target, f"external data file of {tensor.name!r}", ModelError)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise ModelError(
                f"external data of {tensor.name!r} has a malformed offset or length; "
                "re-export the model"
            ) from None
        size = target.stat().st_size
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise ModelError(
                f"external data file {location} is shorter than {path.name} expects "
                f"({size} bytes; {tensor.name!r} needs bytes {offset}..{offset + max(length, 0)}): "
                "it is truncated or from another export; copy the complete file"
            )
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelError(
            f"cannot read external data of {path.name} ({exc}); "
            "copy the complete data files next to it"
        ) from exc
    t = onnx.TensorProto
    itemsize = {t.FLOAT: 4, t.DOUBLE: 8, t.FLOAT16: 2, t.BFLOAT16: 2, t.INT8: 1, t.UINT8: 1,
                t.INT16: 2, t.UINT16: 2, t.INT32: 4, t.UINT32: 4, t.INT64: 8, t.UINT64: 8,
                t.BOOL: 1}
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or tensor.data_type not in itemsize:
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize[tensor.data_type]
        if len(tensor.raw_data) != expected:
            raise ModelError(
                f"weight {tensor.name!r} of {path.name} holds {len(tensor.raw_data)} bytes but "
                f"its shape {list(tensor.dims)} needs {expected}: the model or its data file is "
                "truncated or corrupt; copy the complete files"
            )
    _check_graph_inputs(model, path)
    if not allow_nonfinite_weights.get():
        _check_finite_weights(model, path)
    return model


allow_nonfinite_weights: ContextVar[bool] = ContextVar("allow_nonfinite_weights", default=False)
"""Whether :func:`load_model` accepts NaN / Inf weights (``--allow-nonfinite-input``)."""


def _check_graph_inputs(model: onnx.ModelProto, path: Path) -> None:
    """Refuse names that are not valid UTF-8 and a graph input with a negative or
    zero fixed dimension (no batch can have that shape)."""
    for kind, names in (
        ("initializer", [t.name for t in model.graph.initializer]),
        ("node", [n.name for n in model.graph.node]),
        ("tensor", [x for n in model.graph.node for x in (*n.input, *n.output)]),
        ("graph input", [i.name for i in model.graph.input]),
        ("graph output", [o.name for o in model.graph.output]),
    ):
        for name in names:
            if not isinstance(name, str):
                raise ModelError(
                    f"{path.name}: {kind} name {name!r} is not valid UTF-8; "
                    "re-export the model with plain names"
                )
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        for k, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                raise ModelError(
                    f"input {value.name!r} of {path.name} declares dimension {k} as "
                    f"{dim.dim_value}; every dimension must be positive (or symbolic): "
                    "re-export the model"
                )


def _check_finite_weights(model: onnx.ModelProto, path: Path) -> None:
    """Refuse NaN or Inf in a floating-point initializer (the weights; Constant nodes,
    such as -inf masks, are never refined and are left alone)."""
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        try:
            value = numpy_helper.to_array(tensor)
        except Exception:  # unreadable tensors are reported when the model is run
            continue
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise ModelError(
                f"weight {tensor.name!r} of {path.name} holds {bad} NaN or Inf value(s); "
                "fix the export, or pass --allow-nonfinite-input to refine it anyway "
                "(those values are then kept as they are)"
            )


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in model.graph.initializer
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
    ]


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


def plan_model(model: onnx.ModelProto, output_name: str | None = None) -> Plan:
    """Analyse ``model``: logits tensor, reverse path with rules, refinable layers."""
    graph = gs.import_onnx(model)
    opset = opset_version(model)
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [t for t in graph.inputs if t.name not in init_names]
    if len(graph_inputs) != 1:
        raise UnsupportedModelError(
            f"the model has {len(graph_inputs)} data inputs; onnxfbp refines single-input models"
        )
    input_tensor = graph_inputs[0]

    # Static (constant) vs dynamic tensors, in topological order.
    static: set[str] = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    static |= {""}
    static_nodes: list[onnx.NodeProto] = []
    static_node_names: set[str] = set()
    proto_by_name = {n.name or f"#{i}": n for i, n in enumerate(model.graph.node)}
    nodes = list(graph.nodes)
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"#{i}"
        if all(t.name in static for t in node.inputs) \
                and node.op not in ("RandomNormal", "RandomUniform"):
            static.update(t.name for t in node.outputs)
            static_nodes.append(proto_by_name[node.name])
            static_node_names.add(node.name)
    producer = {t.name: n for n in nodes for t in n.outputs}
    consumers: dict[str, list[gs.Node]] = {}
    for n in nodes:
        for t in n.inputs:
            consumers.setdefault(t.name, []).append(n)

    # Class-score output and the logits tensor.
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
    n_classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None

    # Values of the constants that feed computing nodes (weights through chains too).
    needed_static = {
        t.name for n in nodes if n.name not in static_node_names for t in n.inputs
        if t.name in static and t.name
    }
    static_values = _static_values(model, needed_static, static_nodes)

    # Reverse walk from the logits through data inputs.
    on_path: set[str] = set()
    boundaries: list[str] = []
    status: dict[str, str] = {}
    fused: dict[str, tuple[str, dict[str, Any], str]] = {}  # Mul node -> (op, attrs, input)
    absorbed: set[str] = set()  # nodes computed inside a fused activation
    stack = [logits]
    seen_tensors: set[str] = set()
    while stack:
        tname = stack.pop()
        if tname in seen_tensors or tname not in producer:
            continue
        seen_tensors.add(tname)
        node = producer[tname]
        if node.name in on_path or node.name in status:
            continue
        gated = _fused_activation(node, producer, consumers, static_values)
        if gated is not None:
            fused[node.name] = gated[:3]
            absorbed.update(gated[3])
            on_path.add(node.name)
            stack.append(gated[2])
            continue
        dynamic = tuple(i for i, t in enumerate(node.inputs) if t.name not in static)
        rule = RULES.get(node.op)
        if (node.domain or "") not in ("", "ai.onnx") or rule is None:
            why = "no inverse rule"
            status[node.name] = why
            boundaries.append(f"{node.op} (opset {opset}) {node.name!r}: {why}")
            continue
        view = _view(node, dynamic, static, opset, static_values)
        reason = rule.check(view)
        if reason is None and node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") \
                and len(node.outputs) != 1:
            reason = "unexpected outputs"
        if reason is not None:
            status[node.name] = reason
            boundaries.append(f"{node.op} (opset {opset}) {node.name!r}: {reason}")
            continue
        on_path.add(node.name)
        for i in rule.data_inputs(view):
            stack.append(node.inputs[i].name)


    plan_nodes: list[PlanNode] = []
    for node in nodes:
        if node.name not in on_path:
            continue
        if node.name in fused:
            op, attrs, x_name = fused[node.name]
            plan_nodes.append(PlanNode(
                name=node.name, op=op, inputs=[x_name], outputs=[t.name for t in node.outputs],
                view=NodeView(op, node.name, attrs, {}, (0,), 1, opset), data_inputs=(0,),
                static_names={},
            ))
            continue
        dynamic = tuple(i for i, t in enumerate(node.inputs) if t.name not in static)
        view = _view(node, dynamic, static, opset, static_values)
        plan_nodes.append(
            PlanNode(
                name=node.name, op=node.op,
                inputs=[t.name for t in node.inputs], outputs=[t.name for t in node.outputs],
                view=view, data_inputs=RULES[node.op].data_inputs(view),
                static_names={i: t.name for i, t in enumerate(node.inputs)
                              if t.name in static and t.name},
            )
        )

    layers = [
        _layer(node, producer, consumers, static, static_values, init_names, on_path)
        for node in nodes
        if node.op in ("Conv", "Gemm", "MatMul") and node.name in on_path
    ]
    for node in nodes:
        if node.name in on_path or node.name in absorbed:
            status[node.name] = "rule"
        constant = all(t.name in static for t in node.outputs)
        status.setdefault(node.name, "constant" if constant else "not on the reverse path")
    return Plan(
        model=model,
        input_name=input_tensor.name,
        input_shape=list(input_tensor.shape or []),
        output_name=output_name,
        logits=logits,
        output_kind=kind,
        n_classes=n_classes,
        nodes=plan_nodes,
        layers=layers,
        boundaries=boundaries,
        all_nodes=[(n.name, n.op, status[n.name]) for n in nodes],
        static_values=static_values,
        opset=opset,
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
                and abs(float(hard.attrs.get("alpha", 0.2)) - 1 / 6) < 1e-6 \
                and abs(float(hard.attrs.get("beta", 0.5)) - 0.5) < 1e-6:
            return "HardSwish", {}, x, [hard.name]
        tanh = only(gate, "Tanh")
        soft = only(tanh.inputs[0].name, "Softplus") if tanh is not None else None
        if tanh is not None and soft is not None and soft.inputs[0].name == x:
            return "Mish", {}, x, [tanh.name, soft.name]
    return None


def _pick_score_output(graph: gs.Graph) -> str:
    candidates = [t for t in graph.outputs if t.dtype in (np.float32, np.float16, np.float64, None)]
    ranked = [t for t in candidates if t.shape and len(t.shape) == 2]
    chosen = (ranked or candidates)
    if not chosen:
        raise UnsupportedModelError(
            "no class-score output found (need a float [N, classes] output); pass --output NAME"
        )
    return str(chosen[0].name)


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
    if node.op == "Gemm" and node.attrs.get("transB", 0):
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
