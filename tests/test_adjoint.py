"""The reverse pass compiled for onnxruntime (``onnxfbp.reverse.adjoint``) against the
NumPy one it replaces:

1. per op: the forms of MaxPool and Conv emitted for each provider give the
   rule's own ``vjp`` (every other spec: ``test_ops_contract``);
2. per model: every corpus model compiles, and on real data the residual at
   each layer output equals the NumPy reverse pass;
3. a node without an emitter is named (the NumPy pass then runs); every op with
   an inverse rule has one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from shared_data import models_dir
from test_models import MODELS, _splits
from test_rules import SPECS, Spec, _inputs, _view

from onnxfbp import RefineConfig, refine
from onnxfbp.errors import GateError
from onnxfbp.fit.targets import label_target
from onnxfbp.graph.plan import PlanNode
from onnxfbp.reverse.adjoint import EMITTERS, AdjointGraph, AdjointUnavailable
from onnxfbp.reverse.arrays import reverse
from onnxfbp.reverse.select import compile_reverse
from onnxfbp.rules import RULES
from onnxfbp.schedules.state import ModelState

CPU = ["CPUExecutionProvider"]
COVERED = [s for s in SPECS if s.op in EMITTERS]
# forms an emitter declines (the NumPy pass runs): strided slices
DECLINED = {"slice-steps"}


def _close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


MAXPOOLS = [s for s in COVERED if s.op == "MaxPool"]


@pytest.mark.parametrize("spec", MAXPOOLS, ids=[s.id for s in MAXPOOLS])
def test_maxpool_without_maxunpool_matches_rule(spec: Spec) -> None:
    """The form for the CUDA provider (no MaxUnpool kernel there): ScatterElements."""
    built = _check_emitter(spec, frozenset({"MaxUnpool"}))
    ops = {n.op_type for n in built.model.graph.node}
    assert "MaxUnpool" not in ops


TILED_POOLS = [  # stride = kernel, no padding
    Spec("MaxPool", [(2, 3, 8, 8)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
         id="tiled-2x2"),
    Spec("MaxPool", [(2, 2, 7, 7)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
         id="tiled-short-of-edge"),
    Spec("MaxPool", [(1, 2, 9, 8)], attrs={"kernel_shape": [3, 3], "strides": [3, 3]},
         id="tiled-3x3"),
    Spec("MaxPool", [(1, 2, 6, 9)], attrs={"kernel_shape": [2, 3], "strides": [2, 3]},
         id="tiled-2x3"),
]


@pytest.mark.parametrize("spec", TILED_POOLS, ids=[s.id for s in TILED_POOLS])
@pytest.mark.parametrize("avoid", [frozenset(), frozenset({"MaxUnpool"})], ids=["cpu", "cuda"])
def test_maxpool_ties_route_to_the_first_max(spec: Spec, avoid: frozenset[str]) -> None:
    """Ties everywhere (values on a coarse grid, constant blocks): on the CPU provider
    each window's residual goes to its first maximum, exactly as the rule's vjp, in
    the MaxUnpool form and in the ScatterElements form used on CUDA. (CUDA's own
    MaxPool indices pick another of tied maxima: tests/test_gpu.py.)"""
    rng = np.random.default_rng(7)
    x = np.round(rng.standard_normal(spec.shapes[0]) * 2).astype(np.float32) / 2
    x[:, :, :3, :3] = 1.0
    built = _check_emitter(spec, avoid, [x])
    ops = {n.op_type for n in built.model.graph.node}
    assert ("MaxUnpool" in ops) == (not avoid), ops


_WIDE = np.random.default_rng(5)
WIDE_CONVS = [  # the CPU's Conv form of the adjoint: 16 or more input channels, stride 1
    Spec("Conv", [(2, 16, 7, 7)], {1: _WIDE.standard_normal((4, 16, 3, 3)).astype(np.float32)},
         {"pads": [1, 1, 1, 1]}, id="wide-pad"),
    Spec("Conv", [(2, 16, 9, 9)], {1: _WIDE.standard_normal((3, 16, 3, 3)).astype(np.float32)},
         {"dilations": [2, 2], "pads": [0, 1, 2, 1]}, id="wide-dilated-asymmetric"),
    Spec("Conv", [(2, 17, 6, 5)], {1: _WIDE.standard_normal((5, 17, 2, 3)).astype(np.float32),
                                   2: _WIDE.standard_normal(5).astype(np.float32)},
         {"pads": [0, 2, 1, 0]}, id="wide-rectangular-bias"),
]


@pytest.mark.parametrize("spec", WIDE_CONVS, ids=[s.id for s in WIDE_CONVS])
def test_wide_conv_adjoint_is_a_conv_on_cpu(spec: Spec) -> None:
    """Stride 1 with 16 or more input channels: on the CPU the adjoint is a Conv of the
    residual with the flipped, channel-swapped kernel, equal to the rule's vjp."""
    built = _check_emitter(spec, frozenset())
    ops = [n.op_type for n in built.model.graph.node]
    assert "Conv" in ops and "ConvTranspose" not in ops


def _check_emitter(
    spec: Spec, avoid: frozenset[str], xs: list[np.ndarray] | None = None
) -> Any:
    """Build ``spec``'s node alone and compare its residuals with the rule's vjp
    (exact up to float32 rounding) on ``xs`` (default: random normal inputs)."""
    rule, view = RULES[spec.op], _view(spec)
    xs = _inputs(spec) if xs is None else xs
    names = [f"in{i}" for i in range(spec.n_inputs)]
    data = rule.data_inputs(view)
    dyn = {names[i]: xs[k] for k, i in enumerate(view.dynamic)}
    o0 = rule.forward(view, xs).astype(np.float32)
    r = np.random.default_rng(3).standard_normal(o0.shape).astype(np.float32)
    node = PlanNode(view.name, spec.op, names, ["out"], view, data,
                    {i: names[i] for i in spec.consts})
    plan: Any = SimpleNamespace(logits="out", nodes=[node])
    wanted = [names[i] for i in data]
    if spec.id in DECLINED:
        with pytest.raises(AdjointUnavailable) as declined:
            AdjointGraph.build(plan, [0], wanted, {**dyn, "out": o0}, {view.name: view}, CPU,
                               avoid=avoid)
        assert str(declined.value) == f"{spec.op} {view.name!r}: form not covered"
        return str(declined.value)
    built = AdjointGraph.build(plan, [0], wanted, {**dyn, "out": o0}, {view.name: view}, CPU,
                               avoid=avoid)
    got = built.run({**dyn, "out": o0}, r, {view.name: view})
    pos = [view.dynamic.index(i) for i in data]
    want = rule.vjp(view, r, [xs[p] for p in pos], o0)
    for name, w in zip(wanted, want, strict=True):
        _close(got[name], w)
    return built


def test_op_without_emitter_is_named() -> None:
    """A node the compiler has no emitter for (here a made-up op): the reason names it."""
    spec = next(s for s in SPECS if s.op == "Relu")
    view = _view(spec)
    node = PlanNode(view.name, "MadeUpOp", ["in0"], ["out"], view, (0,), {})
    plan: Any = SimpleNamespace(logits="out", nodes=[node])
    x = _inputs(spec)[0]
    with pytest.raises(AdjointUnavailable, match="^no onnx adjoint for MadeUpOp$"):
        AdjointGraph.build(plan, [0], ["in0"], {"in0": x, "out": x}, {view.name: view}, CPU)


@pytest.fixture(scope="module")
def corpus_data(mnist: tuple[np.ndarray, np.ndarray],
                cifar: tuple[np.ndarray, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    return {"mnist": _splits("mnist", *mnist), "cifar": _splits("cifar", *cifar)}


def _corpus_batch(
    name: str, corpus_data: dict[str, dict[str, np.ndarray]], n: int
) -> tuple[Path, np.ndarray, np.ndarray]:
    """The model's path and its first ``n`` adaptation samples, preprocessed."""
    path = models_dir() / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {models_dir()}")
    spec = MODELS[name]
    data = corpus_data[spec.dataset]
    return path, spec.prep(data["x_adapt"][:n]), data["y_adapt"][:n]


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_reverse_matches_numpy_on_corpus(
    name: str, shared_models: Path, corpus_data: dict[str, dict[str, np.ndarray]]
) -> None:
    path, x, y = _corpus_batch(name, corpus_data, 64)
    state = ModelState(path, RefineConfig.of(device="cpu"))
    layers = state.layers
    probe = compile_reverse(state, x)  # every corpus model compiles (else this raises)
    acts = probe.acts
    z = acts[state.plan.logits]
    t_logits = label_target(z.reshape(len(y), -1), y, 1.0).reshape(z.shape)
    got = probe.graph.run(acts, (t_logits - z).astype(z.dtype), probe.views)
    want, _ = reverse(state.plan, acts, t_logits, probe.path, probe.views, 1.0, linearized=True)
    assert len(layers) >= 2
    for layer in layers:
        _close(got[layer.output], np.asarray(want[layer.output]), rtol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
def test_minibatch_schedule_runs_compiled_on_corpus(
    name: str, shared_models: Path, corpus_data: dict[str, dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    """The whole minibatch schedule on the compiled reverse pass, every corpus model
    (400 samples, every layer: the few-label rule switched off): it runs, reports
    the onnxruntime pass and writes finite weights no worse on the held-out split."""
    path, x, y = _corpus_batch(name, corpus_data, 400)
    config = RefineConfig.of(device="cpu", min_heldout_for_depth=0, epochs=1, step_batch=100)
    out = tmp_path / "r.onnx"
    try:
        result = refine(path, out, x, y, config=config)
    except GateError:  # nothing better found: nothing written
        assert not out.exists()
        return
    assert result.environment["reverse_pass"] == "onnxruntime"
    assert result.heldout_after.accuracy >= result.heldout_before.accuracy
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    written = onnx.load(str(out))
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in written.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE))
