"""Squeeze-excitation gates and transposed convolutions on real data.

Two small torch models, trained for a few hundred steps on upright MNIST digits
(test-set images 0-2999) and exported by the legacy exporter (``dynamo=False``,
opset 17):

- ``SeNet``: Conv -> Relu -> a squeeze-excitation block
  ``x * HardSigmoid(Conv(Relu(Conv(GlobalAveragePool(x)))))`` -> Conv -> Linear;
- ``DecoderNet``: two strided Convs, a ConvTranspose back up, a bilinear Resize
  down, Linear.

For each: the plan has no boundary and every Conv / ConvTranspose / Gemm weight
is a refinable layer (the SE Convs are reached through the gate branch of the
product); the compiled and the array reverse passes give at every layer output
the negative gradient of the summed cross-entropy that torch's autograd computes
(the activation feeding both the pooling and the product sums both residuals);
refine with the default schedule on rotated digits (3000-4199 adapt, seed 1,
enough held-out samples for every layer; 4200-5199 evaluate, seed 2) steps every
layer, gains at least 3 points and changes only initializer values. The sweep
schedules, which need inverses, leave out the layers behind the gate and the
ConvTranspose and say why.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from graphcheck import changed_initializers
from shared_data import shift_images

from onnxfbp import RefineConfig, refine
from onnxfbp.graph.plan import load_model, plan_model
from onnxfbp.reverse.arrays import reverse
from onnxfbp.reverse.select import compile_reverse
from onnxfbp.schedules.state import ModelState, select_layers

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class SeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))
        gate = F.hardsigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(h, 1)))))
        h = F.relu(self.c2(h * gate))
        return self.fc(h.flatten(1))


class DecoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c2(F.relu(self.c1(x))))
        h = F.relu(self.up(h))  # 14 x 14
        h = F.interpolate(h, scale_factor=0.5, mode="bilinear")
        return self.fc(h.flatten(1))


MODELS = {"se": (SeNet, {"Mul", "HardSigmoid", "GlobalAveragePool"}),
          "decoder": (DecoderNet, {"ConvTranspose", "Resize"})}


@pytest.fixture(scope="module")
def digits(mnist: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    x, y = mnist
    return {
        "x_train": x[:3000, None], "y_train": y[:3000],
        "x_adapt": shift_images(x[3000:4200], "rot", seed=1)[:, None], "y_adapt": y[3000:4200],
        "x_eval": shift_images(x[4200:5200], "rot", seed=2)[:, None], "y_eval": y[4200:5200],
    }


_TRAINED: dict[str, nn.Module] = {}


def _exported(name: str, digits: dict[str, np.ndarray], path: Path) -> Path:
    if name not in _TRAINED:
        _TRAINED[name] = _train(name, digits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TRAINED[name], (torch.from_numpy(digits["x_train"][:2]),),
                          str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["scores"],
                          dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}})
    return path


def _train(name: str, digits: dict[str, np.ndarray]) -> nn.Module:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = MODELS[name][0]()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(digits["x_train"]), torch.from_numpy(digits["y_train"])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        loss = F.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_residuals_are_autograd_gradients(
        name: str, digits: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = _exported(name, digits, tmp_path / f"{name}.onnx")
    state = ModelState(path, RefineConfig.of(device="cpu"))
    x, y = digits["x_adapt"][:16], digits["y_adapt"][:16]
    probe = compile_reverse(state, x)
    z = np.asarray(probe.acts[state.plan.logits], np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    r_logits = (np.eye(10)[y] - p).astype(np.float32)
    got = probe.graph.run(probe.acts, r_logits, probe.views)
    arrays, _ = reverse(state.plan, probe.acts, probe.acts[state.plan.logits] + r_logits,
                        probe.path, probe.views, 0.0, linearized=True)

    net, outs = _TRAINED[name], {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o))
             for k, m in net.named_children()]
    logits = net(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    for v in outs.values():
        v.retain_grad()
    F.cross_entropy(logits, torch.from_numpy(y), reduction="sum").backward()
    assert len(state.layers) == len(outs)
    for layer in state.layers:
        want = -outs[layer.name.split("/")[1]].grad.numpy()
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got[layer.output], want, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(arrays[layer.output], want, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_refines_through_gates_and_transposed_convs(
        name: str, digits: dict[str, np.ndarray], tmp_path: Path) -> None:
    path = _exported(name, digits, tmp_path / f"{name}.onnx")
    model = load_model(path)
    ops = {n.op_type for n in model.graph.node}
    assert MODELS[name][1] <= ops, sorted(ops)
    plan = plan_model(model)
    assert plan.boundaries == []
    weighted = {n.name for n in model.graph.node
                if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
    assert {layer.name for layer in plan.refinable} == weighted

    out = tmp_path / "refined.onnx"
    result = refine(path, out, digits["x_adapt"], digits["y_adapt"],
                    config=RefineConfig.of(device="cpu"),
                    eval_data=(digits["x_eval"], digits["y_eval"]))
    assert {r.name for r in result.layers} == weighted
    assert result.environment["reverse_pass"] == "onnxruntime"
    assert result.eval_before is not None and result.eval_after is not None
    before, after = result.eval_before.accuracy, result.eval_after.accuracy
    assert after >= before + 0.03, f"{name}: {before:.4f} -> {after:.4f}"
    stepped = {r.name for r in result.layers if "minibatch schedule" in r.reason}
    assert stepped == weighted
    assert changed_initializers(path, out)

    # the sweep schedules carry targets through inverses: they stop at the gate
    # (the SE Convs and c1 behind it) or at the ConvTranspose (c1, c2) and say so
    layers, skipped = select_layers(plan, RefineConfig.of(schedule="jacobi", deep=True))
    assert skipped and all("default schedule" in why for why in skipped.values())
    stop = {"se": "Mul", "decoder": "ConvTranspose"}[name]
    assert all(stop in why for why in skipped.values()), skipped
    assert {layer.name for layer in layers} | set(skipped) == weighted


def test_boundaries_name_the_op_and_why() -> None:
    """Only ops with no derivative stop the targets, and the plan says which and why:
    a Cast to an integer type, a rounding; the float Cast between passes them."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{k}")
         for k in range(3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"], name="fc0"),
        helper.make_node("Cast", ["a"], ["ai"], to=TensorProto.INT32, name="to_int"),
        helper.make_node("Cast", ["ai"], ["af"], to=TensorProto.FLOAT, name="to_float"),
        helper.make_node("MatMul", ["af", "w1"], ["b"], name="fc1"),
        helper.make_node("Round", ["b"], ["c"], name="round"),
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
        helper.make_node("Cast", ["xd"], ["xf"], to=TensorProto.FLOAT, name="back"),
        helper.make_node("MatMul", ["xf", "w2"], ["d"], name="fc2"),
        helper.make_node("Add", ["c", "d"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], w)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = plan_model(model)
    assert [layer.name for layer in plan.refinable] == ["fc2"]
    assert plan.boundaries == [
        "Round (opset 17) 'round': no rule for Round: piecewise constant "
        "(zero derivative almost everywhere)"]
    model.graph.node[4].op_type = "Identity"  # now the integer Cast stops them
    plan = plan_model(model)
    assert [layer.name for layer in plan.refinable] == ["fc1", "fc2"]
    assert plan.boundaries == [
        "Cast (opset 17) 'to_int': Cast to INT32 (not a float type) has no derivative"]
