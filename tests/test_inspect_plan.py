"""``inspect`` decides from the plan: no reverse graph is compiled, and the reverse
pass it names is the one a minibatch run takes (:mod:`onnxfbp.reverse.select`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from onnxfbp import ModelState, RefineConfig
from onnxfbp.graph.inspect import inspect_model
from onnxfbp.reverse.adjoint import EMITTERS, AdjointGraph
from onnxfbp.reverse.select import ReverseChoice, choose_reverse, kept_route, plan_level_choice

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo_mnist_cnn.onnx"


def test_inspect_compiles_no_reverse_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("inspect compiled a reverse graph")

    monkeypatch.setattr(AdjointGraph, "build", staticmethod(refuse))
    info = inspect_model(DEMO)
    assert info["reverse_pass"] == "onnxruntime"
    assert info["kept_branch"] == "/features/features.0/Conv"


def test_plan_level_choice_names_the_op_without_an_adjoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = ModelState(DEMO, RefineConfig.of(device="cpu"))
    path, _ = state.reverse_plan(state.layers)
    assert plan_level_choice(state.plan, path) == "onnxruntime"
    assert plan_level_choice(state.plan, path, compiled=False) == (
        "numpy (compiled_reverse off)")
    monkeypatch.delitem(EMITTERS, "MaxPool")
    assert plan_level_choice(state.plan, path) == "numpy (no onnx adjoint for MaxPool)"


def test_run_time_choice_agrees_with_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled where the plan says so; the array pass with the same reason where a
    node has no adjoint; typed either way."""
    state = ModelState(DEMO, RefineConfig.of(device="cpu"))
    path, needed = state.reverse_plan(state.layers)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    acts, views = state.forward(x, needed), state.views()
    route = kept_route(state.plan, state.layers, acts, path)

    def choose() -> ReverseChoice:
        return choose_reverse(state.plan, route, acts, views, state.providers, None, np)

    compiled = choose()
    assert compiled.kind == "compiled" and compiled.graph is not None
    assert compiled.describe() == plan_level_choice(state.plan, route.path)
    monkeypatch.delitem(EMITTERS, "Relu")
    arrays = choose()
    assert arrays.kind == "arrays" and arrays.graph is None
    assert arrays.describe() == "numpy (no onnx adjoint for Relu)"
    assert arrays.describe() == plan_level_choice(state.plan, route.path)
