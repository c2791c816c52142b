"""Contract tests, one table of op specs driving the same checks for every rule:

1. the rule's NumPy forward matches onnxruntime on a one-node model;
2. ``f(inverse(t))`` is closer to ``t`` than ``f(x0)`` is;
3. linear rules satisfy the adjoint identity ``<A v, w> = <v, A^T w>``.

The reverse steps (``vjp``, emitters, sparse forms) are checked against the same
table in ``test_ops_contract``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfbp.rules import RULES, NodeView


@dataclass
class Spec:
    op: str
    shapes: list[tuple[int, ...]]  # dynamic inputs
    consts: dict[int, np.ndarray] = field(default_factory=dict)  # input index -> value
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 13
    id: str = ""
    positive: bool = False  # inputs/targets must be in (0, 1) (probabilities)

    @property
    def n_inputs(self) -> int:
        return len(self.shapes) + len(self.consts)


rng = np.random.default_rng(0)


def r(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


SPECS = [
    Spec("Gemm", [(5, 6)], {1: r(4, 6), 2: r(4)}, {"transB": 1, "alpha": 0.5, "beta": 2.0},
         id="gemm-transB"),
    Spec("Gemm", [(5, 6)], {1: r(6, 3)}, id="gemm-nobias"),
    Spec("MatMul", [(5, 6)], {1: r(6, 3)}, id="matmul"),
    Spec("MatMul", [(2, 5, 6)], {1: r(6, 3)}, id="matmul-3d"),
    Spec("Conv", [(2, 3, 7, 7)], {1: r(4, 3, 3, 3), 2: r(4)}, {"pads": [1, 1, 1, 1]},
         id="conv-pad"),
    Spec("Conv", [(2, 3, 8, 8)], {1: r(4, 3, 3, 3)}, {"strides": [2, 2]}, id="conv-stride"),
    Spec("Conv", [(2, 2, 9, 9)], {1: r(4, 2, 3, 3)}, {"dilations": [2, 2], "pads": [0, 1, 2, 1]},
         id="conv-dilation-asym"),
    Spec("Conv", [(2, 4, 6, 6)], {1: r(6, 2, 3, 3)}, {"group": 2, "pads": [1, 1, 1, 1]},
         id="conv-group"),
    Spec("Conv", [(1, 1, 7, 7)], {1: r(2, 1, 5, 5)}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
         id="conv-same-upper"),
    Spec("Conv", [(1, 2, 6, 6)], {1: r(2, 2, 2, 2)}, {"auto_pad": "SAME_LOWER"},
         id="conv-same-lower"),
    Spec("Relu", [(3, 4, 5)], id="relu"),
    Spec("LeakyRelu", [(3, 8)], attrs={"alpha": 0.1}, id="leakyrelu"),
    Spec("PRelu", [(2, 3, 4, 4)], {1: np.abs(r(3, 1, 1)) + 0.05}, id="prelu"),
    Spec("Sigmoid", [(4, 7)], id="sigmoid"),
    Spec("Tanh", [(4, 7)], id="tanh"),
    Spec("Elu", [(4, 7)], attrs={"alpha": 0.5}, id="elu"),
    Spec("Selu", [(4, 7)], id="selu"),
    Spec("Softplus", [(4, 7)], id="softplus"),
    Spec("HardSigmoid", [(4, 7)], attrs={"alpha": 0.3, "beta": 0.4}, id="hardsigmoid"),
    Spec("HardSwish", [(3, 4, 5)], opset=14, id="hardswish"),
    Spec("Gelu", [(3, 4, 5)], opset=20, id="gelu"),
    Spec("Gelu", [(3, 4, 5)], attrs={"approximate": "tanh"}, opset=20, id="gelu-tanh"),
    Spec("Mish", [(3, 4, 5)], opset=18, id="mish"),
    Spec("Swish", [(3, 4, 5)], attrs={"alpha": 0.7}, opset=24, id="swish"),
    Spec("Clip", [(4, 7)], {1: np.array(-0.5, np.float32), 2: np.array(0.7, np.float32)},
         id="clip"),
    Spec("Softmax", [(4, 10)], attrs={"axis": 1}, id="softmax"),
    Spec("LogSoftmax", [(4, 10)], attrs={"axis": -1}, id="logsoftmax"),
    Spec("Softmax", [(4, 10)], attrs={"axis": 1}, opset=11, id="softmax-opset11"),
    Spec("MaxPool", [(2, 3, 8, 8)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
         id="maxpool"),
    Spec("MaxPool", [(2, 3, 9, 9)],
         attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         id="maxpool-overlap"),
    Spec("MaxPool", [(1, 2, 7, 7)],
         attrs={"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
         id="maxpool-ceil"),
    Spec("AveragePool", [(2, 3, 8, 8)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
         id="avgpool"),
    Spec("AveragePool", [(2, 3, 6, 6)], attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
         id="avgpool-pad-exclude"),
    Spec("GlobalAveragePool", [(2, 3, 5, 5)], id="gap"),
    Spec("ReduceMean", [(2, 3, 5, 5)], attrs={"axes": [2, 3], "keepdims": 0}, id="reducemean"),
    Spec("ReduceMean", [(2, 3, 5, 5)], {1: np.array([2, 3], np.int64)}, opset=18,
         id="reducemean-18"),
    Spec("GlobalMaxPool", [(2, 3, 5, 5)], id="gmp"),
    Spec("ReduceMax", [(2, 3, 5, 5)], attrs={"axes": [1, 3], "keepdims": 0}, id="reducemax"),
    Spec("ReduceMax", [(2, 3, 5, 5)], {1: np.array([-1], np.int64)}, opset=18,
         id="reducemax-18"),
    Spec("LayerNormalization", [(2, 5, 6)], {1: np.abs(r(6)) + 0.1, 2: r(6)}, opset=17,
         id="layernorm"),
    Spec("LayerNormalization", [(2, 3, 4, 4)], {1: r(4, 4)}, {"axis": 2, "epsilon": 1e-3},
         opset=17, id="layernorm-axis2-nobias"),
    Spec("Reshape", [(2, 3, 4)], {1: np.array([2, -1], np.int64)}, id="reshape"),
    Spec("Flatten", [(2, 3, 4, 5)], attrs={"axis": 1}, id="flatten"),
    Spec("Squeeze", [(2, 1, 4)], {1: np.array([1], np.int64)}, id="squeeze"),
    Spec("Unsqueeze", [(2, 4)], {1: np.array([1, 3], np.int64)}, id="unsqueeze"),
    Spec("Transpose", [(2, 3, 4, 5)], attrs={"perm": [0, 2, 3, 1]}, id="transpose"),
    Spec("Identity", [(3, 4)], id="identity"),
    Spec("Dropout", [(3, 4)], id="dropout"),
    Spec("Concat", [(2, 3, 4), (2, 5, 4)], attrs={"axis": 1}, id="concat"),
    Spec("Add", [(2, 3, 4), (2, 3, 4)], id="add-residual"),
    Spec("Add", [(2, 3, 4, 4)], {1: r(3, 1, 1)}, id="add-const"),
    Spec("Sub", [(2, 6)], {1: r(6)}, id="sub-const"),
    Spec("Mul", [(2, 6)], {1: r(6)}, id="mul-const"),
    Spec("Div", [(2, 6)], {1: np.abs(r(6)) + 0.5}, id="div-const"),
    Spec("Pad", [(2, 3, 5, 5)], {1: np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, id="pad"),
    Spec("Pad", [(2, 3, 5, 5)],
         {1: np.array([0, 0, 1, -1, 0, 0, -2, 2], np.int64), 2: np.array(0.5, np.float32)},
         id="pad-value-crop"),
    Spec("Pad", [(2, 3, 5, 5)], {1: np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64)},
         {"mode": "edge"}, id="pad-edge"),
    Spec("Pad", [(2, 3, 5, 5)], {1: np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64)},
         {"mode": "reflect"}, id="pad-reflect"),
    Spec("Pad", [(2, 3, 5, 5)],
         {1: np.array([1, 2, 2, 0], np.int64), 2: np.array(0.0, np.float32),
          3: np.array([2, -1], np.int64)}, opset=18, id="pad-axes-18"),
    Spec("Pad", [(2, 3, 5)], attrs={"pads": [0, 1, 1, 0, 0, 2], "value": -1.0}, opset=2,
         id="pad-opset2"),
    Spec("Slice", [(2, 6, 7)],
         {1: np.array([1, -1], np.int64), 2: np.array([5, -7], np.int64),
          3: np.array([1, 2], np.int64), 4: np.array([2, -2], np.int64)}, id="slice-steps"),
    Spec("Slice", [(2, 6, 7)], {1: np.array([0, 2], np.int64), 2: np.array([2**62, 5], np.int64)},
         id="slice"),
    Spec("Gather", [(3, 5, 4)], {1: np.array([[4, 0], [-1, 1]], np.int64)}, {"axis": 1},
         id="gather-repeat"),
    Spec("Gather", [(3, 2, 4)], {1: np.array(1, np.int64)}, {"axis": 0}, id="gather-scalar-0"),
    Spec("Gather", [(2, 5, 4)], {1: np.array(-1, np.int64)}, {"axis": 1}, id="gather-scalar"),
    Spec("Gather", [(2, 5, 4)], {1: np.array([3, 3, 0], np.int64)}, {"axis": 2},
         id="gather-vector"),
    Spec("BatchNormalization", [(2, 3, 4, 4)],
         {1: r(3), 2: r(3), 3: r(3), 4: np.abs(r(3)) + 0.1}, attrs={"epsilon": 1e-3},
         id="batchnorm"),
    # linearized only (the default schedule): products of activations, attention...
    Spec("Mul", [(2, 3, 4, 4), (2, 3, 1, 1)], id="mul-se-gate"),
    Spec("Mul", [(2, 5), (2, 5)], id="mul-two"),
    Spec("Div", [(2, 6), (1, 6)], id="div-two", positive=True),
    Spec("Div", [(2, 6)], {0: np.abs(r(6)) + 0.5}, id="div-const-by-act", positive=True),
    Spec("Sub", [(2, 3, 4), (2, 3, 1)], id="sub-two-broadcast"),
    Spec("MatMul", [(2, 3, 5, 4), (2, 3, 4, 6)], id="matmul-qk"),
    Spec("MatMul", [(2, 3, 5, 4), (1, 4, 6)], id="matmul-broadcast"),
    Spec("Einsum", [(2, 3, 4), (2, 4, 5)], attrs={"equation": "bij,bjk->bik"}, opset=13,
         id="einsum-bmm"),
    Spec("Einsum", [(2, 3, 4)], {1: r(4, 5)}, {"equation": "bij,jk->bik"}, opset=13,
         id="einsum-const"),
    Spec("Softmax", [(2, 3, 4, 5)], attrs={"axis": 1}, id="softmax-axis1-4d"),
    Spec("Softmax", [(2, 3, 4, 5)], attrs={"axis": 1}, opset=11, id="softmax-coerced-11"),
    Spec("LogSoftmax", [(2, 3, 4)], attrs={"axis": 1}, opset=11, id="logsoftmax-coerced-11"),
    Spec("Sqrt", [(3, 4)], id="sqrt", positive=True),
    Spec("Erf", [(3, 4)], id="erf"),
    Spec("Exp", [(3, 4)], id="exp"),
    Spec("Log", [(3, 4)], id="log", positive=True),
    Spec("Neg", [(3, 4)], id="neg"),
    Spec("Reciprocal", [(3, 4)], id="reciprocal", positive=True),
    Spec("Abs", [(3, 4)], id="abs"),
    Spec("Pow", [(3, 4)], {1: np.array(3.0, np.float32)}, id="pow-3"),
    Spec("Pow", [(3, 4)], {1: np.array(0.5, np.float32)}, id="pow-half", positive=True),
    Spec("Cast", [(3, 4)], attrs={"to": 11}, id="cast-double"),
    Spec("Split", [(2, 6, 3)], {1: np.array([2, 4], np.int64)}, {"axis": 1}, id="split"),
    Spec("Split", [(2, 3, 6)], attrs={"axis": -1, "num_outputs": 3}, opset=18,
         id="split-equal"),
    Spec("Expand", [(2, 3, 1)], {1: np.array([2, 3, 4], np.int64)}, id="expand"),
    Spec("Expand", [(3, 1)], {1: np.array([2, 1, 4], np.int64)}, id="expand-rank"),
    Spec("Tile", [(2, 3, 2)], {1: np.array([1, 2, 3], np.int64)}, id="tile"),
    Spec("Where", [(2, 3, 4), (2, 3, 1)], {0: np.arange(12).reshape(3, 4) % 3 == 0},
         id="where-const-cond"),
    Spec("Where", [(2, 3, 4)], {0: np.arange(12).reshape(3, 4) % 2 == 0, 2: r(1)},
         id="where-one-act"),
    Spec("ReduceSum", [(2, 3, 4, 4)], {1: np.array([2, 3], np.int64)}, id="reducesum"),
    Spec("ReduceSum", [(2, 3, 4)], attrs={"axes": [1], "keepdims": 0}, opset=11,
         id="reducesum-11"),
    Spec("ReduceL2", [(2, 3, 4)], attrs={"axes": [-1], "keepdims": 1}, id="reducel2"),
    Spec("ReduceL2", [(2, 3, 4)], {1: np.array([1], np.int64)}, {"keepdims": 0}, opset=18,
         id="reducel2-18"),
    Spec("InstanceNormalization", [(2, 3, 4, 5)], {1: r(3), 2: r(3)}, id="instancenorm"),
    Spec("GroupNormalization", [(2, 6, 3, 3)], {1: r(6), 2: r(6)},
         {"num_groups": 3, "epsilon": 1e-3}, opset=21, id="groupnorm"),
    Spec("ConvTranspose", [(2, 3, 5, 5)], {1: r(3, 4, 3, 3), 2: r(4)},
         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, id="convt"),
    Spec("ConvTranspose", [(2, 4, 4, 3)], {1: r(4, 1, 2, 3)},
         {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 1, 0], "group": 2},
         id="convt-group-dilated"),
    Spec("ConvTranspose", [(1, 2, 4, 4)], {1: r(2, 3, 4, 4)},
         {"strides": [2, 2], "pads": [1, 1, 1, 1]}, id="convt-k4s2"),
    Spec("Resize", [(2, 3, 4, 5)], {1: np.zeros(0, np.float32),
                                    2: np.array([1, 1, 2, 2], np.float32)},
         {"mode": "nearest"}, id="resize-nearest"),
    Spec("Resize", [(2, 3, 4, 5)], {1: np.zeros(0, np.float32),
                                    2: np.array([1, 1, 2, 1.5], np.float32)},
         {"mode": "linear"}, id="resize-linear-half-pixel"),
    Spec("Resize", [(1, 2, 4, 5)], {1: np.zeros(0, np.float32), 2: np.zeros(0, np.float32),
                                    3: np.array([1, 2, 7, 3], np.int64)},
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         id="resize-linear-align-sizes"),
    Spec("Resize", [(1, 2, 4, 4)], {1: np.zeros(0, np.float32),
                                    2: np.array([1, 1, 3, 3], np.float32)},
         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
          "nearest_mode": "floor"}, id="resize-nearest-asymmetric"),
    Spec("Resize", [(1, 2, 4, 4)], {1: np.zeros(0, np.float32),
                                    2: np.array([1, 1, 2, 2], np.float32)},
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
         id="resize-linear-pytorch"),
    Spec("Upsample", [(1, 2, 3, 4)], {1: np.array([1, 1, 2, 2], np.float32)},
         {"mode": "nearest"}, opset=9, id="upsample-9"),
]


def _dynamic_indices(spec: Spec) -> tuple[int, ...]:
    return tuple(i for i in range(spec.n_inputs) if i not in spec.consts)


def _view(spec: Spec) -> NodeView:
    attrs = {k: (v.encode() if isinstance(v, str) else v) for k, v in spec.attrs.items()}
    return NodeView(spec.op, spec.id, attrs, dict(spec.consts), _dynamic_indices(spec),
                    spec.n_inputs,
                    spec.opset)


def _onnx_forward(spec: Spec, xs: list[np.ndarray], n_out: int = 1) -> list[np.ndarray]:
    dyn = _dynamic_indices(spec)
    names = [f"in{i}" for i in range(spec.n_inputs)]
    inputs = [helper.make_tensor_value_info(names[i], TensorProto.FLOAT, list(x.shape))
              for i, x in zip(dyn, xs, strict=True)]
    inits = [numpy_helper.from_array(v, names[i]) for i, v in spec.consts.items()]
    outs = ["out"] + [f"out{k}" for k in range(1, n_out)]
    node = helper.make_node(spec.op, names, outs, **spec.attrs)
    out_type = int(spec.attrs.get("to", TensorProto.FLOAT))  # Cast: its type
    out = [helper.make_tensor_value_info(o, out_type, None) for o in outs]
    graph = helper.make_graph([node], "one", inputs, out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import), True))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outs, {names[i]: x for i, x in zip(dyn, xs, strict=True)})


def _inputs(spec: Spec, seed: int = 1) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    xs = [g.standard_normal(s).astype(np.float32) for s in spec.shapes]
    if spec.positive:  # domain of Sqrt, Log...: away from zero
        xs = [np.abs(x) + 0.5 for x in xs]
    return xs


def _outputs(spec: Spec) -> int:
    """Outputs of the spec's node (Split: one per part)."""
    if spec.op != "Split":
        return 1
    return len(spec.consts[1]) if 1 in spec.consts else int(spec.attrs["num_outputs"])


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_forward_matches_onnxruntime(spec: Spec) -> None:
    xs = _inputs(spec)
    expected = _onnx_forward(spec, xs, _outputs(spec))
    got = RULES[spec.op].forward(_view(spec), xs)
    for g, e in zip(got if RULES[spec.op].multi_output else [got], expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _target(spec: Spec, o0: np.ndarray, seed: int = 2) -> np.ndarray:
    g = np.random.default_rng(seed)
    if spec.op == "Softmax":  # a valid probability target
        z = np.log(o0) + g.standard_normal(o0.shape).astype(np.float32)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    if spec.op == "LogSoftmax":
        z = o0 + g.standard_normal(o0.shape).astype(np.float32)
        return (z - np.log(np.exp(z).sum(axis=-1, keepdims=True))).astype(np.float32)
    if spec.op == "Sigmoid":
        return np.clip(o0 + 0.1 * g.standard_normal(o0.shape), 0.01, 0.99).astype(np.float32)
    if spec.op == "Tanh":
        return np.clip(o0 + 0.1 * g.standard_normal(o0.shape), -0.99, 0.99).astype(np.float32)
    return (o0 + 0.5 * g.standard_normal(o0.shape)).astype(np.float32)


INVERTIBLE = [s for s in SPECS if RULES[s.op].check_inverse(_view(s)) is None]


def test_vjp_only_entries_say_why() -> None:
    """Entries without an inverse are exactly the linearized-only forms, each with
    its reason (the sweep schedules stop there)."""
    vjp_only = {s.id for s in SPECS} - {s.id for s in INVERTIBLE}
    assert {"mul-se-gate", "matmul-qk", "convt", "resize-nearest", "split"} <= vjp_only
    assert not vjp_only & {"mul-const", "add-residual", "reducesum", "conv-pad", "softmax"}
    for s in SPECS:
        if s.id in vjp_only:
            assert RULES[s.op].check(_view(s)) is None
            assert RULES[s.op].check_inverse(_view(s))


@pytest.mark.parametrize("spec", INVERTIBLE, ids=[s.id for s in INVERTIBLE])
def test_inverse_moves_output_toward_target(spec: Spec) -> None:
    rule, view = RULES[spec.op], _view(spec)
    xs = _inputs(spec)
    o0 = rule.forward(view, xs)
    t = _target(spec, o0)
    data = rule.data_inputs(view)
    new = rule.inverse(view, t, [xs[view.dynamic.index(i)] for i in data], o0, 1e-3)
    assert len(new) == len(data)
    xs_new = list(xs)
    for i, x in zip(data, new, strict=True):
        assert x.shape == xs[view.dynamic.index(i)].shape
        assert np.isfinite(x).all()
        xs_new[view.dynamic.index(i)] = x
    before = float(np.linalg.norm(o0 - t))
    after = float(np.linalg.norm(rule.forward(view, xs_new) - t))
    assert after < before


LINEAR = [s for s in SPECS if RULES[s.op].linear and len(s.shapes) == 1]


@pytest.mark.parametrize("spec", LINEAR, ids=[s.id for s in LINEAR])
def test_adjoint_identity(spec: Spec) -> None:
    rule, view = RULES[spec.op], _view(spec)
    g = np.random.default_rng(3)
    v = g.standard_normal(spec.shapes[0])
    av = rule.apply_linear(view, v)
    w = g.standard_normal(av.shape)
    atw = rule.adjoint(view, w, spec.shapes[0])
    assert atw.shape == spec.shapes[0]
    lhs, rhs = float((av * w).sum()), float((v * atw).sum())
    assert abs(lhs - rhs) <= 1e-6 * max(1.0, abs(lhs))


def test_every_registered_rule_has_a_spec() -> None:
    assert set(RULES) <= {s.op for s in SPECS}
