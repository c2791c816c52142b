"""The deepest convolution's residual at its kept positions (``onnxfbp.reverse.kept_branch``)
against the dense reverse pass it replaces:

1. every corpus model with such a branch: on real data the residual at random
   kept positions equals the compiled dense pass there;
2. small graphs with the other forms (LeakyRelu, BatchNormalization, Identity,
   pools with gaps and leftovers, a padded dilated convolution, tied maxima);
3. chains it must not take (a second reader, a strided convolution, overlapping
   windows) are declined;
4. the minibatch schedule gives the same weights with it as without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_adjoint import _corpus_batch, corpus_data  # noqa: F401 (fixture)
from test_models import MODELS

from onnxfbp import ModelState, RefineConfig, from_arrays
from onnxfbp.fit.layers import kept_positions
from onnxfbp.fit.targets import label_target
from onnxfbp.refine import run_refine
from onnxfbp.reverse.adjoint import AdjointGraph
from onnxfbp.reverse.kept_branch import KeptBranch
from onnxfbp.reverse.select import ReverseProbe, compile_reverse, kept_route
from onnxfbp.schedules.state import Score

CPU = RefineConfig.of(device="cpu")


def _partial(state: ModelState, probe: ReverseProbe, path: list[int],
             outputs: list[str]) -> AdjointGraph:
    """The compiled reverse pass of ``path`` giving the residuals at ``outputs``."""
    return AdjointGraph.build(state.plan, path, outputs, probe.acts, probe.views,
                              state.providers, None, state.xp)

# corpus models whose deepest refined convolution has a branch (the rest decline:
# no convolution, a skip connection or a strided next convolution)
WITH_BRANCH = {
    "mnist_pytorch25_legacy_cnn.onnx": ("Relu", "MaxPool"),
    "mnist_cntk_zoo_mnist8.onnx": ("Relu", "MaxPool"),  # bias Add of M: on the dense pass
    "mnist_whitematter_custom_bn.onnx": ("BatchNormalization", "Relu", "MaxPool"),
}


def _dense_and_kept(
    state: ModelState, x: np.ndarray, y: np.ndarray, seed: int = 0
) -> tuple[KeptBranch | None, np.ndarray, np.ndarray]:
    """The branch of ``state``'s deepest layer and its residual at random kept
    positions, with the dense compiled pass's residual at the same positions."""
    probe = compile_reverse(state, x)
    acts, views, dense = probe.acts, probe.views, probe.graph
    z = acts[state.plan.logits]
    r_logits = (label_target(z.reshape(len(y), -1), y, 1.0).reshape(z.shape) - z).astype(z.dtype)
    route = kept_route(state.plan, state.layers, acts, probe.path)
    branch = route.branch
    if branch is None:
        return None, np.zeros(0), np.zeros(0)
    assert len(route.path) < len(probe.path)
    partial = _partial(state, probe, route.path, route.outputs)
    positions = branch.grid[0] * branch.grid[1]
    keep = kept_positions(np.random.default_rng(seed), positions, 16)
    keep = np.arange(positions) if keep is None else keep
    got = branch.residual(acts, partial.run(acts, r_logits, views)[branch.source], views, keep)
    deepest = state.layers[-1].output
    full = dense.run(acts, r_logits, views)[deepest]
    want = full.reshape(*full.shape[:2], -1)[:, :, keep]
    return branch, np.asarray(got), want


@pytest.mark.parametrize("name", list(MODELS))
def test_kept_residual_equals_dense_pass_on_corpus(
    name: str, shared_models: Path, corpus_data: dict[str, dict[str, np.ndarray]]  # noqa: F811
) -> None:
    path, x, y = _corpus_batch(name, corpus_data, 64)
    branch, got, want = _dense_and_kept(ModelState(path, CPU), x, y)
    if name not in WITH_BRANCH:
        assert branch is None
        return
    assert branch is not None
    assert tuple(step.op for step in branch.steps) == WITH_BRANCH[name]
    assert got.shape == want.shape and np.count_nonzero(want) > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


# ---------------------------------------------------------------- small graphs


def _model(chain: list[tuple[str, dict[str, Any]]], conv2: dict[str, Any],
           size: int = 13, c1: int = 4, c2: int = 5) -> onnx.ModelProto:
    """x (N, 2, size, size) -> Conv(3x3, pad 1) -> chain -> Conv ``conv2`` ->
    Flatten -> Gemm (3 classes)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c1, 2, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(c1).astype(np.float32) * 0.1, "b1"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["t0"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3], name="conv1")]
    tensor = "t0"
    for i, (op, attrs) in enumerate(chain, start=1):
        inputs = [tensor]
        if op == "BatchNormalization":
            for k, (lo, hi) in enumerate([(0.5, 2), (-1, 1), (-1, 1), (0.5, 2)]):
                name = f"bn{i}_{k}"
                inits.append(numpy_helper.from_array(
                    rng.uniform(lo, hi, c1).astype(np.float32), name))
                inputs.append(name)
        nodes.append(helper.make_node(op, inputs, [f"t{i}"], name=f"{op.lower()}{i}", **attrs))
        tensor = f"t{i}"
    kernel = conv2.get("kernel_shape", [3, 3])
    inits.append(numpy_helper.from_array(
        rng.standard_normal((c2, c1, *kernel)).astype(np.float32), "w2"))
    nodes.append(helper.make_node("Conv", [tensor, "w2"], ["c2"], name="conv2", **conv2))
    nodes.append(helper.make_node("Relu", ["c2"], ["r2"], name="relu_out"))
    nodes.append(helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"))
    probe = onnx.shape_inference.infer_shapes(helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [1, 2, size, size])],
            [helper.make_tensor_value_info("flat", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 13)]))
    flat = probe.graph.output[0]
    width = flat.type.tensor_type.shape.dim[1].dim_value
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((width, 3)) / np.sqrt(width)).astype(np.float32), "w3"))
    nodes.append(helper.make_node("Gemm", ["flat", "w3"], ["logits"], name="fc"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


RELU, POOL2 = ("Relu", {}), ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})
FORMS = {
    # size 13: the last row and column are past the last whole window
    "relu-pool-leftover": ([RELU, POOL2], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "leaky-bn-identity": ([("LeakyRelu", {"alpha": 0.2}), ("BatchNormalization", {}),
                           ("Identity", {}), POOL2], {"kernel_shape": [3, 3]}),
    "pool-with-gaps": ([RELU, ("MaxPool", {"kernel_shape": [2, 2], "strides": [3, 3]})],
                       {"kernel_shape": [2, 2], "pads": [1, 0, 0, 1]}),
    "pool-2x3-dilated-conv": ([("MaxPool", {"kernel_shape": [2, 3], "strides": [2, 3]}), RELU],
                              {"kernel_shape": [3, 3], "dilations": [2, 1],
                               "pads": [2, 1, 1, 0]}),
    "no-pool": ([RELU], {"kernel_shape": [5, 3], "pads": [2, 0, 1, 2]}),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_kept_residual_equals_dense_pass_on_small_graphs(
    form: str, ties: bool, tmp_path: Path
) -> None:
    """Every position of the grid kept (and a random 16): equal to the dense pass.
    ``tied``: inputs on a coarse grid with constant blocks, so that windows hold
    tied maxima, which must go to the first one."""
    chain, conv2 = FORMS[form]
    path = tmp_path / "m.onnx"
    onnx.save(_model(chain, conv2), path)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 2, 13, 13)).astype(np.float32)
    if ties:
        x = np.round(x) / 2
        x[:, :, 2:9, 3:10] = 0.5
    y = rng.integers(0, 3, 6)
    state = ModelState(path, CPU)
    assert [layer.name for layer in state.layers] == ["fc", "conv2", "conv1"]
    for seed in (None, 0, 1):
        probe = compile_reverse(state, x)
        acts, views, dense = probe.acts, probe.views, probe.graph
        route = kept_route(state.plan, state.layers, acts, probe.path)
        branch = route.branch
        assert branch is not None
        assert [s.op for s in branch.steps] == [op for op, _ in chain]
        z = acts["logits"]
        r_logits = (label_target(z, y, 1.0) - z).astype(np.float32)
        partial = _partial(state, probe, route.path, route.outputs)
        if seed == 1:  # the schedule's draw: whole pool windows, sharing adjoint rows
            keep, _ = branch.draw(np.random.default_rng(seed), 16)
        else:
            keep = np.arange(169) if seed is None else kept_positions(
                np.random.default_rng(seed), 169, 16)
        assert keep is not None
        got = branch.residual(acts, partial.run(acts, r_logits, views)["c2"], views, keep)
        want = dense.run(acts, r_logits, views)["t0"].reshape(6, 4, -1)[:, :, keep]
        assert np.count_nonzero(want) > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


# window (kh, kw), strides and windows (oh, ow) of the first pool on the 13 x 13 grid
POOLS = {"relu-pool-leftover": ((2, 2), (2, 2), (6, 6)),
         "leaky-bn-identity": ((2, 2), (2, 2), (6, 6)),
         "pool-with-gaps": ((2, 2), (3, 3), (4, 4)),
         "pool-2x3-dilated-conv": ((2, 3), (2, 3), (6, 4)),
         "no-pool": None}


@pytest.mark.parametrize("form", list(FORMS))
def test_draw_takes_whole_pool_windows(form: str, tmp_path: Path) -> None:
    """``ceil(2 count / window area)`` whole windows of the first pool, none past the last one,
    drawn from the positions inside windows; without a pool, ``count`` positions."""
    chain, conv2 = FORMS[form]
    path = tmp_path / "m.onnx"
    onnx.save(_model(chain, conv2), path)
    state = ModelState(path, CPU)
    probe = compile_reverse(state, np.zeros((2, 2, 13, 13), np.float32))
    branch = kept_route(state.plan, state.layers, probe.acts, probe.path).branch
    assert branch is not None
    rng = np.random.default_rng(0)
    for count in (16, 7, 1000):
        keep, population = branch.draw(rng, count)
        assert np.array_equal(keep, np.unique(keep))
        if POOLS[form] is None:
            assert population == 169 and len(keep) == min(count, 169)
            continue
        (kh, kw), (sh, sw), (oh, ow) = POOLS[form]
        assert population == oh * ow * kh * kw
        i, j = keep // 13, keep % 13
        assert ((i % sh < kh) & (j % sw < kw) & (i // sh < oh) & (j // sw < ow)).all()
        windows, members = np.unique((i // sh) * ow + j // sw, return_counts=True)
        assert len(windows) == min(-(-2 * count // (kh * kw)), oh * ow)
        assert (members == kh * kw).all()


@pytest.mark.parametrize(
    ("chain", "conv2"),
    [
        ([RELU, POOL2], {"kernel_shape": [3, 3], "strides": [2, 2]}),
        ([RELU, ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]})],
         {"kernel_shape": [3, 3]}),
        ([("Sigmoid", {})], {"kernel_shape": [3, 3]}),
    ],
    ids=["strided-conv", "overlapping-pool", "other-op"],
)
def test_chains_not_covered_are_declined(
    chain: list[tuple[str, dict[str, Any]]], conv2: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(chain, conv2), path)
    state = ModelState(path, CPU)
    x = np.random.default_rng(0).standard_normal((2, 2, 13, 13)).astype(np.float32)
    probe = compile_reverse(state, x)
    route = kept_route(state.plan, state.layers, probe.acts, probe.path)
    assert route.branch is None and route.path == probe.path


def test_second_reader_is_declined(tmp_path: Path) -> None:
    """conv1's Relu output also feeds the logits another way: not a branch."""
    model = _model([RELU], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})
    g = model.graph
    g.node.append(helper.make_node("ReduceMean", ["t1"], ["side"], axes=[1, 2, 3], keepdims=0,
                                   name="side"))
    g.node.append(helper.make_node("Unsqueeze", ["side", "one"], ["side2"], name="unsq"))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    g.node.append(helper.make_node("Add", ["logits", "side2"], ["out"], name="mix"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    state = ModelState(path, CPU)
    x = np.random.default_rng(0).standard_normal((2, 2, 13, 13)).astype(np.float32)
    probe = compile_reverse(state, x)
    assert state.layers[-1].name == "conv1"
    assert kept_route(state.plan, state.layers, probe.acts, probe.path).branch is None


def test_schedule_gives_the_same_weights_with_and_without_the_branch(
    shared_models: Path, mnist_rot: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three steps on the shared CNN, conv1's positions drawn as the dense pass
    draws them: conv1 (whose branch it is) and every other layer end within
    float32 rounding of the dense pass's weights. (The held-out
    gate is told every check is better: three steps from the input model score
    lower on these 100 held-out samples, and the schedule would revert them.)"""
    path = shared_models / "mnist_pytorch25_legacy_cnn.onnx"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in {shared_models}")
    x = MODELS[path.name].prep(mnist_rot["x_adapt"][:500])
    y = mnist_rot["y_adapt"][:500]
    config = RefineConfig.of(device="cpu", min_heldout_for_depth=0, epochs=0.75,
                             checks_per_epoch=1, step_batch=100, average=0.0)

    monkeypatch.setattr(Score, "better", lambda *args, **kwargs: True)

    def run() -> dict[str, np.ndarray]:
        state = ModelState(path, config)
        run_refine(state, from_arrays(x, y))
        return {k: np.asarray(v) for k, v in state.values.items()}

    def scattered(branch: KeptBranch, rng: np.random.Generator, count: int
                  ) -> tuple[np.ndarray, int]:
        """The positions the dense pass's rows draw (not whole windows)."""
        positions = branch.grid[0] * branch.grid[1]
        keep = kept_positions(rng, positions, count)
        return (np.arange(positions) if keep is None else keep), positions

    monkeypatch.setattr(KeptBranch, "draw", scattered)
    with_branch = run()
    monkeypatch.setattr(KeptBranch, "find", staticmethod(lambda *args: None))
    dense = run()
    original = ModelState(path, config).values
    assert set(with_branch) == set(dense) == set(original)
    for name, value in dense.items():
        assert not np.array_equal(value, original[name])  # every weight and bias stepped
        scale = float(np.abs(value - original[name]).max())
        np.testing.assert_allclose(with_branch[name], value, rtol=0, atol=1e-3 * scale)
