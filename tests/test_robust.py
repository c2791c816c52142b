"""Steps that cannot diverge and outcomes that are never silent (issue 18).

- each step moves every layer by the fraction ``lr`` of its norm; a huge step
  is survived with every layer still refined (blow-ups halve the step and the
  run goes on);
- non-finite numbers never reach LAPACK: a typed :class:`NonFiniteError`, and a
  layer left unchanged with the reason in its report;
- the plan rows say ``refined`` only for layers whose weights changed; the final
  summary names reverted layers and an output-layer-only gain;
- suspicious data is warned about (a class missing or rare; inputs far outside
  the retain data's range).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from onnxfbp import ModelState, RefineConfig, from_arrays, load_data
from onnxfbp.checks import InputStats, input_range_warning, label_warnings
from onnxfbp.cli.commands import _print_result
from onnxfbp.events import Event, Message, StepBackedOff
from onnxfbp.fit.head import logistic_path, polish_head
from onnxfbp.fit.solve import (
    NonFiniteError,
    NormalEquations,
    Preconditioner,
    PreconditionerSums,
    choose_ridge,
    spd_inverse,
)
from onnxfbp.output.report import validate_report
from onnxfbp.output.results import LayerReport
from onnxfbp.output.summary import plan_summary
from onnxfbp.refine import refine, split
from onnxfbp.schedules.state import RunContext, Score

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DEMO = MODELS / "demo_mnist_cnn.onnx"


def _demo(n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    data = load_data(MODELS / "demo_adapt.npz", "input")
    return data.take(np.arange(n))


def _all_finite(model_values: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in model_values.values())


def _selected(result: object) -> list[dict[str, object]]:
    return [p for p in result.plan["layers"] if p["selected"]]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- divergence


def test_each_step_moves_every_layer_by_lr_of_its_norm() -> None:
    """One step (one mini-batch of all training samples, no averaging): every kept
    layer moved by exactly ``lr ||W||``, whatever its residual's scale."""
    x, y = _demo()
    config = RefineConfig.of(device="cpu", lr=0.07, step_batch=5000, epochs=1.0,
                             average=0.0, sweep_max_inputs=0)
    result = refine(DEMO, None, x, y, config=config)
    minibatch = [r for r in result.layers if r.reason.startswith("minibatch")]
    assert len(minibatch) == 4 and all(r.outcome == "kept" for r in minibatch)
    assert "1 steps of 5000" in minibatch[0].reason
    assert [round(r.relative_change, 6) for r in minibatch] == [0.07] * 4


def test_blowups_halve_the_step_and_the_run_goes_on() -> None:
    """lr 60x the default (3 weight norms a step): the steps blow up; each
    blow-up goes back to the kept weights with half the step, and the run goes on
    with every layer, which is kept and changed; every weight written is finite."""
    x, y = _demo()
    events: list[Event] = []
    config = RefineConfig.of(device="cpu", lr=3.0, epochs=3.0, sweep_max_inputs=0)
    result = refine(DEMO, None, x, y, config=config, progress=events.append)
    backed = [e for e in events if isinstance(e, StepBackedOff)]
    assert len(backed) >= 3, "the huge step must blow up several times"
    assert [e.lr for e in backed] == [3.0 / 2 ** (i + 1) for i in range(len(backed))]
    minibatch = [r for r in result.layers if r.reason.startswith("minibatch")]
    assert all(r.halvings == len(backed) for r in minibatch)
    assert all(f"step halved {len(backed)} times" in r.reason for r in minibatch)
    assert all(r.outcome == "kept" for r in minibatch)
    assert all(p["changed"] for p in _selected(result))
    assert any(isinstance(e, Message) and "diverged at step" in e.text for e in events)
    assert result.heldout_after.accuracy > result.heldout_before.accuracy
    from onnx import numpy_helper
    assert all(np.isfinite(numpy_helper.to_array(t)).all()
               for t in result.model.graph.initializer)
    validate_report(result.to_dict())


def test_keras_concat_cnn_on_elastic_digits_keeps_every_layer(shared_models: Path) -> None:
    """The cell of the issue: the keras concat CNN on elastic MNIST diverged and
    reverted every deep layer (0.915 -> 0.915). Its first convolution took
    preconditioned steps of 0.39, then 2.2 of its weight norm; the relative step
    holds every layer to ``lr`` of its norm."""
    sys.path.insert(0, str(ROOT / "tools"))
    from benchlib import load_images01  # noqa: PLC0415
    from shifts import apply_shift  # noqa: PLC0415

    images, labels = load_images01("mnist")
    xa = apply_shift(images[:2000], "elastic", 1)[..., None]
    xe = apply_shift(images[5000:7000], "elastic", 2)[..., None]
    model = shared_models / "mnist_keras_tf2onnx1111_cnn_concat_nhwc.onnx"
    result = refine(model, None, xa, labels[:2000], config=RefineConfig.of(device="cpu"),
                    eval_data=(xe, labels[5000:7000]))
    rows = _selected(result)
    assert len(rows) == 6 and all(p["changed"] for p in rows)
    assert result.eval_after is not None and result.eval_before is not None
    assert result.eval_after.accuracy > result.eval_before.accuracy + 0.002


# ---------------------------------------------------------------------------- non-finite


def test_nonfinite_matrices_never_reach_lapack() -> None:
    bad = np.eye(4)
    bad[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="non-finite"):
        spd_inverse(bad)
    sums = PreconditionerSums(False)
    rows = np.ones((1, 8, 3), np.float32)
    rows[0, 2, 1] = np.inf
    with np.errstate(invalid="ignore"):
        sums.add(rows)
    with pytest.raises(NonFiniteError):
        Preconditioner.from_sums(sums, 1.0)
    dual = PreconditionerSums(True)
    dual.add(rows)
    with pytest.raises(NonFiniteError):
        Preconditioner.from_sums(dual, 1.0)
    train, val = NormalEquations(1, 3, 2), NormalEquations(1, 3, 2)
    x = np.ones((1, 5, 3), np.float32)
    train.add(x, np.ones((1, 5, 2)))
    val.add(x, np.ones((1, 5, 2)))
    train.gram[0, 0, 0] = np.nan
    choice = choose_ridge(train, val, np.zeros((1, 3, 2)), (0.1, 1.0))
    assert choice.lam == float("inf") and "non-finite" in (choice.why or "")
    feats = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    feats[3, 2] = np.nan
    with pytest.raises(NonFiniteError):
        list(logistic_path(feats, np.arange(50) % 3, np.zeros((6, 3)), 0.0, (1.0,), 5))


def test_output_layer_with_nan_features_is_skipped_not_crashed() -> None:
    """NaN inputs give NaN features: the logistic path is not run, the output layer
    stays as it was and its report says why."""
    x, y = _demo(300)
    x = x.copy()
    x[::7] = np.nan
    data = from_arrays(x, y)
    config = RefineConfig.of(device="cpu")
    state = ModelState(DEMO, config)
    rng, train_idx, val_idx = split(len(data), config)
    ctx = RunContext(data, train_idx, val_idx, rng, Score(1e9, 0), lambda e: None)
    ran, estimate = polish_head(state, ctx)
    assert ran and estimate is None
    report = ctx.reports[-1]
    assert report.outcome == "skipped" and not report.accepted
    assert "non-finite" in report.reason
    assert all(np.array_equal(v, state.original[k]) for k, v in state.values.items())


def test_minibatch_with_nan_rows_skips_the_layers_and_goes_on() -> None:
    from onnxfbp.schedules.minibatch import train_minibatch  # noqa: PLC0415

    x, y = _demo(300)
    x = x.copy()
    x[5] = np.nan
    data = from_arrays(x, y)
    config = RefineConfig.of(device="cpu", epochs=0.5, step_batch=50, precond_samples=100)
    state = ModelState(DEMO, config)
    rng, train_idx, val_idx = split(len(data), config)
    ctx = RunContext(data, train_idx, val_idx, rng, Score(1e9, 0), lambda e: None)
    train_minibatch(state, ctx)
    assert ctx.reports and all(r.outcome in ("skipped", "reverted", "kept")
                               for r in ctx.reports)
    assert any(r.outcome == "skipped" and "non-finite" in r.reason for r in ctx.reports)
    assert _all_finite(state.values)


# ---------------------------------------------------------------------------- honesty


def test_plan_marks_refined_only_for_layers_whose_weights_changed() -> None:
    state = ModelState(DEMO, RefineConfig.of(device="cpu"))
    head, deep = state.layers[0], state.layers[-1]
    block = state.block(head)
    state.set_weights(head, block, block.weights() * 1.01)
    reverted = LayerReport(0, deep.name, deep.op, [1], False,
                           "minibatch schedule: diverged at step 13; step halved 3 times; "
                           "no held-out gain; reverted", outcome="reverted")
    plan = plan_summary(state, [reverted])
    rows = {p["name"]: p for p in plan["layers"]}
    assert rows[head.name]["refined"] and rows[head.name]["outcome"] == "changed"
    assert not rows[deep.name]["refined"] and rows[deep.name]["selected"]
    assert rows[deep.name]["outcome"] == "reverted"
    assert "diverged at step 13" in rows[deep.name]["reason"]
    others = [p for p in plan["layers"] if p["name"] not in (head.name, deep.name)]
    assert all(not p["refined"] and p["outcome"] == "unchanged" for p in others)


def test_summary_says_what_changed_and_what_was_reverted() -> None:
    rows = [
        {"name": "conv", "op": "Conv", "refined": False, "selected": True, "changed": False,
         "outcome": "reverted", "reason": "diverged at step 13; step halved 3 times; reverted"},
        {"name": "fc", "op": "Gemm", "refined": True, "selected": True, "changed": True,
         "outcome": "changed", "reason": None},
    ]
    ev = SimpleNamespace(accuracy=0.9, n=10, task=None)
    result = SimpleNamespace(heldout_before=ev, heldout_after=ev, eval_before=None,
                             eval_after=None, plan={"layers": rows}, layers=[],
                             timings={"total": 1.0})
    out = io.StringIO()
    _print_result(result, out)
    text = out.getvalue()
    assert "layers changed (1 of 2): fc" in text
    assert "reverted: conv (diverged at step 13; step halved 3 times; reverted)" in text
    assert "only the output layer changed" in text


# ---------------------------------------------------------------------------- data warnings


def test_missing_and_rare_classes_are_warned_about() -> None:
    y = np.repeat(np.arange(9), 100)  # class 9 missing
    y[800:897] = 7  # class 8 keeps 3 of 900 (< 1 %)
    data = from_arrays(np.zeros((len(y), 2), np.float32), y)
    lines = label_warnings(data, 10)
    assert len(lines) == 2
    assert "class 9 missing" in lines[0]
    assert "below 1%" in lines[1] and "8: 3" in lines[1]
    balanced = from_arrays(np.zeros((100, 2), np.float32), np.arange(100) % 10)
    assert label_warnings(balanced, 10) == []


def test_refine_warns_about_a_missing_class_in_events_and_report() -> None:
    x, y = _demo(600)
    keep = y != 4
    events: list[Event] = []
    result = refine(DEMO, None, x[keep], y[keep],
                    config=RefineConfig.of(device="cpu", epochs=0.25),
                    progress=events.append)
    assert any(isinstance(e, Message) and "class 4 missing" in e.text for e in events)
    assert any("class 4 missing" in w for w in result.warnings)
    assert result.to_dict()["warnings"] == result.warnings
    validate_report(result.to_dict())


def test_input_range_warning() -> None:
    rng = np.random.default_rng(0)
    retain = InputStats.of(rng.random((200, 28, 28)))
    assert input_range_warning(InputStats.of(rng.random((100, 28, 28))), retain) is None
    raw = InputStats.of(rng.random((100, 28, 28)) * 255)  # 0-255 against 0-1
    line = input_range_warning(raw, retain)
    assert line is not None and line.startswith("warning: adaptation inputs lie far outside")
    shifted = InputStats.of(rng.random((100, 28, 28)) + 3.0)
    assert input_range_warning(shifted, retain) is not None
    assert input_range_warning(InputStats.of(np.zeros(0)), retain) is None


# ---------------------------------------------------------------------------- node names


def test_unnamed_nodes_are_named_alike_by_plan_inspect_and_refine(tmp_path: Path) -> None:
    """Every node of the demo model unnamed: plan, inspect and refine name them
    ``<op>#<k>`` (graph order), and no refinable layer is listed as off path."""
    import onnx  # noqa: PLC0415

    from onnxfbp.graph.inspect import inspect_model  # noqa: PLC0415
    from onnxfbp.graph.plan import node_names  # noqa: PLC0415

    model = onnx.load(DEMO)
    for node in model.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, path)
    names = node_names(model)
    convs = [n for n in names if n.startswith("Conv#")]
    assert convs == [f"Conv#{k}" for k in range(len(convs))] and len(convs) == 2

    info = inspect_model(path)
    assert [n["name"] for n in info["nodes"]] == names
    for n in info["nodes"]:
        if n["op"] in ("Conv", "Gemm"):
            assert n["refined"] and n["status"] != "off-path", n
    assert set(info["refined_layers"]) >= set(convs)

    x, y = _demo(400)
    result = refine(path, None, x, y, config=RefineConfig.of(device="cpu", epochs=0.25))
    assert {r.name for r in result.layers} <= set(info["refined_layers"])
    assert {p["name"] for p in result.plan["layers"]} == set(info["refined_layers"])
    assert all(not node.name for node in result.model.graph.node), "the graph is unchanged"
