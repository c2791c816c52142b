"""Quantized (QDQ) models: refined behind their DequantizeLinear nodes and
written back as integers into the same initializers (docs/quant.md).

The QDQ models are made here from the shared PyTorch CNN by onnxruntime's
``quantize_static`` (QDQ format, uint8 activations; int8 per-channel and int4
per-tensor weights), calibrated on 100 clean MNIST images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper, version_converter

from onnxfbp.errors import UnsupportedModelError
from onnxfbp.quant.qdq import QuantWeight, float_view
from onnxfbp.quant.rounding import gptq_round, output_error, refit_scale_ratios
from onnxfbp.refine import refine

CNN = "mnist_pytorch25_legacy_cnn.onnx"


def _prep(x01: np.ndarray) -> np.ndarray:
    return ((x01 - 0.5) / 0.5)[:, None].astype(np.float32)


@pytest.fixture(scope="module")
def qdq(shared_models: Path, mnist: tuple[np.ndarray, np.ndarray],
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The float CNN at opset 13 and its int8 / int4 QDQ versions."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    tmp = tmp_path_factory.mktemp("qdq")
    float13 = tmp / "float13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(shared_models / CNN), 13), float13)
    calib = _prep(mnist[0][9000:9100])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 50]} for i in range(0, 100, 50)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = {"float": float13}
    for tag, wtype, per_channel in (("int8", QuantType.QInt8, True),
                                    ("int4", QuantType.QInt4, False)):
        out[tag] = tmp / f"{tag}.onnx"
        quantize_static(str(float13), str(out[tag]), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, weight_type=wtype,
                        activation_type=QuantType.QUInt8)
    return out


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z = session.run(None, {"input": x})[0]
    return float((z.argmax(axis=1) == y).mean())


def _same_but_integers(a: onnx.ModelProto, b: onnx.ModelProto) -> int:
    """Assert ``b`` is ``a`` with only integer weight values changed; the count of
    changed integer initializers."""
    assert list(a.graph.node) == list(b.graph.node)
    assert list(a.opset_import) == list(b.opset_import)
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    changed = 0
    for ta, tb in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert (ta.data_type, list(ta.dims)) == (tb.data_type, list(tb.dims)), ta.name
        va, vb = numpy_helper.to_array(ta), numpy_helper.to_array(tb)
        # scales, zero points and float constants: unchanged
        if ta.data_type == TensorProto.FLOAT or ta.name.endswith("zero_point"):
            assert np.array_equal(va, vb), ta.name
        elif not np.array_equal(va, vb):
            changed += 1
    return changed


def test_quant_weight_grid_per_tensor_axis_block() -> None:
    s = np.array([0.5, 0.25], np.float32)
    per_axis = QuantWeight("q", "w", "dq", TensorProto.INT8, (2, 3), s,
                           np.array([0, 1]), 0)
    w = np.array([[1.0, -0.74, 200.0], [0.25, 0.0, -0.5]], np.float32)
    q = per_axis.quantize(w)
    assert q.tolist() == [[2, -1, 127], [2, 1, -1]]
    assert np.allclose(per_axis.dequantize(q), [[1.0, -0.5, 63.5], [0.25, 0.0, -0.5]])
    int4 = QuantWeight("q", "w", "dq", TensorProto.INT4, (4,), np.float32(0.1), np.int64(0), None)
    assert int4.quantize(np.array([-5.0, 0.04, 0.26, 5.0])).tolist() == [-8, 0, 3, 7]
    block = QuantWeight("q", "w", "dq", TensorProto.UINT4, (1, 5), np.array([[1.0, 2.0, 4.0]]),
                        np.array([[8, 8, 8]]), 1, 2)
    assert block.dequantize(np.full((1, 5), 9)).tolist() == [[1.0, 1.0, 2.0, 2.0, 4.0]]
    assert block.granularity == "block 2 (axis 1)" and int4.granularity == "per-tensor"


def test_gptq_round_beats_nearest_on_correlated_inputs() -> None:
    g = np.random.default_rng(0)
    x = g.standard_normal((400, 12)) @ g.standard_normal((12, 12))  # correlated columns
    w = g.standard_normal((12, 5))
    gram = x.T @ x
    scale = np.full(w.shape, 0.3)
    zero = np.zeros(w.shape)
    lo, hi = np.full(12, -8.0), np.full(12, 7.0)
    q = gptq_round(w, gram, scale, zero, lo, hi)
    nearest = np.clip(np.rint(w / 0.3), -8, 7) * 0.3
    assert np.allclose(np.rint(q / 0.3) * 0.3, q)  # on the grid
    assert output_error(w, q, gram) < 0.7 * output_error(w, nearest, gram)


def test_refit_scale_ratios_clip_a_long_tail_per_channel() -> None:
    g = np.random.default_rng(0)
    x = g.standard_normal((500, 64))
    w = np.stack([g.standard_t(2, size=64), g.uniform(-1, 1, 64)], axis=1)[None]
    gram = (x.T @ x)[None]
    # max-abs scales, as quantize_static's symmetric int4: the heavy-tailed channel's
    # grid is stretched by its largest weights, and clipping them lowers its error
    scale = np.broadcast_to(np.abs(w).max(axis=1, keepdims=True) / 7.5, w.shape).copy()
    zero, lo, hi = np.zeros(w.shape), np.full(64, -8.0), np.full(64, 7.0)
    channel = np.broadcast_to(np.arange(2), w.shape).copy()
    ratios, at_one = refit_scale_ratios(w, gram, scale, zero, lo, hi, channel)
    assert ratios.shape == (2,) and ratios[0] < 1.0
    for j in range(2):  # each channel chosen on its own: the same ratio alone
        alone, _ = refit_scale_ratios(w[:, :, j:j + 1], gram, scale[:, :, j:j + 1],
                                      zero[:, :, j:j + 1], lo, hi, np.zeros((1, 64, 1), int))
        assert alone[0] == ratios[j]
    refit = scale * ratios[channel]
    q = gptq_round(w[0], gram[0], refit[0], zero[0], lo, hi)
    after = [output_error(w[0][:, j], q[:, j], gram[0]) for j in range(2)]
    assert after[0] < 0.8 * at_one[0] and after[1] <= at_one[1] + 1e-9


def test_set_scale_writes_the_scale_with_the_integers_graph_unchanged(
        qdq: dict[str, Path]) -> None:
    model = onnx.load(qdq["int4"])
    view, qmap = float_view(model)
    tensor, qw = next((t, qw) for t, qw in qmap.weights.items() if qw.bits == 4)
    assert qw.scale_initializer and qw.axis is None
    assert qmap.reduced_range(tensor) is None  # int4 from max |w|: its full range
    new = qmap.set_scale(tensor, qw.scale * 0.8)
    value = new.project(numpy_helper.to_array(
        next(t for t in view.graph.initializer if t.name == tensor)))
    out = qmap.patched({tensor: value})
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    old = {t.name: t for t in model.graph.initializer}
    assert inits[qw.scale_initializer] == pytest.approx(float(qw.scale) * 0.8)
    assert old[qw.scale_initializer].data_type == next(
        t for t in out.graph.initializer if t.name == qw.scale_initializer).data_type
    assert [n.SerializeToString() for n in out.graph.node] == \
        [n.SerializeToString() for n in model.graph.node]
    _, reread = float_view(out)
    assert np.array_equal(reread.weights[tensor].dequantize(inits[qw.initializer]), value)
    with pytest.raises(ValueError, match="not finite and positive"):
        qmap.set_scale(tensor, -qw.scale)


def test_float_view_dequantizes_every_weight(qdq: dict[str, Path]) -> None:
    model = onnx.load(qdq["int4"])
    view, qmap = float_view(model)
    assert {qw.bits for qw in qmap.weights.values()} == {4, 32}  # int4 weights, int32 biases
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in
                   {qw.initializer for qw in qmap.weights.values()} for n in view.graph.node)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    # the QDQ graph's own semantics (onnxruntime's graph optimizations off: its fused
    # integer kernels requantize differently, by a few logit steps)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = [ort.InferenceSession(m.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for m in (model, view)]
    assert np.array_equal(run[0], run[1])


def test_int8_label_refinement_keeps_the_model_quantized(
        qdq: dict[str, Path], mnist_rot: dict[str, np.ndarray], tmp_path: Path) -> None:
    x, y = _prep(mnist_rot["x_adapt"][:400]), mnist_rot["y_adapt"][:400]
    xe, ye = _prep(mnist_rot["x_eval"][:400]), mnist_rot["y_eval"][:400]
    out = tmp_path / "int8_rot.onnx"
    result = refine(qdq["int8"], out, x, y, eval_data=(xe, ye))
    assert _same_but_integers(onnx.load(qdq["int8"]), onnx.load(out)) >= 1
    onnx.checker.check_model(str(out))
    before, after = _accuracy(qdq["int8"], xe, ye), _accuracy(out, xe, ye)
    assert after > before + 0.02, (before, after)
    assert result.eval_after is not None and abs(result.eval_after.accuracy - after) < 0.01
    final = result.data["final_rounding"]  # GPTQ from the float steps, kept if better
    assert final["kept"] in ("gptq", "nearest") and final["layers"], final
    for layer in final["layers"]:
        assert layer["output_error_gptq"] <= layer["output_error_nearest"], layer
    accuracy = final["heldout_accuracy"]
    assert accuracy[final["kept"]] == max(accuracy.values())


@pytest.mark.slow
def test_teacher_recovers_int4_on_unlabelled_data(
        qdq: dict[str, Path], mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x = _prep(mnist[0][:300])  # no labels
    xe, ye = _prep(mnist[0][5000:5500]), mnist[1][5000:5500]
    out = tmp_path / "int4_teacher.onnx"
    result = refine(qdq["int4"], out, (x, None), eval_data=(xe, ye), teacher=qdq["float"],
                    config=None)
    assert _same_but_integers(onnx.load(qdq["int4"]), onnx.load(out)) >= 1
    rounding = result.data["teacher"]["rounding"]
    assert len(rounding["layers"]) == 4
    for layer in rounding["layers"]:
        assert layer["output_error_gptq"] < layer["output_error_nearest"], layer
    agreement = rounding["heldout_agreement"]
    assert set(agreement) == {"nearest", "weights", "features"}
    assert agreement[rounding["kept"]] == max(agreement.values())
    before, after = _accuracy(qdq["int4"], xe, ye), _accuracy(out, xe, ye)
    teacher = _accuracy(qdq["float"], xe, ye)
    assert after > before, (before, after, teacher)
    assert result.data["teacher"]["teacher_eval_accuracy"] == pytest.approx(teacher, abs=1e-9)


@pytest.mark.slow
def test_teacher_requantize_scales_refits_per_tensor_scales(
        qdq: dict[str, Path], mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    from onnxfbp.config import RefineConfig  # noqa: PLC0415

    x = _prep(mnist[0][:300])
    xe, ye = _prep(mnist[0][5000:5500]), mnist[1][5000:5500]
    out = tmp_path / "int4_refit.onnx"
    result = refine(qdq["int4"], out, (x, None), eval_data=(xe, ye), teacher=qdq["float"],
                    config=RefineConfig.of(requantize_scales=True))
    rounding = result.data["teacher"]["rounding"]
    assert rounding["requantize_scales"] is True
    a, b = onnx.load(qdq["int4"]), onnx.load(out)
    assert [n.SerializeToString() for n in a.graph.node] == \
        [n.SerializeToString() for n in b.graph.node]
    types = {t.name: (t.data_type, tuple(t.dims)) for t in a.graph.initializer}
    assert types == {t.name: (t.data_type, tuple(t.dims)) for t in b.graph.initializer}
    if rounding["kept"] != "nearest":  # refitted scales were written with the integers
        assert all("scale_ratio" in layer for layer in rounding["layers"] if layer["bits"] == 4)
        changed = {t.name for t, u in zip(a.graph.initializer, b.graph.initializer, strict=True)
                   if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))}
        assert any(name.endswith("_scale") for name in changed), changed
    assert _accuracy(out, xe, ye) >= _accuracy(qdq["int4"], xe, ye)


def test_teacher_with_other_shapes_is_a_one_line_error(
        qdq: dict[str, Path], shared_models: Path, mnist: tuple[np.ndarray, np.ndarray]) -> None:
    x = _prep(mnist[0][:20])
    with pytest.raises(UnsupportedModelError, match="--teacher .*do not match"):
        refine(qdq["int8"], None, (x, None),
               teacher=shared_models / "cifar10_pytorch18_vnncomp_resnet2b.onnx")


def test_cli_bad_teacher_is_one_line_with_exit_code(
        qdq: dict[str, Path], shared_models: Path, mnist: tuple[np.ndarray, np.ndarray],
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxfbp import cli  # noqa: PLC0415
    from onnxfbp.errors import EXIT_USER_ERROR  # noqa: PLC0415

    np.savez(tmp_path / "calib.npz", x=_prep(mnist[0][:20]))  # no labels
    code = cli.main(["refine", str(qdq["int8"]), str(tmp_path / "out.onnx"),
                     "--data", str(tmp_path / "calib.npz"), "--quiet", "--teacher",
                     str(shared_models / "cifar10_pytorch18_vnncomp_resnet2b.onnx")])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert err.startswith("onnxfbp: error: --teacher ") and err.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


def test_cli_requantize_scales_reaches_the_config() -> None:
    from onnxfbp.cli.commands import _config, build_parser  # noqa: PLC0415

    base = ["refine", "q.onnx", "out.onnx", "--data", "calib.npz", "--teacher", "f.onnx"]
    on = _config(build_parser().parse_args([*base, "--requantize-scales"]))
    off = _config(build_parser().parse_args(base))
    assert on.layers.requantize_scales is True and off.layers.requantize_scales is False
