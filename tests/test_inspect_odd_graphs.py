"""``onnxfbp inspect`` never raises on a model onnxruntime runs (issue 19).

Odd-but-valid graphs built with onnx.helper around a small dense model: one-element
tensors where scalars are expected (Clip bounds, a SiLU's beta, a Pow exponent),
custom-domain nodes, ``ai.onnx`` as the default domain, weights and biases in
Constant nodes of every float form, ops without a rule. Each model is first run by
onnxruntime (so it is valid), then ``onnxfbp inspect`` must exit 0 and give every
node one line with its status; ``--json`` lists each node with a status, and a
node the planner could not understand is named as such, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfbp.cli.commands import main

D, H, K = 6, 5, 3
RNG = np.random.default_rng(0)


def _t(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(middle: Callable[[str], tuple[list[onnx.NodeProto], str]],
           domain: str = "", extra_opsets: tuple[tuple[str, int], ...] = (),
           opset: int = 17) -> onnx.ModelProto:
    """x [N, D] -> MatMul(W1) + b1 -> middle -> Gemm(W2, b2) -> y [N, K]."""
    w1 = _t("W1", RNG.standard_normal((D, H)).astype(np.float32))
    b1 = _t("b1", RNG.standard_normal(H).astype(np.float32))
    w2 = _t("W2", RNG.standard_normal((K, H)).astype(np.float32))
    b2 = _t("b2", RNG.standard_normal(K).astype(np.float32))
    head = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="mm"),
            helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias")]
    mid, out = middle("h1")
    tail = [helper.make_node("Gemm", [out, "W2", "b2"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(
        head + mid + tail, "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", K])],
        [w1, b1, w2, b2],
    )
    opsets = [helper.make_opsetid(domain, opset), *(helper.make_opsetid(d, v)
                                                   for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def clip_one_element_bounds(x: str) -> tuple[list[onnx.NodeProto], str]:
    one = np.float32
    return [helper.make_node("Constant", [], ["lo"], value=_t("lo_t", np.array([-1.0], one))),
            helper.make_node("Constant", [], ["hi"], value=_t("hi_t", np.array([2.0], one))),
            helper.make_node("Clip", [x, "lo", "hi"], ["c"], name="clip")], "c"


def silu_one_element_beta(x: str) -> tuple[list[onnx.NodeProto], str]:
    return [helper.make_node("Constant", [], ["beta"], value=_t("b", np.array([1.5], np.float32))),
            helper.make_node("Mul", [x, "beta"], ["xb"], name="scale"),
            helper.make_node("Sigmoid", ["xb"], ["g"], name="sig"),
            helper.make_node("Mul", [x, "g"], ["s"], name="swish")], "s"


def pow_one_element_exponent(x: str) -> tuple[list[onnx.NodeProto], str]:
    return [helper.make_node("Constant", [], ["e"], value=_t("e_t", np.array([2.0], np.float32))),
            helper.make_node("Pow", [x, "e"], ["p"], name="pow")], "p"


def custom_domain_node(x: str) -> tuple[list[onnx.NodeProto], str]:
    return [helper.make_node("FastGelu", [x], ["f"], name="fastgelu", domain="com.microsoft")], "f"


def no_rule_op(x: str) -> tuple[list[onnx.NodeProto], str]:
    return [helper.make_node("CumSum", [x, "ax"], ["cs"], name="cumsum"),
            helper.make_node("Constant", [], ["ax"], value_int=1)], "cs"


def constant_float_forms(x: str) -> tuple[list[onnx.NodeProto], str]:
    """A bias in ``value_floats``, a scale in ``value_float``, a reshape in ``value_ints``."""
    return [helper.make_node("Constant", [], ["bf"], value_floats=[0.5] * H),
            helper.make_node("Add", [x, "bf"], ["a"], name="add_floats"),
            helper.make_node("Constant", [], ["sf"], value_float=2.0),
            helper.make_node("Mul", ["a", "sf"], ["m"], name="mul_float"),
            helper.make_node("Constant", [], ["shape"], value_ints=[-1, H]),
            helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape_ints")], "r"


def hardsigmoid_gate(x: str) -> tuple[list[onnx.NodeProto], str]:
    return [helper.make_node("HardSigmoid", [x], ["hs"], name="hsig", alpha=0.2, beta=0.5),
            helper.make_node("Mul", [x, "hs"], ["hm"], name="hmul")], "hm"


def relu(x: str) -> tuple[list[onnx.NodeProto], str]:
    return [helper.make_node("Relu", [x], ["r"], name="relu", domain="ai.onnx")], "r"


CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "clip_1_element_bounds": lambda: _model(clip_one_element_bounds),
    "silu_1_element_beta": lambda: _model(silu_one_element_beta),
    "pow_1_element_exponent": lambda: _model(pow_one_element_exponent),
    "custom_domain": lambda: _model(custom_domain_node, extra_opsets=(("com.microsoft", 1),)),
    "no_rule_op": lambda: _model(no_rule_op),
    "constant_float_forms": lambda: _model(constant_float_forms),
    "hardsigmoid_gate_opset_11": lambda: _model(hardsigmoid_gate, opset=11),
    "ai_onnx_domain": lambda: _model(relu, domain="ai.onnx"),
    "ai_onnx_domain_opset_7": lambda: _model(hardsigmoid_gate, domain="ai.onnx", opset=7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_exits_0_with_a_status_per_node(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = CASES[case]()
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {"x": RNG.standard_normal((4, D)).astype(np.float32)})  # valid

    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "error" not in err
    for node in model.graph.node:
        assert sum(f" {node.name or node.op_type}" in line for line in out.splitlines()) >= 1

    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in info["nodes"]] == \
        [n.name or f"{n.op_type}#{k}" for k, n in enumerate(
            m for m in model.graph.node)] or len(info["nodes"]) == len(model.graph.node)
    assert all(n["status"] for n in info["nodes"])
    assert "gemm" in info["refined_layers"]
    assert not any("not understood" in (n["rule"] or "") for n in info["nodes"]), info["nodes"]


def test_a_constant_weight_with_nan_is_left_alone_with_the_reason(tmp_path: Path) -> None:
    from onnxfbp.graph.plan import load_model, plan_model  # noqa: PLC0415

    model = _model(relu)
    w2 = next(t for t in model.graph.initializer if t.name == "W2")
    value = numpy_helper.to_array(w2).copy()
    value[0, 0] = np.nan
    rest = [t for t in model.graph.initializer if t.name != "W2"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(rest)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W2"], value=_t("W2", value)))
    onnx.save(model, tmp_path / "m.onnx")
    layers = {layer.name: layer for layer in plan_model(load_model(tmp_path / "m.onnx")).layers}
    assert layers["gemm"].reason is not None and "NaN or Inf" in layers["gemm"].reason
    assert layers["mm"].refinable


def test_a_node_that_fails_to_plan_is_named_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any internal error planning one node becomes that node's status."""
    from onnxfbp.rules import RULES  # noqa: PLC0415

    def broken(view: object) -> str | None:
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(RULES["Relu"], "check", broken)
    path = tmp_path / "m.onnx"
    onnx.save(_model(relu), path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    relu_node = next(n for n in info["nodes"] if n["name"] == "relu")
    assert relu_node["status"] == "boundary"
    assert relu_node["rule"].startswith("not understood: TypeError: only 0-dimensional")
    assert info["refined_layers"] == ["gemm"]


def _shared_model_files() -> list[str]:
    from shared_data import models_dir  # noqa: PLC0415

    root = models_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.onnx")) if root.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("name", _shared_model_files())
def test_inspect_every_shared_model_exits_0(
    name: str, shared_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(shared_models / name), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refined_layers"]
    assert not any((n["rule"] or "").startswith("not understood") for n in info["nodes"])
