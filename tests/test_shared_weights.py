"""One stored weight read by several layers (weight tying) is refined once, with
the rows of all its readers (issue 19).

A small torch MLP applies one hidden Linear twice (``mid(relu(mid(h)))``), trained
for a few hundred Adam steps on upright digits (images 0-3999) and exported by the
legacy and the dynamo exporter; refined on rotated digits (4000-4999, seed 1),
evaluated on rotated 6000-6999 (seed 2).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from shared_data import shift_images

from onnxfbp import RefineConfig, refine
from onnxfbp.graph.inspect import inspect_model
from onnxfbp.graph.plan import load_model, plan_model
from onnxfbp.schedules.state import whole_groups

torch = pytest.importorskip("torch")
nn = torch.nn


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(784, 32)
        self.mid = nn.Linear(32, 32, bias=False)
        self.out = nn.Linear(32, 10)

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.inp(x.flatten(1)))
        h = torch.relu(self.mid(h))
        return self.out(torch.relu(self.mid(h)))


@pytest.fixture(scope="module")
def tied_data(mnist: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    x, y = mnist
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = Tied()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:4000]), torch.from_numpy(y[:4000])
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"net": net.eval(),
            "adapt": (shift_images(x[4000:5000], "rot", seed=1), y[4000:5000]),
            "eval": (shift_images(x[6000:7000], "rot", seed=2), y[6000:7000])}


def _export(net: Any, path: Path, exporter: str) -> None:
    x = torch.zeros((2, 28, 28))
    kwargs: dict[str, Any] = {"input_names": ["x"], "output_names": ["scores"]}
    if exporter == "dynamo":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    else:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "scores": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=exporter == "dynamo", **kwargs)


def _mid_layers(path: Path) -> list[Any]:
    plan = plan_model(load_model(path))
    return [layer for layer in plan.layers if layer.shared]


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_a_tied_weight_is_refined_once_with_all_its_readers(
    exporter: str, tied_data: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / f"tied-{exporter}.onnx"
    _export(tied_data["net"], path, exporter)
    shared = _mid_layers(path)
    assert len(shared) == 2 and all(layer.refinable for layer in shared)
    store = shared[0].weight.initializer
    assert shared[1].weight.initializer == store
    assert shared[0].shared == (shared[1].name,) and shared[1].shared == (shared[0].name,)
    assert {layer.name for layer in shared} <= set(inspect_model(path)["refined_layers"])

    out = tmp_path / "out.onnx"
    config = RefineConfig.of(device="cpu", seed=0, max_layers=4)
    result = refine(path, out, *tied_data["adapt"], config=config, eval_data=tied_data["eval"])
    assert result.eval_before is not None and result.eval_after is not None
    assert result.eval_after.accuracy >= result.eval_before.accuracy + 0.03
    steps = [r for r in result.layers if r.name in {layer.name for layer in shared}
             and r.reason.startswith("minibatch")]
    assert len(steps) == 2 and steps[0].outcome == steps[1].outcome == "kept"
    assert steps[0].relative_change == pytest.approx(steps[1].relative_change)

    before, after = onnx.load(path), onnx.load(out)
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert list(new) == list(old) and not np.array_equal(new[store], old[store])
    assert [list(n.input) for n in after.graph.node] == [list(n.input) for n in before.graph.node]


def test_a_tied_weight_outside_the_minibatch_schedule_or_half_selected_is_skipped(
    tied_data: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "tied.onnx"
    _export(tied_data["net"], path, "legacy")
    info = inspect_model(path, schedule="sequential")
    why = {layer["name"]: layer["why_not"] for layer in info["layers"]}
    shared = _mid_layers(path)
    for layer in shared:
        assert layer.name not in info["refined_layers"]
        assert "only the minibatch schedule refines a shared weight" in why[layer.name]

    skipped: dict[str, str] = {}
    plan = plan_model(load_model(path))
    last_two = list(reversed(plan.refinable))[:2]  # the output layer and one reader
    kept = whole_groups(last_two, skipped, True)
    assert [layer.name for layer in kept] == [last_two[0].name]
    assert "this run does not refine" in skipped[last_two[1].name]


def test_an_output_layer_tied_to_a_layer_left_out_is_left_unchanged(
    mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """With few held-out samples the run keeps to the output layer; when that layer
    shares its weight with an earlier one, it is left unchanged and says why."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(
        (rng.standard_normal((784, 10)) * 0.05).astype(np.float32), "W1")
    t = numpy_helper.from_array(
        (np.eye(10) + 0.1 * rng.standard_normal((10, 10))).astype(np.float32), "T")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W1"], ["a"], name="mm1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("MatMul", ["b", "T"], ["c"], name="tied1"),
             helper.make_node("Relu", ["c"], ["d"], name="relu2"),
             helper.make_node("MatMul", ["d", "T"], ["y"], name="tied2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w1, t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    x, y = mnist
    result = refine(tmp_path / "m.onnx", tmp_path / "out.onnx", x[:200], y[:200],
                    config=RefineConfig.of(device="cpu", seed=0))
    rows = {row["name"]: row for row in result.plan["layers"]}
    assert rows["tied2"]["outcome"] == "not selected"
    assert "this run does not refine ['tied1']" in rows["tied2"]["reason"]
    out = {t.name: numpy_helper.to_array(t)
           for t in onnx.load(tmp_path / "out.onnx").graph.initializer}
    np.testing.assert_array_equal(out["T"], numpy_helper.to_array(t))
