"""Quantization recovery from a float teacher (``--teacher FLOAT.onnx``).

The teacher is the float model the QDQ model was quantized from. It gives:

- targets: its predictions on the adaptation data replace the labels (the data
  needs none), so the run fits the quantized model to the teacher's decisions;
- a better start: each quantized layer whose output tensor has the same name
  in the teacher (``quantize_static`` keeps the float graph's tensor names) and
  whose weight has the same shape is rounded again from the *teacher's* float
  weights with the layer's Gram (:func:`.rounding.gptq_round`), layers in
  forward order, each Gram taken with the layers before it already rounded.
  That start is kept only if it agrees with the teacher on more held-out
  samples (ties: lower cross-entropy) than the input model's nearest rounding.
  With ``requantize_scales`` (``--requantize-scales``) each such layer's scales
  are refitted first (:func:`.rounding.refit_scale_ratios`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import LabelledData, from_arrays
from ..errors import UnsupportedModelError
from ..events import Message, Progress
from ..fit.solve import NormalEquations, choose_ridge
from ..graph.plan import Layer
from ..schedules.state import ModelState
from .grid import layer_grid
from .qdq import QuantWeight
from .rounding import gptq_round, output_error, refit_scale_ratios

__all__ = ["Teacher", "open_teacher"]


def _sample_dims(shape: list[Any]) -> list[Any]:
    return [d if isinstance(d, int) else None for d in shape[1:]]


def open_teacher(path: str | os.PathLike[str], student: ModelState) -> Teacher:
    """Load the teacher; a one-line error unless its input and output match the
    quantized model's."""
    teacher = ModelState(path, student.config, layers=False)
    sp, tp = student.plan, teacher.plan
    if _sample_dims(tp.input_shape) != _sample_dims(sp.input_shape) \
            or tp.n_classes != sp.n_classes:
        raise UnsupportedModelError(
            f"--teacher {path}: its input {tp.input_shape} / {tp.n_classes} classes do not "
            f"match the model's {sp.input_shape} / {sp.n_classes} classes; give the float "
            "model this one was quantized from")
    return Teacher(teacher, str(path))


@dataclass
class Teacher:
    state: ModelState
    path: str
    summary: dict[str, Any] = field(default_factory=dict)
    input_eval: Any = None  # the quantized input model on the evaluation data
    start: dict[str, np.ndarray] = field(default_factory=dict)  # values after round_start

    def logits(self, data: LabelledData, idx: np.ndarray | None = None) -> np.ndarray:
        idx = np.arange(len(data)) if idx is None else idx
        forward = self.state.frozen_forward([self.state.plan.logits])
        parts = [forward(x)[self.state.plan.logits].reshape(len(x), -1)
                 for x, _ in data.batches(idx, self.state.config.run.batch_size)]
        return np.concatenate(parts).astype(np.float64)

    def relabel(self, data: LabelledData) -> LabelledData:
        """The adaptation data with the teacher's predictions as labels (held in memory)."""
        idx = np.arange(len(data))
        xs = [x for x, _ in data.batches(idx, self.state.config.run.batch_size)]
        labels = self.logits(data).argmax(axis=1)
        if data.labelled:
            self.summary["teacher_label_accuracy"] = float((labels == data.labels()).mean())
        out = from_arrays(np.concatenate(xs), labels, f"{data.source} (teacher labels)")
        return out

    def accuracy(self, data: LabelledData) -> float:
        return float((self.logits(data).argmax(axis=1) == data.labels()).mean())

    # ------------------------------------------------------------ rounding

    def _teacher_layer(self, layer: Layer, qw: QuantWeight) -> Layer | None:
        """The teacher's layer of the same op with the same node name, else the same
        output tensor, else whose weight initializer names the quantized one
        (``conv1.weight`` for ``conv1.weight_quantized``)."""
        same = [t for t in self.state.plan.layers if t.op == layer.op]
        for key in (lambda t: t.name == layer.name, lambda t: t.output == layer.output,
                    lambda t: qw.initializer.startswith(t.weight.initializer + "_")):
            found = [t for t in same if key(t)]
            if len(found) == 1:
                return found[0]
        return None

    def prepare(self, student: ModelState, data: LabelledData, held: LabelledData | None,
                progress: Progress) -> LabelledData:
        """Teacher labels for ``data`` and, for a quantized model, the rounding start
        (:meth:`round_start`) on the run's own split; the accuracies to report."""
        from ..refine import split  # noqa: PLC0415

        data.validate(student.plan.input_shape, None)
        if held is not None:
            held.validate(student.plan.input_shape, student.plan.n_classes)
            self.summary["teacher_eval_accuracy"] = self.accuracy(held)
            self.input_eval = student.evaluate(held)
            self.summary["input_eval_accuracy"] = self.input_eval.accuracy
        self.summary["targets"] = "teacher predictions"
        labelled = self.relabel(data)
        progress(Message(f"teacher {self.path}: its predictions on {len(data)} samples are "
                         "the targets"))
        if student.quant:
            rng, train, val = split(len(labelled), student.config)
            self.round_start(student, labelled, train, val, rng, progress)
        self.start = dict(student.values)
        return labelled

    def settle(self, student: ModelState, result: Any, progress: Progress) -> None:
        """After the run: if it ended below the rounding start (on the evaluation data
        when given, else on the held-out split), go back to the start; the report's
        ``eval.before`` is the input model's (the gate compares with it)."""
        before, after = result.heldout_before, result.heldout_after
        if result.eval_before is not None and result.eval_after is not None:
            before, after = result.eval_before, result.eval_after
        if after.accuracy < before.accuracy:
            student.values.clear()
            student.values.update(self.start)
            result.model = student.patched_model()
            result.heldout_after = result.heldout_before
            result.eval_after = result.eval_before
            self.summary["schedule"] = (f"reverted: it ended at {after.accuracy:.4f}, below the "
                                        f"rounding start's {before.accuracy:.4f}")
            progress(Message(f"teacher: the schedule's result {self.summary['schedule']}"))
        else:
            self.summary["schedule"] = "kept"
        if self.input_eval is not None:
            result.eval_before = self.input_eval

    def round_start(self, student: ModelState, data: LabelledData, train: np.ndarray,
                    val: np.ndarray, rng: np.random.Generator, progress: Progress) -> None:
        """Round the matching quantized layers again (module doc), two ways: toward
        the teacher's float weights, and toward the weights that reconstruct the
        teacher's layer outputs from the quantized model's inputs; keep the one
        (or the input's nearest rounding) with the best held-out agreement."""
        started = time.perf_counter()
        kept = dict(student.values)
        sample = train[: min(len(train), student.config.minibatch.precond_samples)]
        scores = {"nearest": student.scores(data, val)}
        results: dict[str, tuple[dict[str, np.ndarray], list[dict[str, Any]]]] = {}
        chosen_grids: dict[str, Any] = {}
        grids = student.quant.snapshot()
        refit = student.config.layers.requantize_scales
        for mode in ("weights", "features"):
            student.values.clear()
            student.values.update(kept)
            student.quant.restore(grids)
            rounded = []
            for layer in reversed(student.layers):  # forward order
                qw = student.quant.weights.get(layer.weight.initializer)
                tl = self._teacher_layer(layer, qw) if qw is not None else None
                if qw is None or tl is None:
                    continue
                done = self._round_layer(student, layer, tl, qw, data, sample,
                                         np.random.default_rng(rng.integers(2**31)), mode,
                                         refit)
                if done is not None:
                    rounded.append(done)
            if rounded:
                scores[mode] = student.scores(data, val)
                results[mode] = (dict(student.values), rounded)
                chosen_grids[mode] = student.quant.snapshot()
        best = max(scores, key=lambda k: (scores[k][1], -scores[k][0]))
        student.values.clear()
        student.values.update(results[best][0] if best in results else kept)
        student.quant.restore(chosen_grids.get(best, grids))
        n = max(len(val), 1)
        self.summary["rounding"] = {
            "method": "gptq", "kept": best, "requantize_scales": refit,
            "heldout_agreement": {k: v[1] / n for k, v in scores.items()},
            "layers": results.get(best, results.get("weights", (None, [])))[1],
            "seconds": time.perf_counter() - started,
        }
        agreement = ", ".join(f"{k} {v[1] / n:.4f}" for k, v in scores.items())
        progress(Message(f"teacher rounding (GPTQ): held-out agreement with the teacher "
                         f"{agreement}; kept {best}"))

    def _round_layer(self, student: ModelState, layer: Layer, tl: Layer, qw: QuantWeight,
                     data: LabelledData, sample: np.ndarray, rng: np.random.Generator,
                     mode: str, refit: bool = False) -> dict[str, Any] | None:
        """Round ``layer`` by GPTQ toward the teacher's weights (``mode`` ``weights``)
        or toward the ridge solution (toward them) that maps the quantized model's
        inputs to the teacher's outputs of the layer (``features``). With ``refit``
        (``--requantize-scales``) the weight's scale is first refitted per scale
        channel (:func:`.rounding.refit_scale_ratios`; per tensor: its one scale)."""
        tvals = self.state.plan.static_values
        w_t = tvals.get(tl.weight_tensor)
        if w_t is None or tuple(w_t.shape) != qw.shape:
            return None
        block = student.block(layer)
        bias_q = student.quant.weights.get(layer.bias.initializer) if layer.bias else None
        b_t = tvals.get(tl.bias_tensor) if tl.bias_tensor else None
        grid = layer_grid(layer, block, qw, bias_q, None if b_t is None else tuple(b_t.shape))
        if grid is None:
            return None
        layout, scale, zero, lo, hi = grid.layout, grid.scale, grid.zero, grid.lo, grid.hi
        target = layout(np.asarray(w_t, np.float64), b_t)
        groups, d, k = target.shape
        fit, check = NormalEquations(groups, d, k), NormalEquations(groups, d, k)
        positions = student.config.minibatch.gram_positions
        for i, (x, _) in enumerate(data.batches(sample, 50)):
            acts = student.forward(x, [layer.input])
            t_out = self.state.forward(x, [tl.output])[tl.output]
            xr, tr = block.rows(acts[layer.input], t_out, rng, positions)
            (check if i % 5 == 4 else fit).add(xr, tr)  # every fifth batch chooses lam
        gram = np.asarray(fit.gram + check.gram)
        current = block.weights()
        if mode == "features":
            choice = choose_ridge(fit, check if check.rows else None, target,
                                  (1e-4, 1e-3, 1e-2, 1e-1, 1.0))
            if choice.why is not None:
                return None
            target = np.asarray(choice.weights)
        info: dict[str, Any] = {}
        if refit:
            channel = self._channels(qw, layout, b_t)
            if channel is None:
                info["scale"] = "kept: shared, per block, or channels across columns"
            else:
                m = student.quant.reduced_range(layer.weight.initializer)
                if m is not None:  # 7-bit weights stay 7-bit
                    rows = slice(0, -1) if block.has_bias_row else slice(None)
                    lo[rows], hi[rows] = np.maximum(lo[rows], -m), np.minimum(hi[rows], m)
                ratios, _ = refit_scale_ratios(target, gram, scale, zero, lo, hi, channel)
                qw = student.quant.set_scale(layer.weight.initializer,
                                             np.asarray(qw.scale, np.float64).reshape(-1)
                                             * ratios if qw.axis is not None
                                             else qw.scale * ratios[0])
                scale = np.where(channel >= 0, scale * ratios[np.maximum(channel, 0)], scale)
                info["scale_ratio"] = {"min": float(ratios.min()), "max": float(ratios.max()),
                                       "mean": float(ratios.mean())}
        out = np.stack([gptq_round(target[g], gram[g], scale[g], zero[g], lo, hi)
                        for g in range(target.shape[0])])
        before = sum(output_error(target[g], current[g], gram[g]) for g in range(len(gram)))
        after = sum(output_error(target[g], out[g], gram[g]) for g in range(len(gram)))
        student.set_weights(layer, block, out)
        return {"name": layer.name, "bits": qw.bits, "granularity": qw.granularity,
                "output_error_nearest": before, "output_error_gptq": after, **info}

    @staticmethod
    def _channels(qw: QuantWeight, layout: Any, b_t: np.ndarray | None) -> np.ndarray | None:
        """Each solver entry's scale channel (-1: the bias row), or None where the scale
        cannot be refitted alone (shared, per block, or a column across channels)."""
        if not qw.scale_initializer or qw.block_size:
            return None
        ids = np.zeros(qw.shape, np.float64)
        if qw.axis is not None:
            ids = np.broadcast_to(qw._expand(np.arange(qw.scale.size, dtype=np.float64)),
                                  qw.shape)
        bias = None if b_t is None else np.full(np.shape(b_t), -1.0)
        channel = np.rint(np.asarray(layout(np.array(ids), bias))).astype(np.int64)
        weight = channel >= 0
        top = np.where(weight, channel, -1).max(axis=1, keepdims=True)
        low = np.where(weight, channel, 2**40).min(axis=1, keepdims=True)
        if (weight & (channel != top)).any() or (weight.any(axis=1, keepdims=True)
                                                 & (low != top)).any():
            return None
        return channel
