"""Weights wherever the graph keeps them (issue 19, graph part).

- every initializer of a shared model rewritten as a Constant node (paddle2onnx's
  layout: no initializers at all), or reached through Constant -> Cast / Reshape /
  Identity chains: the same refinable layers, the same refined weights as the
  original (same seed), written back into the Constant nodes, nothing else changed;
- ``ai.onnx`` named as the default opset domain: load, plan, refine, write (its
  opset_import kept); opsets 7 to 23 (onnx.version_converter) load and plan;
- constant subgraphs evaluate by onnxruntime, falling back to the reference
  evaluator.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxfbp import RefineConfig, refine
from onnxfbp.graph.inspect import inspect_model
from onnxfbp.graph.plan import load_model, plan_model
from onnxfbp.graph.weights import constant_value, static_values

LEGACY = "mnist_pytorch25_legacy_cnn.onnx"
RESNET = "cifar10_pytorch18_vnncomp_resnet2b.onnx"
N = 300


def as_constants(model: onnx.ModelProto, chains: bool = False) -> onnx.ModelProto:
    """``model`` with every initializer turned into a Constant node before the
    first node (and dropped from the graph inputs). With ``chains``, 2-D and
    larger float weights are stored flat behind a Reshape, 1-D ones as float64
    behind a Cast to float, each behind an Identity."""
    out = copy.deepcopy(model)
    g = out.graph
    names = {t.name for t in g.initializer}
    head: list[onnx.NodeProto] = []
    for t in g.initializer:
        value = numpy_helper.to_array(t)
        if not chains or value.dtype != np.float32:
            head.append(helper.make_node("Constant", [], [t.name], value=t))
            continue
        if value.ndim >= 2:
            flat = numpy_helper.from_array(value.reshape(-1), t.name + "__flat")
            shape = numpy_helper.from_array(np.asarray(value.shape, np.int64), t.name + "__shape")
            head += [helper.make_node("Constant", [], [flat.name], value=flat),
                     helper.make_node("Constant", [], [shape.name], value=shape),
                     helper.make_node("Reshape", [flat.name, shape.name], [t.name + "__r"])]
        else:
            wide = numpy_helper.from_array(value.astype(np.float64), t.name + "__f64")
            head += [helper.make_node("Constant", [], [wide.name], value=wide),
                     helper.make_node("Cast", [wide.name], [t.name + "__r"],
                                      to=onnx.TensorProto.FLOAT)]
        head.append(helper.make_node("Identity", [t.name + "__r"], [t.name]))
    nodes = head + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(inputs)
    return out


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = constant_value(node)
            assert value is not None
            out[node.output[0]] = value
    return out


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every stored value blanked: what must not change."""
    out = copy.deepcopy(model)
    del out.graph.initializer[:]
    for node in out.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.ClearField("raw_data")
                    attr.t.ClearField("float_data")
                    attr.t.ClearField("double_data")
                    attr.t.ClearField("int64_data")
    return out


@pytest.fixture(scope="module")
def legacy_rot(mnist: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from shared_data import shift_images  # noqa: PLC0415

    x, y = mnist
    return ((shift_images(x[:N], "rot", seed=1) - 0.5) / 0.5)[:, None], y[:N]


def _refine(path: Path, out: Path, data: tuple[np.ndarray, np.ndarray]) -> Any:
    return refine(path, out, data[0], data[1], config=RefineConfig.of(device="cpu", seed=0))


@pytest.fixture(scope="module")
def legacy_refined(shared_models: Path, legacy_rot: Any,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The original legacy CNN, its inspect view and its refined initializers."""
    folder = tmp_path_factory.mktemp("legacy")
    original = load_model(shared_models / LEGACY)
    onnx.save(original, folder / "orig.onnx")
    _refine(folder / "orig.onnx", folder / "orig_out.onnx", legacy_rot)
    return {"model": original, "inspect": inspect_model(folder / "orig.onnx"),
            "refined": {t.name: numpy_helper.to_array(t)
                        for t in onnx.load(folder / "orig_out.onnx").graph.initializer}}


@pytest.mark.parametrize("chains", [False, True], ids=["constant", "chain"])
def test_constant_node_weights_refine_like_initializers(
    chains: bool, legacy_refined: dict[str, Any], legacy_rot: Any, tmp_path: Path
) -> None:
    rewritten = as_constants(legacy_refined["model"], chains)
    onnx.save(rewritten, tmp_path / "const.onnx")
    assert not rewritten.graph.initializer

    a, b = legacy_refined["inspect"], inspect_model(tmp_path / "const.onnx")
    assert b["refined_layers"] == a["refined_layers"] and len(a["refined_layers"]) == 4
    assert {layer["weight"]["store"] for layer in b["layers"]} == {"constant"}
    if chains:  # the stored (flat) shape, reached through Reshape and Identity
        assert {tuple(layer["weight"]["via"]) for layer in b["layers"]} == {("Reshape", "Identity")}
    else:
        assert [layer["weight"]["shape"] for layer in b["layers"]] == \
            [layer["weight"]["shape"] for layer in a["layers"]]

    _refine(tmp_path / "const.onnx", tmp_path / "const_out.onnx", legacy_rot)
    want = legacy_refined["refined"]
    written = onnx.load(tmp_path / "const_out.onnx")
    assert not written.graph.initializer
    assert skeleton(written) == skeleton(rewritten)  # only Constant values differ
    got, before = constants(written), constants(rewritten)
    changed = 0
    for name, value in want.items():
        stored = name if not chains or value.dtype != np.float32 else (
            name + ("__flat" if value.ndim >= 2 else "__f64"))
        assert got[stored].dtype == before[stored].dtype
        assert got[stored].shape == before[stored].shape
        np.testing.assert_allclose(got[stored].reshape(value.shape), value, rtol=1e-5, atol=1e-6)
        changed += not np.array_equal(got[stored], before[stored])
    assert changed >= 2  # the refine changed weights, written into the Constant nodes


def test_resnet_with_constant_weights_plans_the_same(shared_models: Path) -> None:
    original = load_model(shared_models / RESNET)
    want = [(layer.name, layer.refinable, layer.bias is not None)
            for layer in plan_model(original).layers]
    for chains in (False, True):
        plan = plan_model(as_constants(original, chains))
        assert [(layer.name, layer.refinable, layer.bias is not None)
                for layer in plan.layers] == want
        assert all(layer.weight.store == "constant" for layer in plan.layers)


def with_ai_onnx_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    for opset in out.opset_import:
        if opset.domain == "":
            opset.domain = "ai.onnx"
    return out


def test_ai_onnx_default_domain_loads_refines_and_keeps_its_opsets(
    shared_models: Path, legacy_rot: Any, tmp_path: Path
) -> None:
    """The reported failure: 'Domain '' (node type: 'Reshape') is not specified.
    Known opsets: {'ai.onnx': 15}' from folding a Reshape of a constant."""
    model = with_ai_onnx_domain(as_constants(load_model(shared_models / LEGACY), chains=True))
    path = tmp_path / "ai_onnx.onnx"
    onnx.save(model, path)
    plan = plan_model(load_model(path))
    assert len(plan.refinable) == 4
    _refine(path, tmp_path / "out.onnx", legacy_rot)
    written = onnx.load(tmp_path / "out.onnx")
    assert list(written.opset_import) == list(model.opset_import)
    assert skeleton(written) == skeleton(model)


@pytest.mark.parametrize("version", range(7, 24))
def test_opsets_7_to_23_load_and_plan(version: int, shared_models: Path, tmp_path: Path) -> None:
    from onnx import version_converter  # noqa: PLC0415

    original = load_model(shared_models / RESNET)
    converted = version_converter.convert_version(original, version)
    path = tmp_path / f"opset{version}.onnx"
    onnx.save(converted, path)
    plan = plan_model(load_model(path))
    assert plan.opset == version
    assert [layer.name for layer in plan.refinable] == \
        [layer.name for layer in plan_model(original).refinable]
    if version in (7, 23):  # the whole inspect (onnxruntime sessions) at both ends
        info = inspect_model(path)
        assert info["opset"] == version and len(info["refined_layers"]) == 8


def test_constant_folding_falls_back_to_the_reference_evaluator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A constant subgraph (here under the ``ai.onnx`` domain name) is evaluated by
    onnxruntime; where onnxruntime declines it, by the reference evaluator; where
    neither can, a one-line error names both reasons."""
    from onnxfbp.errors import ModelError  # noqa: PLC0415
    from onnxfbp.graph import weights  # noqa: PLC0415

    shape = numpy_helper.from_array(np.asarray([2, 3], np.int64), "shape")
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32), "w")
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w2"], domain="ai.onnx")]
    graph = helper.make_graph(nodes, "g", [], [], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx", 13)])
    want = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(static_values(model, {"w2"}, list(graph.node))["w2"], want)

    def declines(sub: onnx.ModelProto, wanted: list[str]) -> list[Any]:
        raise RuntimeError("no kernel\nsecond line")

    monkeypatch.setattr(weights, "_by_onnxruntime", declines)
    np.testing.assert_array_equal(static_values(model, {"w2"}, list(graph.node))["w2"], want)
    monkeypatch.setattr(weights, "_by_reference", declines)
    with pytest.raises(ModelError, match="no kernel") as err:
        static_values(model, {"w2"}, list(graph.node))
    assert "\n" not in str(err.value)


def test_value_floats_bias_is_written_back_in_its_own_form(
    mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A softmax-regression head whose weight is a Constant ``value`` and whose bias
    (a following Add) is a Constant ``value_floats``: both are refined and written
    back in the attribute form they came in (digits at half resolution: a small
    output-layer solve)."""
    x, y = mnist
    x = np.ascontiguousarray(x[:300, ::2, ::2])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((196, 10)) * 0.01).astype(np.float32), "w")
    nodes = [helper.make_node("Constant", [], ["W"], value=w),
             helper.make_node("Constant", [], ["b"], value_floats=[0.0] * 10),
             helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W"], ["z"], name="mm"),
             helper.make_node("Add", ["z", "b"], ["y"], name="bias")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 14, 14])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    layer = plan_model(load_model(tmp_path / "m.onnx")).refinable[0]
    assert layer.bias is not None and layer.bias.store == "constant"
    result = refine(tmp_path / "m.onnx", tmp_path / "out.onnx", x, y[:300],
                    config=RefineConfig.of(device="cpu", seed=0))
    assert result.heldout_after.accuracy > result.heldout_before.accuracy + 0.3
    written = onnx.load(tmp_path / "out.onnx")
    assert skeleton(written).graph.node[0] == skeleton(model).graph.node[0]
    forms = {n.output[0]: [a.name for a in n.attribute]
             for n in written.graph.node if n.op_type == "Constant"}
    assert forms == {"W": ["value"], "b": ["value_floats"]}
    bias = np.asarray(written.graph.node[1].attribute[0].floats)
    assert bias.shape == (10,) and np.isfinite(bias).all() and np.abs(bias).max() > 0
