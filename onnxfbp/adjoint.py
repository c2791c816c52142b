"""The linearized reverse pass as an onnxruntime graph.

The mini-batch schedule carries the logits residual ``r = onehot(y) - softmax(z)``
back through every node on the path with ``J^T r`` (:meth:`InverseRule.vjp`).
In NumPy that is one Python-level step per node with temporaries per tap and
per window; here the same steps are emitted once as ONNX nodes (opset 17) and
run by onnxruntime on every mini-batch:

============================  =================================================
node                          ``J^T r`` emitted as
============================  =================================================
Conv (2-D)                    ``ConvTranspose(r, W)``, same strides, pads,
                              dilations and groups; ``output_padding`` restores
                              the input size (on the CPU, stride 1, one group and
                              16 or more input channels: ``Conv`` of ``r`` with
                              ``W`` flipped and its channel axes swapped)
Gemm / MatMul                 ``alpha r B`` (transB) or ``alpha r B^T``
MaxPool (2-D)                 ``MaxPool`` indices of ``x0``, then ``MaxUnpool``
                              of ``r`` (``ScatterElements``, with ``add`` where
                              windows overlap, on the CUDA provider, which has
                              no MaxUnpool); a Relu read only by the MaxPool is
                              masked here, on the pooled grid
GlobalAveragePool, ReduceMean ``r / count`` expanded to the input shape
Relu / LeakyRelu / PRelu      ``r [x0 > 0]`` / ``r`` or ``alpha r``
AveragePool (2-D)             ``ConvTranspose`` of ``r / count`` with ones
Clip, HardSigmoid, HardSwish  ``r`` times the slope of the ramp at ``x0``
Elu, Selu, Softplus, Swish,   ``r f'(x0)`` in closed form
Mish, Gelu
Sigmoid / Tanh                ``r o0 (1 - o0)`` / ``r (1 - o0^2)``
Softmax / LogSoftmax          ``o0 (r - sum(o0 r))`` / ``r - exp(o0) sum(r)``
BatchNormalization            ``r g / sqrt(v + eps)`` per channel
LayerNormalization            ``(u - mean u - z mean(u z)) / s``, ``u = g r``
Add / Sub / Mul / Div         ``r``, ``-r``, ``c r``, ``r / c``,
                              ``-r o0 / x1``; summed over broadcast axes
GlobalMaxPool, ReduceMax      ``ArgMax`` then ``ScatterElements`` (first maximum)
Pad                           constant: ``Slice`` of ``r`` (zeros where it
                              cropped); edge / reflect: copies summed back
Slice (unit steps)            ``Pad`` of ``r`` with zeros
Gather (constant indices)     ``ScatterElements(add)`` of ``r`` at the indices
Reshape family, Transpose     the inverse index map
Concat                        ``Split`` of ``r``
============================  =================================================

Weights and other constants are graph inputs, fed their current values on
every run: nothing is rebuilt when a layer changes. A path with any other op
is not compiled (:meth:`AdjointGraph.build` returns the reason) and the NumPy
reverse pass runs instead (so does a form an emitter declines, and any graph
onnxruntime refuses when it is built and probed). Both give the same residuals
up to float32 rounding (``tests/test_adjoint``); both route a pooling window's
residual to its first maximum.

On the CUDA provider the session reads the forward tensors and writes the
residuals as CuPy arrays in GPU memory (IO binding, :func:`onnxfbp.device.run_session`);
only the weights, which live on the host, are copied in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .device import run_session
from .forward import inference_session
from .graph import Plan, PlanNode
from .rules import NodeView
from .rules.activation import clip_bounds
from .rules.linear import ConvGeometry, ConvRule
from .rules.pool import AveragePoolRule, max_axes, pool_geometry
from .rules.shape import pad_spec, slices
from .rules.smooth import EluRule

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
EMITTERS: dict[str, Emitter] = {}


def _emits(*ops: str) -> Callable[[Emitter], Emitter]:
    def register(fn: Emitter) -> Emitter:
        for op in ops:
            EMITTERS[op] = fn
        return fn

    return register


# onnxruntime's CPU ConvTranspose (a product, then col2im) against the same adjoint as
# a Conv (its NCHWc kernels), 250 samples of 14x14 to 32x32, 2 cores: ConvTranspose is
# 1.3-3x slower where the forward Conv has 16 or more input channels (the adjoint's
# output channels), and up to 3x faster where it has 1-8.
CONV_FORM_MIN_CHANNELS = 16


@_emits("Conv")
def _conv(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    x_shape = b.shape(xs[0])
    g = ConvRule().geometry(node, x_shape)
    (kh, kw), (dh, dw) = g.kernel, g.dilations
    pads = list(g.adjoint_pads())
    if (b.provider == "CPUExecutionProvider" and g.group == 1 and tuple(g.strides) == (1, 1)
            and x_shape[1] >= CONV_FORM_MIN_CHANNELS and min(pads) >= 0):
        # stride 1: J^T r is the correlation of r with the kernel flipped in space and
        # its two channel axes swapped, padded by d (k - 1) - p on each side
        swapped = b.op("Transpose", [b.static(1)], perm=[1, 0, 2, 3])
        flipped = b.op("Slice", [swapped, b.const([-1, -1], np.int64),
                                 b.const([-(2**63), -(2**63)], np.int64),
                                 b.const([2, 3], np.int64), b.const([-1, -1], np.int64)])
        return [b.op("Conv", [r, flipped], kernel_shape=[kh, kw], dilations=[dh, dw],
                     pads=pads)]
    return _transposed(b, r, b.static(1), g, x_shape, b.shape(o), g.group)


def _transposed(
    b: AdjointBuilder, r: str, w: str, g: ConvGeometry, x_shape: tuple[int, ...],
    o_shape: tuple[int, ...], group: int,
) -> list[str] | None:
    """``ConvTranspose(r, w)`` with the window geometry ``g``, ``output_padding``
    restoring the input size; None where that needs more than ONNX allows
    (``ceil_mode`` windows reaching past the padding)."""
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    oh, ow = o_shape[2:]
    pt, pl, pb, pr = g.pads
    extra = [
        x_shape[2] - ((oh - 1) * sh + (kh - 1) * dh + 1 - pt - pb),
        x_shape[3] - ((ow - 1) * sw + (kw - 1) * dw + 1 - pl - pr),
    ]
    if not all(0 <= e < max(s, d) for e, s, d in zip(extra, (sh, sw), (dh, dw), strict=True)):
        return None
    return [
        b.op(
            "ConvTranspose", [r, w], kernel_shape=[kh, kw], strides=[sh, sw],
            dilations=[dh, dw], pads=[pt, pl, pb, pr], group=group, output_padding=extra,
        )
    ]


@_emits("Gemm", "MatMul")
def _dense(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    w = b.static(1)
    if node.op_type == "Gemm" and node.attr("transA", 0):
        return None
    if not (node.op_type == "Gemm" and node.attr("transB", 0)):
        w = b.op("Transpose", [w], perm=[1, 0])
    dx = b.op("MatMul", [r, w])
    alpha = float(node.attr("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    return [dx if alpha == 1.0 else b.op("Mul", [dx, b.const(alpha)])]


@_emits("MaxPool")
def _maxpool(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    x_shape = b.shape(xs[0])
    if len(x_shape) != 4 or int(node.attr("storage_order", 0)):
        return None
    g = pool_geometry(node, x_shape)
    (kh, kw), (h, w) = g.kernel, x_shape[2:]
    oh, ow = b.shape(o)[2:]
    if b.relu_fed(xs[0]):
        # MaxPool(Relu(c)): the routed entry has c > 0 exactly when the window's max
        # o0 > 0, so the Relu's mask applies here, on the 4x smaller pooled grid.
        positive = b.op("Greater", [b.act(o), b.const(0.0)])
        r = b.op("Mul", [r, b.as_float(positive)])
        b.premasked.add(xs[0])
    _, indices = b.op_n(
        "MaxPool", [b.act(xs[0])], 2, kernel_shape=list(g.kernel), strides=list(g.strides),
        dilations=list(g.dilations), pads=list(g.pads), ceil_mode=int(node.attr("ceil_mode", 0)),
    )
    disjoint = (all(k <= st for k, st in zip(g.kernel, g.strides, strict=True))
                and not any(g.pads)
                and (oh - 1) * g.strides[0] + kh <= h and (ow - 1) * g.strides[1] + kw <= w)
    if disjoint and "MaxUnpool" not in b.avoid:
        # Windows do not overlap nor leave the input: each entry gets at most one residual.
        return [b.op("MaxUnpool", [r, indices, b.shape_of(xs[0])],
                     kernel_shape=list(g.kernel), strides=list(g.strides))]
    # The indices count over the whole flattened tensor (batch and channels too).
    flat = b.const([-1], np.int64)
    zeros = b.zeros(b.op("Shape", [b.op("Reshape", [b.act(xs[0]), flat])]))
    routed = b.op(
        "ScatterElements",
        [zeros, b.op("Reshape", [indices, flat]), b.op("Reshape", [r, flat])],
        axis=0, **({} if disjoint else {"reduction": "add"}),
    )
    return [b.op("Reshape", [routed, b.shape_of(xs[0])])]


@_emits("GlobalAveragePool", "ReduceMean")
def _average(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    x_shape = b.shape(xs[0])
    rank = len(x_shape)
    if node.op_type == "GlobalAveragePool":
        axes = list(range(2, rank))
    else:
        listed = node.attr("axes")
        if listed is None and 1 in node.static:
            listed = np.asarray(node.static[1]).ravel().tolist()
        if not listed and node.attr("noop_with_empty_axes", 0):
            return [r]
        axes = sorted(int(a) % rank for a in listed) if listed else list(range(rank))
    kept = [1 if i in axes else (-1 if i == 0 else size) for i, size in enumerate(x_shape)]
    count = int(np.prod([x_shape[i] for i in axes]))
    spread = b.op("Reshape", [r, b.const(kept, np.int64)])  # restores dropped axes
    return [b.op("Expand", [b.op("Mul", [spread, b.const(1.0 / count)]), b.shape_of(xs[0])])]


@_emits("GlobalMaxPool", "ReduceMax")
def _max_reduce(
    b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
) -> list[str] | None:
    """Each reduced group's residual goes to its first maximal entry: the reduced axes
    moved last and flattened, ``ArgMax``, ``ScatterElements``, moved back."""
    rank = len(b.shape(xs[0]))
    axes, keep = max_axes(node, rank)
    if 0 in axes:
        return None  # the batch axis stays symbolic
    rest = [a for a in range(rank) if a not in axes]
    perm = rest + list(axes)
    moved = b.op("Transpose", [b.act(xs[0])], perm=perm)
    flat = b.op("Reshape", [moved, b.const([0] * len(rest) + [-1], np.int64)])
    first = b.op("ArgMax", [flat], axis=-1, keepdims=1)
    r_rows = b.op("Transpose", [r], perm=perm) if keep else r
    r_rows = b.op("Reshape", [r_rows, b.const([0] * len(rest) + [1], np.int64)])
    zeros = b.zeros(b.op("Shape", [flat]))
    routed = b.op("ScatterElements", [zeros, first, r_rows], axis=-1)
    back = b.op("Reshape", [routed, b.op("Shape", [moved])])
    return [b.op("Transpose", [back], perm=np.argsort(perm).tolist())]


@_emits("Pad")
def _pad(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    """Constant padding: the residual of the kept window (cropped axes get zeros).
    Edge and reflect padding: each padded entry's residual added back to the entry
    it copies, one axis at a time."""
    x_shape = b.shape(xs[0])
    rank = len(x_shape)
    before, after, mode, _ = pad_spec(node, rank)
    if before[0] or after[0]:
        return None
    if mode in ("edge", "reflect"):
        if min(before + after) < 0:
            return None
        for axis in range(1, rank):
            r = _fold_copies(b, r, axis, before[axis], after[axis], x_shape[axis], mode, rank)
            if not r:
                return None
        return [r]
    if mode != "constant":
        return None
    grow = [max(0, -p) for p in before] + [max(0, -p) for p in after]
    if any(grow):
        r = b.op("Pad", [r, b.const(grow, np.int64)])
    starts = [max(0, p) for p in before[1:]]
    ends = [start + size for start, size in zip(starts, x_shape[1:], strict=True)]
    axes = list(range(1, rank))
    return [b.op("Slice", [r, b.const(starts, np.int64), b.const(ends, np.int64),
                           b.const(axes, np.int64)])]


def _fold_copies(
    b: AdjointBuilder, r: str, axis: int, p: int, q: int, n: int, mode: str, rank: int
) -> str:
    """``r`` (``p + n + q`` long on ``axis``) folded back to ``n`` entries: the kept
    window plus, for ``edge``, the ``p`` / ``q`` copies summed onto the first / last
    entry, or, for ``reflect``, the mirrored copies added to entries ``1..p`` and
    ``n-1-q..n-2``. An empty string if the form is not covered (reflect past the
    input's length)."""
    if not p and not q:
        return r
    axes = b.const([axis], np.int64)

    def part(start: int, stop: int, step: int = 1) -> str:
        return b.op("Slice", [r, b.const([start], np.int64), b.const([stop], np.int64), axes,
                              b.const([step], np.int64)])

    def total(start: int, stop: int) -> str:
        return b.op("ReduceSum", [part(start, stop), axes], keepdims=1)

    if mode == "edge":
        if n == 1:
            return total(0, p + n + q)
        pieces = [total(0, p + 1)]
        if n > 2:
            pieces.append(part(p + 1, p + n - 1))
        pieces.append(total(p + n - 1, p + n + q))
        return b.op("Concat", pieces, axis=axis)
    if p > n - 1 or q > n - 1:
        return ""

    def widths(lo: int, hi: int) -> str:
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = lo, hi
        return b.const(pads, np.int64)

    out = part(p, p + n)
    if p:  # r[p-1], ..., r[0] copy x[1], ..., x[p]
        mirrored = part(p - 1, -(2**62), -1)
        out = b.op("Add", [out, b.op("Pad", [mirrored, widths(1, n - 1 - p)])])
    if q:  # r[p+n+q-1], ..., r[p+n] copy x[n-1-q], ..., x[n-2]
        mirrored = part(p + n + q - 1, p + n - 1, -1)
        out = b.op("Add", [out, b.op("Pad", [mirrored, widths(n - 1 - q, 1)])])
    return out


@_emits("Relu", "LeakyRelu")
def _relu(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    if node.op_type == "Relu" and o in b.premasked:
        return [r]  # masked by the MaxPool it feeds
    if node.op_type == "Relu":  # Mul by a 0/1 mask: Where is slower on large maps
        mask = b.op("Greater", [b.act(xs[0]), b.const(0.0)])
        return [b.op("Mul", [r, b.as_float(mask)])]
    mask = b.op("GreaterOrEqual", [b.act(xs[0]), b.const(0.0)])
    alpha = float(node.attr("alpha", 0.01))
    return [b.op("Where", [mask, r, b.op("Mul", [r, b.const(alpha)])])]


@_emits("AveragePool")
def _average_pool(
    b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
) -> list[str] | None:
    """``r / count`` spread over each window: ConvTranspose with a ones kernel per channel."""
    x_shape = b.shape(xs[0])
    if len(x_shape) != 4:
        return None
    g = pool_geometry(node, x_shape)
    divisor = np.asarray(AveragePoolRule().divisor(node, x_shape, g, np), dtype=np.float64)
    channels = x_shape[1]
    share = b.op("Mul", [r, b.const(1.0 / divisor)])
    ones = b.const(np.ones((channels, 1, *g.kernel)))
    return _transposed(b, share, ones, g, x_shape, b.shape(o), channels)


def _slope(b: AdjointBuilder, r: str, slope: str) -> list[str]:
    return [b.op("Mul", [r, slope])]


def _inside(b: AdjointBuilder, x: str, lo: float, hi: float) -> str:
    """1.0 where ``lo < x < hi``, else 0.0."""
    mask = b.op("And", [b.op("Greater", [x, b.const(lo)]), b.op("Less", [x, b.const(hi)])])
    return b.as_float(mask)


@_emits("Clip", "HardSigmoid", "HardSwish")
def _ramps(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    """Clip: ``r [lo < x < hi]``; HardSigmoid ``alpha r [0 < alpha x + beta < 1]``;
    HardSwish ``r (x / 3 + 1/2)`` on ``(-3, 3)``, ``r`` above."""
    x = b.act(xs[0])
    if node.op_type == "Clip":
        lo, hi = clip_bounds(node)
        return _slope(b, r, _inside(b, x, lo, hi))
    if node.op_type == "HardSigmoid":
        alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
        z = b.op("Add", [b.op("Mul", [x, b.const(alpha)]), b.const(beta)])
        return _slope(b, r, b.op("Mul", [_inside(b, z, 0.0, 1.0), b.const(alpha)]))
    ramp = b.op("Add", [b.op("Mul", [x, b.const(1.0 / 3.0)]), b.const(0.5)])
    above = b.as_float(b.op("Greater", [x, b.const(3.0)]))
    return _slope(b, r, b.op("Add", [b.op("Mul", [ramp, _inside(b, x, -3.0, 3.0)]), above]))


@_emits("PRelu")
def _prelu(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    mask = b.op("GreaterOrEqual", [b.act(xs[0]), b.const(0.0)])
    return [b.op("Where", [mask, r, b.op("Mul", [r, b.static(1)])])]


@_emits("Elu", "Selu")
def _elu(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    """``gamma r`` for ``x > 0``, else ``gamma alpha e^x r``."""
    alpha, gamma = EluRule().params(node)
    x = b.act(xs[0])
    negative = b.op("Mul", [b.op("Exp", [b.op("Min", [x, b.const(0.0)])]),
                            b.const(alpha)])
    slope = b.op("Where", [b.op("Greater", [x, b.const(0.0)]), b.const(1.0), negative])
    return _slope(b, r, slope if gamma == 1.0 else b.op("Mul", [slope, b.const(gamma)]))


@_emits("Softplus", "Swish", "Mish", "Gelu")
def _smooth(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    """Softplus ``sigma(x)``; Swish ``s + alpha x s (1 - s)``, ``s = sigma(alpha x)``;
    Mish ``t + x sigma(x) (1 - t^2)``, ``t = tanh(softplus x)``; Gelu
    ``Phi(x) + x phi(x)`` (tanh form: ``(1 + t) / 2 + x (1 - t^2) c (1 + 3 k x^2) / 2``,
    ``t = tanh(c (x + k x^3))``, ``c = sqrt(2 / pi)``, ``k = 0.044715``)."""
    x = b.act(xs[0])
    mul, add, sub = (lambda *a: b.op("Mul", list(a))), (lambda *a: b.op("Add", list(a))), (
        lambda *a: b.op("Sub", list(a)))
    one = b.const(1.0)
    if node.op_type == "Softplus":
        return _slope(b, r, b.op("Sigmoid", [x]))
    if node.op_type == "Swish":
        alpha = float(node.attr("alpha", 1.0))
        sig = b.op("Sigmoid", [mul(x, b.const(alpha))])
        return _slope(b, r, add(sig, mul(mul(x, b.const(alpha)), mul(sig, sub(one, sig)))))
    if node.op_type == "Mish":
        t = b.op("Tanh", [b.op("Softplus", [x])])
        return _slope(b, r, add(t, mul(mul(x, b.op("Sigmoid", [x])), sub(one, mul(t, t)))))
    approx = node.attr("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    if approx == "tanh":
        c, k = float(np.sqrt(2.0 / np.pi)), 0.044715
        x2 = mul(x, x)
        t = b.op("Tanh", [mul(b.const(c), add(x, mul(b.const(k), mul(x2, x))))])
        inner = mul(b.const(c), add(one, mul(b.const(3.0 * k), x2)))
        slope = mul(b.const(0.5), add(add(one, t), mul(mul(x, sub(one, mul(t, t))), inner)))
        return _slope(b, r, slope)
    cdf = mul(b.const(0.5), add(one, b.op("Erf", [mul(x, b.const(1.0 / np.sqrt(2.0)))])))
    pdf = mul(b.const(1.0 / np.sqrt(2.0 * np.pi)),
              b.op("Exp", [mul(b.const(-0.5), mul(x, x))]))
    return _slope(b, r, add(cdf, mul(x, pdf)))


@_emits("Sigmoid", "Tanh")
def _squash(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    y = b.act(o)
    if node.op_type == "Sigmoid":
        slope = b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])
    else:
        slope = b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])
    return [b.op("Mul", [r, slope])]


@_emits("Softmax", "LogSoftmax")
def _softmax(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    rank = len(b.shape(xs[0]))
    axis = int(node.attr("axis", -1 if node.opset >= 13 else 1)) % rank
    if node.opset < 13 and axis != rank - 1:
        return None  # coerced to 2-D at axis: rows span several dims
    axes = b.const([axis], np.int64)
    y = b.act(o)
    if node.op_type == "Softmax":
        dot = b.op("ReduceSum", [b.op("Mul", [r, y]), axes], keepdims=1)
        return [b.op("Mul", [y, b.op("Sub", [r, dot])])]
    total = b.op("ReduceSum", [r, axes], keepdims=1)
    return [b.op("Sub", [r, b.op("Mul", [b.op("Exp", [y]), total])])]


@_emits("BatchNormalization")
def _batchnorm(
    b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
) -> list[str] | None:
    rank = len(b.shape(xs[0]))
    eps = b.const(float(node.attr("epsilon", 1e-5)))
    scale = b.op("Div", [b.static(1), b.op("Sqrt", [b.op("Add", [b.static(4), eps])])])
    scale = b.op("Reshape", [scale, b.const([-1] + [1] * (rank - 2), np.int64)])
    return [b.op("Mul", [r, scale])]


@_emits("LayerNormalization")
def _layernorm(
    b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
) -> list[str] | None:
    """``(u - mean(u) - z mean(u z)) / s`` with ``u = g r``, ``z = (x - m) / s`` over
    the normalized (trailing) axes."""
    rank = len(b.shape(xs[0]))
    axes = list(range(int(node.attr("axis", -1)) % rank, rank))
    if 0 in axes:
        return None  # the batch axis stays symbolic

    def mean(v: str) -> str:
        return b.op("ReduceMean", [v], axes=axes, keepdims=1)

    x = b.act(xs[0])
    centered = b.op("Sub", [x, mean(x)])
    spread = b.op("Sqrt", [b.op("Add", [mean(b.op("Mul", [centered, centered])),
                                        b.const(float(node.attr("epsilon", 1e-5)))])])
    z = b.op("Div", [centered, spread])
    u = b.op("Mul", [r, b.static(1)])
    d = b.op("Sub", [b.op("Sub", [u, mean(u)]), b.op("Mul", [z, mean(b.op("Mul", [u, z]))])])
    return [b.op("Div", [d, spread])]


@_emits("Add", "Sub", "Mul", "Div")
def _arithmetic(
    b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
) -> list[str] | None:
    op = node.op_type
    out_shape = b.shape(o)

    def operand(index: int) -> str:
        if index in node.static:
            return b.static(index)
        return b.act(xs[node.dynamic.index(index)])

    deltas = []
    for index, name in zip(node.dynamic, xs, strict=True):
        if op == "Add" or (op == "Sub" and index == 0):
            d = r
        elif op == "Sub":
            d = b.op("Neg", [r])
        elif op == "Mul":
            d = b.op("Mul", [r, operand(1 - index)])
        elif index == 0:
            d = b.op("Div", [r, operand(1)])
        else:  # d(a / x)/dx = -(a / x) / x
            d = b.op("Neg", [b.op("Div", [b.op("Mul", [r, b.act(o)]), operand(1)])])
        deltas.append(b.unbroadcast(d, out_shape, b.shape(name)))
    return deltas


@_emits("Slice")
def _slice(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    """Unit steps: ``r`` zero-padded back to the input's extent."""
    x_shape = b.shape(xs[0])
    before, after = [], []
    for axis, (sel, size) in enumerate(zip(slices(node, len(x_shape)), x_shape, strict=True)):
        if axis == 0:  # the batch axis is symbolic: only "all of it" is known to hold
            whole = sel.start in (None, 0) and sel.step in (None, 1) and (
                sel.stop is None or sel.stop >= 2**31 - 1)
            if not whole:
                return None
            before.append(0)
            after.append(0)
            continue
        start, stop, step = sel.indices(size)
        if step != 1:
            return None
        before.append(start)
        after.append(size - max(stop, start))
    return [b.op("Pad", [r, b.const(before + after, np.int64)])]


@_emits("Gather")
def _gather(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    """Constant indices along ``axis``: ``r`` added back at them (``ScatterElements``,
    repeated indices sum), the indices flattened and broadcast over ``r``."""
    x_shape = b.shape(xs[0])
    rank = len(x_shape)
    axis = int(node.attr("axis", 0)) % rank
    if axis == 0:
        return None  # the batch axis stays symbolic
    index = np.asarray(node.const(1)).astype(np.int64).ravel() % x_shape[axis]
    rows = [0] + list(x_shape[1:axis]) + [index.size] + list(x_shape[axis + 1:])
    flat = b.op("Reshape", [r, b.const(rows, np.int64)])
    spots = b.const(index.reshape([1] * axis + [index.size] + [1] * (rank - axis - 1)),
                    np.int64)
    spots = b.op("Expand", [spots, b.op("Shape", [flat])])
    zeros = b.zeros(b.shape_of(xs[0]))
    return [b.op("ScatterElements", [zeros, spots, flat], axis=axis, reduction="add")]


@_emits("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout")
def _reshape(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    return [b.op("Reshape", [r, b.shape_of(xs[0])])]


@_emits("Transpose")
def _transpose(
    b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
) -> list[str] | None:
    rank = len(b.shape(xs[0]))
    perm = node.attr("perm")
    perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
    return [b.op("Transpose", [r], perm=np.argsort(perm).tolist())]


@_emits("Concat")
def _concat(b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str) -> list[str] | None:
    rank = len(b.shape(o))
    axis = int(node.attr("axis")) % rank
    sizes = []
    for i in range(node.n_inputs):
        if i in node.static:
            sizes.append(int(np.shape(node.static[i])[axis]))
        else:
            sizes.append(b.shape(xs[node.dynamic.index(i)])[axis])
    parts = b.op_n("Split", [r, b.const(sizes, np.int64)], len(sizes), axis=axis)
    return [parts[i] for i in node.dynamic]


_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
               np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.int32): TensorProto.INT32}


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
            if out not in sums:
                continue
            emit = EMITTERS.get(pn.op)
            if emit is None:
                raise AdjointUnavailable(f"no onnx adjoint for {pn.op}")
            b.node = pn
            xs = [pn.inputs[j] for j in pn.data_inputs]
            try:
                deltas = emit(b, views[pn.name], sums[out], xs, out)
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
        return helper.make_tensor_value_info(name, _onnx_type(value.dtype), dims)

    logits = acts[plan.logits]
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
