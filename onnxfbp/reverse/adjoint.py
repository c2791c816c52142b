"""The linearized reverse pass as an onnxruntime graph.

The mini-batch schedule carries the logits residual ``r = onehot(y) - softmax(z)``
back through every node on the path with ``J^T r`` (:meth:`InverseRule.vjp`).
In NumPy that is one Python-level step per node with temporaries per tap and
per window; here the same steps are emitted once as ONNX nodes (opset 17) and
run by onnxruntime on every mini-batch. Each op's form is its rule's
:meth:`InverseRule.emit_adjoint` in the op table (:mod:`onnxfbp.rules`), beside
the NumPy ``vjp`` it equals; the rule modules' docstrings state the math. This
module holds what every emitter uses (:class:`AdjointBuilder`) and the graph
that strings the emitted steps together (:class:`AdjointGraph`).

Weights and other constants are graph inputs, fed their current values on
every run: nothing is rebuilt when a layer changes. A path with any other op
is not compiled (:meth:`AdjointGraph.build` returns the reason) and the NumPy
reverse pass runs instead (so does a form an emitter declines, and any graph
onnxruntime refuses when it is built and probed). Both give the same residuals
up to float32 rounding (``tests/test_adjoint``); both route a pooling window's
residual to its first maximum.

On the CUDA provider the session reads the forward tensors and writes the
residuals as CuPy arrays in GPU memory (IO binding, :func:`onnxfbp.run.device.run_session`);
only the weights, which live on the host, are copied in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..graph.plan import Plan, PlanNode
from ..rules import RULES, NodeView, fills
from ..run.device import run_session
from ..run.forward import inference_session

__all__ = ["OPSET", "AdjointBuilder", "AdjointGraph", "EMITTERS"]

OPSET = 17
R_LOGITS = "onnxfbp_adjoint__r_logits"


class AdjointBuilder:
    """Collects the nodes of the reverse graph; what an emitter may use.

    ``shapes`` are the shapes of the forward tensors in a sample batch (batch
    first); the graph declares the batch dimension symbolic. ``avoid`` names ops
    the execution provider lacks, for emitters that have another form;
    ``provider`` is the provider that will run the graph.
    """

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], float_type: Any,
        graph: onnx.GraphProto | None = None, avoid: frozenset[str] = frozenset(),
        provider: str = "CPUExecutionProvider",
    ) -> None:
        self.shapes = dict(shapes)
        self.avoid = avoid
        self.provider = provider  # the one that runs the graph: some forms are faster there
        self.float_type = np.dtype(float_type)
        # Relu outputs read by exactly one node (of the whole model): see :meth:`relu_fed`
        self._relu_outputs: set[str] = set()
        if graph is not None:
            readers: dict[str, int] = {}
            for n in graph.node:
                for name in set(n.input):
                    readers[name] = readers.get(name, 0) + 1
            self._relu_outputs = {n.output[0] for n in graph.node
                                  if n.op_type == "Relu" and readers.get(n.output[0]) == 1}
        self.premasked: set[str] = set()  # Relu outputs whose residual is already masked
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.activations: list[str] = []  # forward tensors fed at run time
        self.statics: dict[str, tuple[str, int]] = {}  # input name -> (node name, index)
        self.node: PlanNode | None = None  # the node being emitted
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"onnxfbp_adjoint__{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        """One node with one output; returns the output's name."""
        (out,) = self.op_n(op_type, inputs, 1, **attrs)
        return out

    def op_n(self, op_type: str, inputs: Sequence[str], n: int, **attrs: Any) -> list[str]:
        outs = [self.fresh(op_type.lower()) for _ in range(n)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs

    def const(self, value: Any, dtype: Any = None) -> str:
        """A constant; floats take the activations' dtype."""
        name = self.fresh("const")
        array = np.asarray(value, dtype=dtype or self.float_type)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def act(self, name: str) -> str:
        """A tensor of the forward pass (``x0`` or ``o0`` of a node), fed at run time."""
        if name not in self.activations:
            self.activations.append(name)
        return name

    def static(self, index: int) -> str:
        """The current node's constant input ``index`` (weights: their current value)."""
        assert self.node is not None
        name = self.node.static_names[index]
        self.statics.setdefault(name, (self.node.name, index))
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def relu_fed(self, tensor: str) -> bool:
        """Whether ``tensor`` is a Relu's output that nothing else reads."""
        return tensor in self._relu_outputs

    def as_float(self, mask: str) -> str:
        """A boolean tensor as 0.0 / 1.0 in the activations' dtype."""
        return self.op("Cast", [mask], to=_onnx_type(self.float_type))

    def inside(self, x: str, lo: float, hi: float) -> str:
        """1.0 where ``lo < x < hi``, else 0.0."""
        mask = self.op("And", [self.op("Greater", [x, self.const(lo)]),
                               self.op("Less", [x, self.const(hi)])])
        return self.as_float(mask)

    def zeros(self, shape: str) -> str:
        """Zeros of the activations' dtype shaped by the 1-D tensor ``shape``."""
        zero = helper.make_tensor("value", _onnx_type(self.float_type), [1], [0.0])
        return self.op("ConstantOfShape", [shape], value=zero)

    def shape_of(self, tensor: str) -> str:
        """``Shape(tensor)`` of a forward tensor, as a graph value."""
        return self.op("Shape", [self.act(tensor)])

    def unbroadcast(self, r: str, out_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> str:
        """``r`` (shaped like the output) summed over the axes ``x`` was broadcast along."""
        lead = len(out_shape) - len(x_shape)
        axes = list(range(lead)) + [
            lead + i
            for i, size in enumerate(x_shape)
            if size == 1 and out_shape[lead + i] != 1
        ]
        if not axes:
            return r
        summed = self.op("ReduceSum", [r, self.const(axes, np.int64)], keepdims=1)
        shape = [-1, *x_shape[1:]] if lead == 0 else list(x_shape)  # batch stays symbolic
        return self.op("Reshape", [summed, self.const(shape, np.int64)])


Emitter = Callable[[AdjointBuilder, NodeView, str, list[str], str], "list[str] | None"]
# Each op's emitter is its rule's emit_adjoint, in the op table (onnxfbp.rules).
EMITTERS: dict[str, Emitter] = {
    op: rule.emit_adjoint for op, rule in RULES.items() if fills(rule, "emit_adjoint")
}


_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
               np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL}


def _onnx_type(dtype: Any) -> int:
    return _ONNX_TYPES[np.dtype(dtype)]


class AdjointUnavailable(Exception):
    """The reverse pass does not compile: the message says which node or form,
    or what onnxruntime declined (the caller falls back to the array pass)."""


class AdjointGraph:
    """One onnxruntime session computing the residual ``-dL/dz`` at every
    requested tensor from the logits residual and the forward activations.

    Build with :meth:`build`; run with :meth:`run`. ``activations`` are the
    forward tensors the session reads (request them from the forward pass).
    """

    def __init__(
        self,
        builder: AdjointBuilder,
        outputs: list[str],
        session: ort.InferenceSession,
        output_names: list[str],
        model: onnx.ModelProto,
        xp: Any = np,
    ) -> None:
        self.model = model  # the compiled graph, for inspection
        self.xp = xp
        self.on_device = False  # the last run kept CuPy arrays on the GPU (IO binding)
        self.activations = list(builder.activations)
        self.statics = dict(builder.statics)
        self.outputs = outputs
        self._session = session
        self._output_names = output_names

    @staticmethod
    def build(
        plan: Plan,
        path: Sequence[int],
        outputs: Sequence[str],
        acts: Mapping[str, np.ndarray],
        views: Mapping[str, NodeView],
        providers: list[str],
        threads: int | None = None,
        xp: Any = np,
        avoid: frozenset[str] | None = None,
    ) -> AdjointGraph:
        """The graph for ``path`` (indices into ``plan.nodes``, forward order) that
        returns the residual at each of ``outputs``; raises
        :class:`AdjointUnavailable` with the reason if a node on the path has no
        emitter (or a form it does not cover) or onnxruntime declines the graph.
        ``acts`` is one batch of forward tensors (shapes and dtypes), arrays of
        ``xp`` (NumPy, or CuPy on the CUDA provider: then the run reads and returns
        device arrays). ``avoid``: ops not to emit (default: those the first
        provider lacks)."""
        shapes = {k: tuple(v.shape) for k, v in acts.items()}
        model = getattr(plan, "model", None)  # (a bare node list in the per-op tests)
        # onnxruntime's CUDA provider has no MaxUnpool kernel: it would run on the
        # CPU, with the residual and indices copied off the GPU and back every run.
        if avoid is None:
            avoid = frozenset({"MaxUnpool"} if "CUDAExecutionProvider" in providers else ())
        b = AdjointBuilder(shapes, np.dtype(acts[plan.logits].dtype),
                           model.graph if model is not None else None, avoid, providers[0])
        sums: dict[str, str] = {plan.logits: R_LOGITS}
        for i in reversed(list(path)):
            pn = plan.nodes[i]
            out = pn.outputs[0]
            multi = RULES[pn.op].multi_output if pn.op in RULES else False
            if not (any(o in sums for o in pn.outputs) if multi else out in sums):
                continue
            emit = EMITTERS.get(pn.op)
            if emit is None:
                raise AdjointUnavailable(f"no onnx adjoint for {pn.op}")
            b.node = pn
            xs = [pn.inputs[j] for j in pn.data_inputs]
            # several outputs (Split): one residual name per output, None where none
            r: Any = [sums.get(o) for o in pn.outputs] if multi else sums[out]
            try:
                deltas = emit(b, views[pn.name], r, xs, out)
            except (KeyError, ValueError, TypeError) as exc:
                raise AdjointUnavailable(f"{pn.op} {pn.name!r}: {exc}") from exc
            if deltas is None:
                raise AdjointUnavailable(f"{pn.op} {pn.name!r}: form not covered")
            for name, delta in zip(xs, deltas, strict=True):
                sums[name] = b.op("Add", [sums[name], delta]) if name in sums else delta
        missing = [name for name in outputs if name not in sums]
        if missing:
            raise AdjointUnavailable(f"no residual reaches {missing[0]}")
        fed = {R_LOGITS, *b.activations, *b.statics}
        output_names = []
        for name in outputs:  # a graph input cannot be an output too: copy it
            output_names.append(b.op("Identity", [sums[name]]) if sums[name] in fed
                                else sums[name])
        model = _model(b, plan, acts, views, output_names)
        try:
            session = inference_session(model, providers, threads)
            graph = AdjointGraph(b, list(outputs), session, output_names, model, xp)
            r_logits = xp.zeros_like(acts[plan.logits])
            graph.run(acts, r_logits, views)  # a form that fails only when run
        except Exception as exc:  # a form onnxruntime declines: use NumPy
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise AdjointUnavailable(f"onnxruntime declines the adjoint graph: {first}") from exc
        return graph

    def feeds(
        self, acts: Mapping[str, Any], r_logits: Any, views: Mapping[str, NodeView]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {R_LOGITS: r_logits}
        for name in self.activations:
            out[name] = acts[name]
        for name, (node, index) in self.statics.items():
            out[name] = np.asarray(views[node].const(index))
        return out

    def run(
        self, acts: Mapping[str, Any], r_logits: Any, views: Mapping[str, NodeView]
    ) -> dict[str, Any]:
        """Residual at each of :attr:`outputs` for this batch (arrays of ``xp``)."""
        feeds = self.feeds(acts, r_logits, views)
        got, self.on_device = run_session(self._session, feeds, self._output_names, self.xp)
        return dict(zip(self.outputs, got, strict=True))


def _model(
    b: AdjointBuilder,
    plan: Plan,
    acts: Mapping[str, np.ndarray],
    views: Mapping[str, NodeView],
    output_names: list[str],
) -> onnx.ModelProto:
    def declared(name: str, value: Any, batch: bool) -> onnx.ValueInfoProto:
        dims: list[int | str] = list(value.shape)
        if batch and dims:
            dims[0] = "batch"
            # the batch axis of a tensor is not always first (attention's stacked
            # q, k, v: (3, N, ...)): an axis of the batch's size is symbolic too
            dims[1:] = [f"batch{k}" if d == n else d for k, d in enumerate(dims[1:], 1)]
        return helper.make_tensor_value_info(name, _onnx_type(value.dtype), dims)

    logits = acts[plan.logits]
    n = int(logits.shape[0])
    inputs = [declared(R_LOGITS, logits, True)]
    inputs += [declared(name, acts[name], True) for name in b.activations]
    inputs += [
        declared(name, np.asarray(views[node].const(index)), False)
        for name, (node, index) in b.statics.items()
    ]
    outputs = [helper.make_tensor_value_info(name, _onnx_type(logits.dtype), None)
               for name in output_names]
    graph = helper.make_graph(b.nodes, "onnxfbp_adjoint", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model
