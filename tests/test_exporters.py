"""Graphs as mainstream exporters write them: small torch models, trained for a few
seconds on upright MNIST digits, exported during the test run by the legacy
TorchScript exporter (``dynamo=False``) and by the dynamo exporter (``dynamo=True``),
then refined on rotated digits.

Each case exercises ops that the shared corpus lacks (BatchNormalization kept
unfolded, AveragePool, LeakyRelu, Tanh, PRelu, Clip, Pad, grouped convolution,
Transpose, Squeeze, Sigmoid / LogSoftmax / Softmax outputs, 3-D and 4-D MatMul,
a fixed batch baked into Reshape constants, SiLU as x * Sigmoid(x), HardSwish,
Mish, Gelu, Elu, ReduceMax, LayerNormalization, self-attention and a gate from
another branch: products of two activations with a vjp but no inverse). For
every export:
the ops the case is about are in the graph, the plan has the expected
boundaries, targets reach the layers behind those ops (some cases pass Conv
inverses: ``deep``), batches run whole (no fixed-size chunks), refine
gains at least 3 points on held-out rotated digits, and only initializer values
differ in the written file. A model whose only layer sits before a node with no
derivative is refused with a clear error. Hand-written graphs check the batch
handling of the forward pass (batch 1 baked into a Reshape, weight chains whose
leading 1 is not a batch, ``allowzero``).

Data (MNIST test set, documented split): images 0-3999 train the torch model;
rotated images 4000-5999 (seed 1) adapt, rotated 6000-7999 (seed 2) evaluate.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphcheck import changed_initializers
from shared_data import shift_images

from onnxfbp import RefineConfig, UnsupportedModelError, refine
from onnxfbp.graph.inspect import inspect_model
from onnxfbp.graph.plan import load_model, plan_model

# torch's OpenMP threads must not spin next to onnxruntime's (10x slower refines)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


# ----------------------------------------------------------------- the models


class BnNet(nn.Module):
    """Conv (no bias) -> BatchNorm -> LeakyRelu -> AveragePool; Conv -> Relu ->
    BatchNorm (after the activation, so no exporter can fold it) -> Tanh; the
    flattened map concatenated with its global average pool; Linear -> Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 7 * 7 + 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.leaky_relu(self.b1(self.c1(x)), 0.1), 2)
        x = torch.tanh(self.b2(F.relu(self.c2(x))))
        x = torch.cat([x.flatten(1), F.adaptive_avg_pool2d(x, 1).flatten(1)], dim=1)
        return torch.sigmoid(self.fc(x))


class PadNet(nn.Module):
    """Zero Pad -> Conv -> PRelu -> MaxPool; replicate Pad (asymmetric) -> grouped Conv
    -> Relu6 (Clip) -> MaxPool; view(size(0), -1); Linear -> Relu -> Linear -> LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3)
        self.p1 = nn.PReLU(8)
        self.c2 = nn.Conv2d(8, 16, 3, groups=4)
        self.fc1 = nn.Linear(16 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.p1(self.c1(F.pad(x, (1, 1, 1, 1)))), 2)
        x = F.relu6(self.c2(F.pad(x, (1, 1, 0, 2), mode="replicate")))
        x = F.max_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


class NhwcNet(nn.Module):
    """NHWC input normalized in the graph (Sub, Div) and transposed to NCHW; Conv;
    a channels-last pointwise Linear (Transpose, 4-D MatMul + Add, Transpose); Conv;
    mean over W (ReduceMean), Squeeze, flatten, Linear -> Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 5, stride=2, padding=2)
        self.pw = nn.Linear(8, 16)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - 0.1307) / 0.3081).permute(0, 3, 1, 2)
        x = F.relu(self.c1(x))
        x = F.relu(self.pw(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = F.relu(self.c2(x))
        x = x.mean(dim=3, keepdim=True).squeeze(-1)
        return torch.softmax(self.fc(x.flatten(1)), dim=-1)


class RowNet(nn.Module):
    """[N, 28, 28] input read as 28 rows: a Linear on the last axis (3-D MatMul + Add),
    Tanh, Mul and Sub by constants, flatten, Linear, Div by a temperature (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.row = nn.Linear(28, 24)
        self.fc = nn.Linear(28 * 24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = 2.0 * torch.tanh(self.row(x.reshape(x.shape[0], 28, 28))) - 0.5
        return self.fc(x.flatten(1)) / 2.0


class InceptionNet(nn.Module):
    """Inception block (1x1, 3x3, 5x5 branches concatenated), 1x1 projection added to
    its input (residual), flatten by reshape; exported with a FIXED batch of 1, so the
    batch is baked into the Reshape constant."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 1)
        self.b3 = nn.Conv2d(8, 8, 3, padding=1)
        self.b5 = nn.Conv2d(8, 8, 5, padding=2)
        self.proj = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.b5(x))], dim=1)
        x = F.max_pool2d(F.relu(x + self.proj(y)), 2)
        return self.fc(x.reshape(x.shape[0], -1))


class SiluNet(nn.Module):
    """SiLU written by both exporters as x * Sigmoid(x) (a Mul of two activations,
    planned as one Swish): the first Conv is reached through it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.c2(F.silu(self.c1(x))))
        return self.fc(x.flatten(1))


class ActNet(nn.Module):
    """HardSwish, Mish, flattened map concatenated with its max over H and W
    (ReduceMax), Gelu (tanh approximation), Elu."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 7 * 7 + 16, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.mish(self.c2(F.hardswish(self.c1(x))))
        h = torch.cat([h.flatten(1), h.amax(dim=(2, 3))], dim=1)
        h = F.elu(self.fc2(F.gelu(self.fc1(h), approximate="tanh")))
        return self.fc3(h)


class TokenNet(nn.Module):
    """A one-block vision transformer: 7x7 patches (Conv), tokens (Reshape, Transpose),
    position Add, self-attention (MatMul of two activations: no inverse, but a
    vjp) in a residual, LayerNormalization, Gelu MLP in a residual, mean over
    tokens, head. The default schedule's targets pass the attention into q, k and
    v (Split) and on to the patch Conv: every layer is refined."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 32, 7, stride=7)
        self.pos = nn.Parameter(torch.zeros(1, 16, 32))
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.ln1 = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.ln2 = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 32**0.5, dim=-1)
        t = t + self.proj(attn @ v)
        t = t + self.fc2(F.gelu(self.fc1(self.ln1(t))))
        return self.head(self.ln2(t).mean(dim=1))


class GatedNet(nn.Module):
    """A gate from another branch, c1(x) * sigmoid(g(x)): a Mul of two different
    activations has no inverse, but its vjp carries the default schedule's targets
    into both factors: c1 and g are refined too."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.g = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x) * torch.sigmoid(self.g(x))
        return self.fc(F.relu(self.c2(h)).flatten(1))


class SquareHeadNet(nn.Module):
    """Its only Linear comes before a rounding (no derivative): nothing to refine."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.flatten(1))
        return torch.round(z * z)


DEFAULT = {"sweeps": 1, "max_layers": 2}
DEEP = {"sweeps": 1, "deep": True}  # targets pass Conv inverses to earlier layers


@dataclass
class Case:
    factory: Callable[[], nn.Module]
    layout: str  # nchw | nhwc | rows
    ops: dict[str, set[str]]  # exporter -> op types the graph must contain
    attempted: int  # layers whose targets are carried back (through the ops above)
    config: dict[str, object] = field(default_factory=lambda: dict(DEFAULT))
    fixed_batch: bool = False
    boundary_ops: set[str] = field(default_factory=set)  # ops expected as boundaries
    output_kind: str = "logits"


CASES = {
    "batchnorm-avgpool-leaky-tanh-sigmoid": Case(
        BnNet, "nchw",
        {"legacy": {"BatchNormalization", "AveragePool", "LeakyRelu", "Tanh",
                    "GlobalAveragePool", "Concat", "Sigmoid"},
         "dynamo": {"BatchNormalization", "AveragePool", "LeakyRelu", "Tanh", "ReduceMean",
                    "Concat", "Sigmoid"}},
        attempted=3, config={**DEEP, "max_layers": 3}, output_kind="sigmoid-probabilities"),
    "pad-prelu-groupconv-clip-logsoftmax": Case(
        PadNet, "nchw",
        {"legacy": {"Pad", "PRelu", "Clip", "Conv", "Shape", "Gather", "LogSoftmax"},
         "dynamo": {"Pad", "PRelu", "Clip", "Conv", "LogSoftmax"}},
        attempted=4, config={**DEEP, "max_layers": 4}, output_kind="log-probabilities"),
    "nhwc-transpose-matmul4d-reducemean-squeeze-softmax": Case(
        NhwcNet, "nhwc",
        {"legacy": {"Sub", "Div", "Transpose", "MatMul", "ReduceMean", "Squeeze", "Softmax"},
         "dynamo": {"Sub", "Div", "Transpose", "MatMul", "ReduceMean", "Squeeze", "Softmax"}},
        attempted=3, config={**DEEP, "max_layers": 3}, output_kind="probabilities"),
    "rows-matmul3d-tanh-affine-constants": Case(
        RowNet, "rows", {"legacy": {"MatMul", "Add", "Tanh", "Mul", "Sub", "Div"},
                         "dynamo": {"MatMul", "Add", "Tanh", "Mul", "Sub", "Div"}},
        attempted=2),
    "inception-residual-fixed-batch": Case(
        InceptionNet, "nchw",
        {"legacy": {"Concat", "Add", "Reshape"}, "dynamo": {"Concat", "Add", "Reshape"}},
        attempted=5, config={**DEEP, "max_layers": 5}, fixed_batch=True),
    "silu-fused": Case(
        SiluNet, "nchw", {"legacy": {"Mul", "Sigmoid"}, "dynamo": {"Mul", "Sigmoid"}},
        attempted=3, config={**DEEP, "max_layers": 3}),
    "hardswish-mish-reducemax-gelu-elu": Case(
        ActNet, "nchw",
        {"legacy": {"HardSwish", "Softplus", "Tanh", "Mul", "ReduceMax", "Gelu", "Elu"},
         "dynamo": {"HardSwish", "Mish", "ReduceMax", "Gelu", "Elu"}},
        attempted=5, config={**DEEP, "max_layers": 5}),
    "transformer-layernorm-attention": Case(
        TokenNet, "nchw",
        {"legacy": {"LayerNormalization", "Gelu", "Transpose", "ReduceMean", "MatMul"},
         "dynamo": {"LayerNormalization", "Gelu", "Transpose", "ReduceMean", "MatMul"}},
        attempted=6, config={"sweeps": 1}),
    "gated": Case(
        GatedNet, "nchw", {"legacy": {"Mul", "Sigmoid"}, "dynamo": {"Mul", "Sigmoid"}},
        attempted=4, config={"sweeps": 1}),
}


def _layout(images01: np.ndarray, layout: str) -> np.ndarray:
    x = images01.astype(np.float32)
    return {"nchw": x[:, None], "nhwc": x[..., None], "rows": x}[layout]


def _train(net: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 300) -> nn.Module:
    """A few hundred Adam steps on upright digits (seconds on two cores)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        out = net(xt[idx])
        if isinstance(net, BnNet):  # sigmoid scores: train on their logits' softmax
            loss = F.nll_loss(torch.log_softmax(torch.logit(out, eps=1e-6), dim=1), yt[idx])
        elif isinstance(net, PadNet):
            loss = F.nll_loss(out, yt[idx])
        elif isinstance(net, NhwcNet):
            loss = F.nll_loss(torch.log(out + 1e-9), yt[idx])
        else:
            loss = F.cross_entropy(out, yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _export(net: nn.Module, sample: np.ndarray, path: Path, exporter: str, fixed: bool) -> None:
    x = torch.from_numpy(sample)
    kwargs: dict[str, object] = {"input_names": ["x"], "output_names": ["scores"]}
    if exporter == "dynamo":
        if not fixed:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    else:
        # PRESERVE: export the module as it is (eval) without the eval-mode peephole
        # passes that would fold BatchNormalization into the Conv before it.
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
        if not fixed:
            kwargs["dynamic_axes"] = {"x": {0: "batch"}, "scores": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=exporter == "dynamo", **kwargs)


@pytest.fixture(scope="module")
def digits(mnist: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    x, y = mnist
    return {
        "x_train": x[:4000], "y_train": y[:4000],
        "x_adapt": shift_images(x[4000:6000], "rot", seed=1), "y_adapt": y[4000:6000],
        "x_eval": shift_images(x[6000:8000], "rot", seed=2), "y_eval": y[6000:8000],
    }


_TRAINED: dict[str, nn.Module] = {}


def _trained(name: str, digits: dict[str, np.ndarray]) -> nn.Module:
    if name not in _TRAINED:
        case = CASES[name]
        torch.set_num_threads(1)  # faster than 2 for these sizes, and no oversubscription
        _TRAINED[name] = _train(case.factory(), _layout(digits["x_train"], case.layout),
                                digits["y_train"])
    return _TRAINED[name]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(CASES))
def test_exported_model_refines(name: str, exporter: str, digits: dict[str, np.ndarray],
                                tmp_path: Path) -> None:
    case = CASES[name]
    net = _trained(name, digits)
    path = tmp_path / f"{name}-{exporter}.onnx"
    sample = _layout(digits["x_adapt"][:1 if case.fixed_batch else 2], case.layout)
    _export(net, sample, path, exporter, case.fixed_batch)

    model = load_model(path)
    ops = {n.op_type for n in model.graph.node}
    missing = case.ops[exporter] - ops
    assert not missing, f"the {exporter} export has no {sorted(missing)}; ops: {sorted(ops)}"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].HasField("dim_value") == case.fixed_batch
    plan = plan_model(model)
    assert plan.output_kind == case.output_kind
    assert {b.split(" ")[0] for b in plan.boundaries} == case.boundary_ops, plan.boundaries

    out = tmp_path / "refined.onnx"
    x_adapt = _layout(digits["x_adapt"], case.layout)
    x_eval = _layout(digits["x_eval"], case.layout)
    result = refine(path, out, x_adapt, digits["y_adapt"],
                    config=RefineConfig.of(device="cpu", **case.config),  # type: ignore[arg-type]
                    eval_data=(x_eval, digits["y_eval"]))
    assert len({r.name for r in result.layers}) == case.attempted, result.plan["layers"]
    assert result.environment["reverse_pass"] == "onnxruntime"  # every case compiles
    if "max_layers" not in case.config:  # inspect plans every layer: the same path
        assert inspect_model(path)["reverse_pass"] == "onnxruntime"
    assert result.environment["batch_mode"] == "dynamic"  # a fixed batch too: no chunks
    assert result.eval_before is not None and result.eval_after is not None
    before, after = result.eval_before.accuracy, result.eval_after.accuracy
    assert after >= before + 0.03, f"{name} ({exporter}): {before:.4f} -> {after:.4f}"
    assert changed_initializers(path, out)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_nothing_refinable_is_a_clear_error(exporter: str, digits: dict[str, np.ndarray],
                                            tmp_path: Path) -> None:
    net = SquareHeadNet().eval()
    path = tmp_path / "square.onnx"
    _export(net, digits["x_adapt"][:2, None], path, exporter, fixed=False)
    with pytest.raises(UnsupportedModelError, match="nothing to refine.*Round"):
        refine(path, tmp_path / "out.onnx", digits["x_adapt"][:200, None],
               digits["y_adapt"][:200], config=RefineConfig.of(device="cpu"))
    assert not (tmp_path / "out.onnx").exists()
    assert isinstance(onnx.load(str(path)), onnx.ModelProto)


# ------------------------------------------- batch dims baked in by exporters


def _baked_batch_graph(batch: int | str, allowzero: int) -> onnx.ModelProto:
    """Conv without bias + a bias reshaped to [1, C, 1, 1] by a node (a weight chain
    whose leading 1 is not a batch), Relu, Reshape to the constant [1, 36] (batch 1
    baked in), Gemm. ``batch``: the input's first dim (1 or symbolic)."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "b_shape"),
        numpy_helper.from_array(np.array([1, 36], np.int64), "flat"),
        numpy_helper.from_array(rng.standard_normal((10, 36)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["b", "b_shape"], ["b4"]),
        helper.make_node("Add", ["c", "b4"], ["cb"]),
        helper.make_node("Relu", ["cb"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["f"], allowzero=allowzero),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("batch", [1, "N"])
@pytest.mark.parametrize("allowzero", [0, 1])
def test_baked_batch_runs_whole_batches(batch: int | str, allowzero: int) -> None:
    from onnxfbp.run.forward import ForwardRunner  # noqa: PLC0415

    model = _baked_batch_graph(batch, allowzero)
    plan = plan_model(model)
    weights = [layer.weight.initializer for layer in plan.refinable]
    runner = ForwardRunner(model, "x", weights, ["r"], ["CPUExecutionProvider"])
    assert runner.chunk is None  # batches run whole, not one sample at a time
    x = np.random.default_rng(1).standard_normal((5, 2, 3, 3)).astype(np.float32)
    got = runner.run(x, ["y", "r"], runner.initial_weights)
    one = _baked_batch_graph(1, allowzero)
    import onnxruntime as ort  # noqa: PLC0415

    session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(["y"], {"x": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(got["y"], expected, rtol=1e-5, atol=1e-5)
    assert got["r"].shape == (5, 4, 3, 3)
