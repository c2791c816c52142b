"""Tasks beyond single-input classification (issue 21): regression, dense
classes, binary masks, several inputs and several trained outputs.

The models are tiny torch models trained here on real MNIST digits
(tests/task_models.py); each test refines on the shifted digits (contrast 0.6,
noise 0.35) and checks the task's metric improves with only weight values changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")

from task_models import build, dense_labels, pairs, rotated, shifted  # noqa: E402

from onnxfbp import RefineConfig  # noqa: E402
from onnxfbp.cli.commands import main  # noqa: E402
from onnxfbp.errors import DataError  # noqa: E402
from onnxfbp.fit.tasks import Metrics, Task, detect_task  # noqa: E402
from onnxfbp.refine import evaluate, refine  # noqa: E402

N = 400  # adaptation samples per test


@pytest.fixture(scope="module")
def digits(mnist: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    x, y = mnist
    return {"train_x": x[:1200], "train_y": y[:1200], "x": x[5000 : 5000 + N],
            "y": y[5000 : 5000 + N]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory,
           digits: dict[str, np.ndarray]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("task_models")
    return {kind: build(kind, folder, digits["train_x"], digits["train_y"])
            for kind in ("rot", "seg", "mask", "pair", "two_out")}


def _weights(path: Path | str) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _only_values_changed(before: Path, after: Path) -> None:
    """Same graph, same initializer names, shapes and dtypes; some values differ."""
    a, b = onnx.load(str(before)), onnx.load(str(after))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa, wb = _weights(before), _weights(after)
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype for k in wa)
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)
    assert all(np.isfinite(v).all() for v in wb.values())


CPU = RefineConfig.of(device="cpu", threads=1)


# ---------------------------------------------------------------- task detection


def test_task_follows_labels_and_output() -> None:
    ints, floats = np.zeros((4,), np.int64), np.zeros((4, 1), np.float32)
    assert detect_task(ints, (10,), "logits").kind == "classification"
    assert detect_task(np.zeros((4, 8, 8), np.int64), (11, 8, 8), "logits").kind == "dense"
    mask = np.full((4, 1, 8, 8), 0.5, np.float32)
    assert detect_task(mask, (1, 8, 8), "sigmoid-probabilities").kind == "binary"
    assert detect_task(mask, (1, 8, 8), "logits").kind == "regression"
    assert detect_task(floats, (1,), "logits").kind == "regression"
    assert detect_task(floats, (1,), "logits", loss="huber").loss == "huber"
    assert detect_task(mask, (1, 8, 8), "sigmoid-probabilities", "regression").kind \
        == "regression"


def test_labels_fitting_no_task_name_the_shapes_that_would() -> None:
    with pytest.raises(DataError) as info:
        detect_task(np.zeros((4, 3), np.float32), (11, 8, 8), "logits", output="classes")
    msg = str(info.value)
    assert "labels of shape [4, 3] under 'y'" in msg and "fit no task for output 'classes'" in msg
    assert "integer labels ['N', 8, 8] (dense classes)" in msg
    assert "float labels ['N', 11, 8, 8] (regression)" in msg


@pytest.mark.parametrize("task", [Task("dense", n_classes=3), Task("binary"),
                                  Task("regression"), Task("regression", "l1"),
                                  Task("regression", "huber")])
def test_the_target_is_a_step_down_the_loss(task: Task) -> None:
    rng = np.random.default_rng(0)
    if task.kind == "dense":
        z = rng.normal(size=(5, 3, 4, 4))
        y = rng.integers(0, 3, (5, 4, 4))
        y[0, 0, 0] = 255  # ignored
    else:
        z = rng.normal(size=(5, 1, 4, 4))
        y = rng.random((5, 1, 4, 4)) if task.kind == "binary" else rng.normal(size=(5, 1, 4, 4))
    t = task.target(z, y, 0.1)
    assert t.shape == z.shape
    assert task.score(t, y)[0] < task.score(z, y)[0]
    if task.kind == "dense":
        assert np.array_equal(task.gradient(z, y)[0, :, 0, 0], np.zeros(3))


def test_metrics() -> None:
    m = Metrics(Task("dense", n_classes=3))
    z = np.zeros((1, 3, 1, 3))
    z[0, [0, 1, 1], 0, [0, 1, 2]] = 1.0  # predicts 0, 1, 1
    m.add(z, np.array([[[0, 1, 2]]]))
    out = m.result()
    assert out["pixel_accuracy"] == pytest.approx(2 / 3)
    assert out["iou"] == [1.0, 0.5, 0.0] and out["mean_iou"] == pytest.approx(0.5)
    r = Metrics(Task("regression"))
    r.add(np.array([[1.0], [3.0]]), np.array([[0.0], [0.0]], np.float32))
    assert r.result()["mae"] == 2.0 and r.result()["rmse"] == pytest.approx(np.sqrt(5))


# ---------------------------------------------------------------- refine each task


def test_regression_refines_its_mae(models: dict[str, Path], digits: dict[str, np.ndarray],
                                    tmp_path: Path) -> None:
    xr, angle = rotated(digits["x"], 1)
    data = (shifted(xr, 2), angle)
    out = tmp_path / "rot.onnx"
    result = refine(models["rot"], out, data, config=CPU)
    before, after = result.heldout_before.metrics, result.heldout_after.metrics
    assert result.heldout_after.task == "regression"
    assert after["mae"] < before["mae"] and after["rmse"] < before["rmse"]
    assert result.gate["metric"] == "heldout_mae" and result.gate["gain"] > 0
    _only_values_changed(models["rot"], out)
    whole = evaluate(out, data, device="cpu")
    assert whole.metrics["mae"] < evaluate(models["rot"], data, device="cpu").metrics["mae"]


def test_dense_classes_refine_mean_iou(models: dict[str, Path], digits: dict[str, np.ndarray],
                                       tmp_path: Path) -> None:
    x1 = digits["x"][:, None]
    labels = dense_labels(x1, digits["y"])
    labels[:, :2] = 255  # ignored rows
    out = tmp_path / "seg.onnx"
    result = refine(models["seg"], out, (shifted(x1, 2), labels), config=CPU)
    assert result.heldout_after.task == "dense"
    assert result.heldout_after.metrics["mean_iou"] > result.heldout_before.metrics["mean_iou"]
    assert len(result.heldout_after.metrics["iou"]) == 11
    _only_values_changed(models["seg"], out)


def test_binary_masks_refine(models: dict[str, Path], digits: dict[str, np.ndarray],
                             tmp_path: Path) -> None:
    x1 = digits["x"][:, None]
    np.savez(tmp_path / "mask.npz", image=shifted(x1, 2), y=(x1 > 0.5).astype(np.float32))
    out, report = tmp_path / "mask.onnx", tmp_path / "mask.json"
    code = main(["refine", str(models["mask"]), str(out), "--data", str(tmp_path / "mask.npz"),
                 "--report", str(report), "--device", "cpu", "--quiet"])
    assert code == 0
    doc = json.loads(report.read_text())
    before, after = doc["heldout"]["before"], doc["heldout"]["after"]
    assert before["task"] == "binary" and before["per_class"] is None
    assert after["metrics"]["mean_iou"] > before["metrics"]["mean_iou"]
    assert doc["gate"]["metric"] == "heldout_mean_iou"
    _only_values_changed(models["mask"], out)


# ---------------------------------------------------------------- inputs and outputs


def _pairs(digits: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    x1, y = digits["x"][:, None], digits["y"]
    i, j = pairs(len(y), 2 * len(y), 1)
    return ({"left": shifted(x1[i], 2), "right": shifted(x1[j], 3)},
            (y[i] + y[j]).astype(np.int64))


def test_two_inputs_fed_by_name(models: dict[str, Path], digits: dict[str, np.ndarray],
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _pairs(digits)
    out = tmp_path / "pair.onnx"
    result = refine(models["pair"], out, (x, y), config=CPU)
    assert result.heldout_after.accuracy > result.heldout_before.accuracy
    _only_values_changed(models["pair"], out)
    # the same from a folder of <input>.npy files, and the missing input named
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "left.npy", x["left"])
    np.save(folder / "y.npy", y)
    code = main(["eval", str(models["pair"]), "--data", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0
    assert err.startswith("onnxfbp: error: ") and "'right'" in err
    np.save(folder / "right.npy", x["right"])
    assert main(["eval", str(models["pair"]), "--data", str(folder), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["n"] == len(y) and line["outputs"]["sum"]["task"] == "classification"
    # inspect lists both inputs
    assert main(["inspect", str(models["pair"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in info["inputs"]] == ["left", "right"]


def test_two_outputs_improve_both_heads(models: dict[str, Path], digits: dict[str, np.ndarray],
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    xr, angle = rotated(digits["x"], 1)
    data = tmp_path / "two.npz"
    np.savez(data, image=shifted(xr, 2), digit=digits["y"].astype(np.int64), angle=angle)
    out = tmp_path / "two.onnx"
    targets = ["--target", "digit=digit", "--target", "angle=angle"]
    assert main(["refine", str(models["two_out"]), str(out), "--data", str(data),
                 "--device", "cpu", "--quiet", *targets]) == 0
    capsys.readouterr()
    scores: list[dict[str, Any]] = []
    for model in (models["two_out"], out):
        assert main(["eval", str(model), "--data", str(data), "--json", *targets]) == 0
        scores.append(json.loads(capsys.readouterr().out)["outputs"])
    assert scores[1]["digit"]["accuracy"] > scores[0]["digit"]["accuracy"]
    assert scores[1]["angle"]["mae"] < scores[0]["angle"]["mae"]
    _only_values_changed(models["two_out"], out)
    # a target naming no output lists the outputs
    code = main(["eval", str(models["two_out"]), "--data", str(data), "--target", "speed=y"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "'speed'" in err
    assert "['digit', 'angle']" in err
    # a label key missing from the data names it
    code = main(["eval", str(models["two_out"]), "--data", str(data), "--target", "angle=yaw"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "'yaw'" in err


def test_classifier_eval_json_keeps_its_fields(work: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(work / "model.onnx"), "--data", str(work / "adapt.npz"),
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert {"accuracy", "n", "loss", "per_class", "outputs"} <= set(line)
    (name, entry), = line["outputs"].items()
    assert entry == {"task": "classification", "n": line["n"], "accuracy": line["accuracy"],
                     "loss": line["loss"]}
