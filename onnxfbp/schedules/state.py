"""The model being refined: plan, onnxruntime runner, current weights.

:class:`ModelState` is what every schedule reads and changes: the current
initializer values, the node views they give, forward passes and held-out
scores with them, and :meth:`ModelState.set_weights` to write a layer's solved
block back. :class:`RunContext` is one run's data split, random generator,
best held-out score, reports and progress callback; :meth:`RunContext.accept`
is the one test every update passes (a better held-out score and, with retain
data, a retain held-out score within ``max_retain_drop`` of the input model's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..config import RefineConfig
from ..data import LabelledData
from ..events import LayerVisited, Progress
from ..fit.layers import LayerBlock
from ..fit.targets import cross_entropy
from ..fit.tasks import Head, Metrics, MultiTask, Task, detect_task, retain_drop
from ..graph.plan import Layer, Plan, load_model, plan_model
from ..graph.weights import lift_constants
from ..output.results import EvalResult, LayerReport, eval_result
from ..quant.qdq import float_view
from ..rules import xp_of
from ..run.backend import array_module, cupy_or_none
from ..run.device import run_to_device
from ..run.forward import ForwardRunner, choose_providers

__all__ = ["Anchor", "Clock", "ModelState", "Retain", "RunContext", "Score", "nodes_after",
           "select_layers"]

Views = dict[str, Any]


@dataclass
class Clock:
    """Seconds spent in forward passes (with targets) and in solves."""

    forward: float = 0.0
    solve: float = 0.0


@dataclass
class Score:
    """Best held-out score so far: summed cross-entropy and correct count."""

    loss: float
    correct: int

    def better(self, loss: float, correct: int, commit: bool = True) -> bool:
        """More correct, or as many with lower loss; records it when ``commit``."""
        ok = correct > self.correct or (correct == self.correct and loss < self.loss)
        if ok and commit:
            self.loss, self.correct = loss, correct
        return ok


@dataclass
class Retain:
    """The held-out part of the retain (original-domain) data inside the run's
    data, indices ``idx``. A classifier's: the credit ``Q`` (n, classes) of each
    prediction, one-hot labels, or for unlabelled data the input model's softmax,
    so that ``score = sum_i Q[i, pred_i]`` is the correct count, or the accuracy
    the input model expects of the predictions; an update must keep
    ``score >= before - max_drop * n`` (``before``: the input model's score).
    Another task's: ``baseline``, the input model's result on ``idx``; an update
    must keep :func:`onnxfbp.fit.tasks.retain_drop` of it at most ``max_drop``."""

    idx: np.ndarray
    credit: np.ndarray
    before: float
    max_drop: float
    baseline: EvalResult | None = None  # tasks other than classification
    scale: float = 1.0  # regression: the MAE rise that counts as a drop of 1

    def score(self, preds: np.ndarray) -> float:
        """``sum_i Q[i, pred_i]`` of predictions ``preds`` on ``idx``."""
        preds = np.asarray(preds, dtype=np.int64)
        return float(self.credit[np.arange(len(preds)), preds].sum())

    def kept(self, preds: np.ndarray) -> bool:
        return self.score(preds) >= self.before - self.max_drop * len(self.idx) - 1e-9

    def holds(self, state: ModelState, data: LabelledData,
              preds: np.ndarray | None = None) -> bool:
        """Whether the weights in ``state`` keep the bound on ``data[idx]``
        (``preds``: a classifier's predictions there, when already at hand)."""
        if self.baseline is not None:
            drop = retain_drop(self.baseline, state.evaluate(data, self.idx), self.scale)
            return drop <= self.max_drop + 1e-12
        if preds is None:
            _, _, preds = state.scores(data, self.idx)
        return self.kept(preds)


@dataclass
class Anchor:
    """The pull of the retain training samples toward the input model's function:
    a classifier's logits ``z0`` (n, classes) on the retain samples, which start
    at index ``offset`` of the run's data. While ``on``, a retain sample's logits
    residual gets ``weight * (z0 - z)`` added, so the step descends
    ``CE(y, z) + weight / 2 ||z - z0||^2`` on it (logit replay, as in DER++,
    Buzzega et al. 2020). Its cross-entropy alone pulls back only once a
    prediction is about to flip; this pull grows with the drift of any logit.
    ``refine.train_on_split`` turns it on for a second run of the schedule."""

    offset: int
    logits: np.ndarray
    weight: float
    on: bool = False
    outcome: dict[str, Any] | None = None  # the second run's (retain.retry_anchored)

    def pull(self, idx: np.ndarray, z: Any, target: Any, step: float) -> Any:
        """``target`` (shaped as ``z``, the batch ``idx``'s logits) with
        ``step * weight * (z0 - z)`` added on the retain samples' rows (while on)."""
        if not self.on or self.weight == 0:
            return target
        rows = np.flatnonzero(idx >= self.offset)
        if not len(rows):
            return target
        xp = xp_of(z)
        sel = xp.asarray(rows)
        z0 = xp.asarray(self.logits[idx[rows] - self.offset]).reshape(z[sel].shape)
        out = target.copy()
        out[sel] = target[sel] + (step * self.weight) * (z0.astype(z.dtype) - z[sel])
        return out


@dataclass
class RunContext:
    """One run's split of the labelled data and what it collects."""

    data: LabelledData
    train_idx: np.ndarray
    val_idx: np.ndarray
    rng: np.random.Generator
    score: Score
    progress: Progress
    reports: list[LayerReport] = field(default_factory=list)
    retain: Retain | None = None  # with --retain-data: the constraint every update keeps
    anchor: Anchor | None = None  # with labelled retain data (classifier): its logit pull
    # with retain data: the minibatch schedule's best held-out weights regardless of
    # its bound, and their score
    unbound: dict[str, np.ndarray] | None = None
    unbound_score: Score | None = None
    blend: dict[str, Any] | None = None  # what the blend back kept (schedules.blend)

    def accept(self, state: ModelState, loss: float, correct: int, commit: bool = True,
               retain_preds: np.ndarray | None = None) -> bool:
        """Whether the weights in ``state`` (held-out ``loss`` and ``correct`` on
        ``val_idx``) beat the best score so far and keep the retain constraint
        (:class:`Retain`; ``retain_preds``: the predictions on its samples, when
        already at hand, else computed here); records the score when ``commit``."""
        if not self.score.better(loss, correct, commit=False):
            return False
        if self.retain is not None and not self.retain.holds(state, self.data, retain_preds):
            return False
        if commit:
            self.score.better(loss, correct)
        return True

    def record(self, report: LayerReport) -> None:
        """Keep ``report`` and tell the progress callback."""
        self.reports.append(report)
        self.announce(report)

    def announce(self, report: LayerReport) -> None:
        self.progress(LayerVisited(report))


def nodes_after(
    plan: Plan, tensor: str, through_convs: bool, inverses: bool = False
) -> list[int] | None:
    """Indices (into plan.nodes, forward order) of the path nodes through which a
    target reaches ``tensor`` from the logits; ``None`` if none does. Without
    ``through_convs`` a target never passes a Conv (routes around it, residual
    shortcuts, count). With ``inverses`` (the sweeps: targets through inverse
    rules) it never passes a node without an inverse (``PlanNode.inverse``)."""
    reach = {tensor}
    out = []
    for i, pn in enumerate(plan.nodes):
        if (pn.op == "Conv" and not through_convs) or (inverses and pn.inverse is not None):
            continue
        if any(pn.inputs[j] in reach for j in pn.data_inputs):
            out.append(i)
            reach.update(pn.outputs)
    if not any(logits in reach for logits in plan.head_logits):
        return None
    return out


def through_convs(config: RefineConfig) -> bool:
    """Targets pass Conv nodes: the minibatch schedule (Conv adjoints are cheap) or
    ``deep`` (Conv inverses in the sweeps)."""
    return config.layers.deep or config.schedule == "minibatch"


def select_layers(plan: Plan, config: RefineConfig) -> tuple[list[Layer], dict[str, str]]:
    """The layers a run refines, from the output back, and why the others are not."""
    skipped: dict[str, str] = {}
    layers: list[Layer] = []
    convs = through_convs(config)
    sweeps = config.schedule != "minibatch"
    limit = config.layers.max_layers
    for layer in reversed(plan.refinable):
        if nodes_after(plan, layer.output, convs, sweeps) is None:
            skipped[layer.name] = _unreachable(plan, layer, convs)
        elif limit is not None and len(layers) >= limit:
            skipped[layer.name] = f"beyond --max-layers {limit}"
        else:
            layers.append(layer)
    return whole_groups(layers, skipped, config.schedule == "minibatch"), skipped


def whole_groups(layers: list[Layer], skipped: dict[str, str], minibatch: bool) -> list[Layer]:
    """``layers`` less those whose stored weight is shared (:attr:`Layer.shared`)
    with a layer not in ``layers``, or with any layer outside the minibatch
    schedule (the only one that stacks the rows of all a weight's readers);
    ``skipped`` says why for each."""
    kept = list(layers)
    while True:
        names = {layer.name for layer in kept}
        out = []
        for layer in kept:
            where = f"its weight {layer.weight.initializer!r} is shared with {list(layer.shared)}"
            if layer.shared and not minibatch:
                skipped[layer.name] = (f"{where}; only the minibatch schedule refines a shared "
                                       "weight (with the rows of all its readers)")
            elif missing := [n for n in layer.shared if n not in names]:
                skipped[layer.name] = f"{where}, and this run does not refine {missing}"
            else:
                out.append(layer)
        if len(out) == len(kept):
            return out
        kept = out


def _unreachable(plan: Plan, layer: Layer, convs: bool) -> str:
    """Why a sweep schedule's targets do not reach ``layer``."""
    if nodes_after(plan, layer.output, convs) is None:
        return "its target would pass a Conv inverse (enable: --deep)"
    blocking = sorted({f"{pn.op} {pn.name!r} ({pn.inverse})" for pn in plan.nodes
                       if pn.inverse is not None})
    return ("the sweep schedules carry targets through inverses and its target would pass "
            f"a node without one: {', '.join(blocking[:3])}; the default schedule "
            "(minibatch) refines it")


class ModelState:
    """A loaded model with its plan, runner and current weights.

    ``layers`` are the layers the run refines (from the output back);
    ``downstream[name]`` the path nodes that carry targets back to each."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        config: RefineConfig,
        layers: bool = True,
    ) -> None:
        self.config = config
        self.model_path = Path(model_path)
        self.timings: dict[str, float] = {}
        self.clock = Clock()
        start = time.perf_counter()
        # a QDQ model is refined as its float view; weights are kept on its grid
        self.model, self.quant = float_view(load_model(self.model_path))
        pairs = [t.rpartition("=") for t in config.task.targets]
        self.plan: Plan = plan_model(self.model, config.layers.output_name,
                                     tuple(p[0] for p in pairs))
        # label key per trained output (--target OUTPUT=KEY); the first output: y by default
        self.label_keys = {p[0]: p[2] for p in pairs} or {self.plan.output_name: "y"}
        # what the target output learns (classification until :meth:`detect_task`)
        self.task = Task("classification", output_kind=self.plan.output_kind,
                         n_classes=self.plan.n_classes)
        self.timings["plan"] = time.perf_counter() - start
        self.providers = choose_providers(config.run.device)
        device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if device == "cuda" and config.run.device == "auto":
            self.xp: Any = cupy_or_none() or np  # CUDA forward, NumPy solves without CuPy
        else:
            self.xp = array_module(device) if device == "cuda" else np
        self.device = device
        self.layers, self.skipped = select_layers(self.plan, config) if layers else ([], {})
        self.runner = ForwardRunner(
            lift_constants(self.model, self._weight_inputs()), self.plan.input_name,
            self._weight_inputs(), self._extra_outputs(),
            self.providers, config.run.batch_size, config.run.threads,
        )
        self.values: dict[str, np.ndarray] = dict(self.runner.initial_weights)
        self.original = {k: v.copy() for k, v in self.values.items()}
        convs = through_convs(config)
        sweeps = config.schedule != "minibatch"
        self.downstream = {
            layer.name: nodes_after(self.plan, layer.output, convs, sweeps) or []
            for layer in self.layers
        }
        # how the minibatch schedule carried residuals back, and its kept branch
        self.reverse_pass: str | None = None
        self.kept_branch: str | None = None

    def _weight_inputs(self) -> list[str]:
        names = set()
        for layer in self.layers:
            names.add(layer.weight.initializer)
            if layer.bias is not None:
                names.add(layer.bias.initializer)
        return sorted(names)

    def _extra_outputs(self) -> list[str]:
        extra = set(self.plan.head_logits)
        for pn in self.plan.nodes:
            extra.update(pn.inputs[i] for i in pn.data_inputs)
            extra.update(pn.outputs[:1])
        for layer in self.layers:
            extra.add(layer.input)
        extra.difference_update(self.plan.input_names)
        return sorted(extra)

    # ------------------------------------------------------------ weights

    def tensor_values(self) -> dict[str, np.ndarray]:
        """Current values of weight tensors as the graph sees them (after chains)."""
        out = dict(self.values)
        for layer in self.layers:
            out[layer.weight_tensor] = layer.weight.apply(self.values[layer.weight.initializer])
            if layer.bias is not None and layer.bias_tensor is not None:
                out[layer.bias_tensor] = layer.bias.apply(self.values[layer.bias.initializer])
        return out

    def views(self) -> Views:
        """Node views with the current weights."""
        return self.plan.node_views(self.tensor_values())

    def block(self, layer: Layer, views: Views | None = None) -> LayerBlock:
        """``layer``'s weight block with the current weights (``views``: those of
        :meth:`views`, when already at hand)."""
        values = self.tensor_values()
        view = (views if views is not None else self.plan.node_views(values))[layer.name]
        bias_value = (
            values[layer.bias_tensor] if layer.bias is not None and layer.bias_tensor else None
        )
        fixed = None
        if bias_value is None:
            if (
                layer.kind == "dense"
                and layer.op == "Gemm"
                and 2 in view.static
                and view.static[2].size
            ):
                c = np.asarray(view.static[2], dtype=np.float64) * float(view.attr("beta", 1.0))
                fixed = np.broadcast_to(
                    c.reshape(-1), (view.static[1].shape[0 if view.attr("transB", 0) else 1],)
                )
            elif layer.kind == "conv" and 2 in view.static and view.static[2].size:
                fixed = np.asarray(view.static[2], dtype=np.float64)
        return LayerBlock(layer, view, bias_value, fixed)

    def set_weights(self, layer: Layer, block: LayerBlock, new_w: np.ndarray) -> None:
        """Write the solved block ``new_w`` back into ``layer``'s initializers."""
        weight_value, bias_value = block.split(new_w)
        init = layer.weight.initializer
        self.values[init] = self.quant.project(
            init, layer.weight.write_back(np.asarray(weight_value), self.values[init]))
        if bias_value is not None and layer.bias is not None:
            binit = layer.bias.initializer
            self.values[binit] = self.quant.project(
                binit, layer.bias.write_back(np.asarray(bias_value), self.values[binit]))

    def patched_model(self) -> onnx.ModelProto:
        """The input model with refined initializer values; nothing else changed."""
        from ..output.patch import with_initializers  # noqa: PLC0415

        changed = {k: v for k, v in self.values.items() if not np.array_equal(v, self.original[k])}
        if self.quant:  # integers into the input's own initializers
            return self.quant.patched(changed)
        return with_initializers(self.model, changed)

    # ------------------------------------------------------------ forward

    def forward(self, x: np.ndarray, outputs: list[str], on_device: bool = False) -> dict[str, Any]:
        """Named activations for the batch ``x`` (the input itself included); with
        ``on_device`` they are arrays of the solver's array module (CuPy on GPU)."""
        names = [o for o in outputs if o not in self.plan.input_names]
        if on_device and self.xp is not np:
            acts = run_to_device(self.runner, x, names, self.values, self.xp)
            acts.update(_input_acts(self.plan.input_name, x, self.xp))
            return acts
        acts = self.runner.run(x, names, self.values)
        acts.update(_input_acts(self.plan.input_name, x, np))
        return acts

    def frozen_forward(self, outputs: list[str]) -> Callable[[np.ndarray], dict[str, Any]]:
        """Like :meth:`forward` (NumPy arrays), for many batches with the current
        weights (see :meth:`ForwardRunner.frozen`)."""
        names = [o for o in outputs if o not in self.plan.input_names]
        run = self.runner.frozen(self.values, names) if names else None

        def forward(x: np.ndarray) -> dict[str, Any]:
            acts = run(x) if run is not None else {}
            acts.update(_input_acts(self.plan.input_name, x, np))
            return acts

        return forward

    def detect_task(self, data: LabelledData, override: str | None = None,
                    loss: str = "mse") -> Task:
        """Set and return the task of ``data``'s labels for the target output
        (:func:`onnxfbp.fit.tasks.detect_task`), from a forward pass of two samples."""
        if not len(data):
            return self.task  # validate names the problem
        if len(self.plan.heads) > 1:
            return self._detect_heads(data, override, loss)
        first = data.labels(np.zeros(1, np.int64))
        if override in (None, "classification") and first.ndim == 1:
            return self.task  # one label per sample: today's path (validate checks its dtype)
        idx = np.arange(min(2, len(data)))
        x, y = data.take(idx)
        out = self.frozen_forward([self.plan.output_name])(x)[self.plan.output_name]
        n_classes = int(out.shape[1]) if out.ndim >= 2 else None
        task = detect_task(y, tuple(out.shape[1:]), self.plan.output_kind, override, loss,
                           self.plan.output_name, n=len(data))
        self.task = Task(task.kind, task.loss, task.output_kind,
                         n_classes if task.kind in ("classification", "dense") else None,
                         task.positions)
        return self.task

    def _detect_heads(self, data: LabelledData, override: str | None, loss: str) -> Task:
        """Several trained outputs: each one's task from its labels (``override``
        applies to all), as one :class:`MultiTask`."""
        weights = {t.rpartition("=")[0]: float(t.rpartition("=")[2])
                   for t in self.config.task.target_weights}
        x, y = data.take(np.arange(min(2, len(data))))
        outs = self.frozen_forward([h[0] for h in self.plan.heads])(x)
        heads = []
        for output, logits, kind, _ in self.plan.heads:
            key = self.label_keys.get(output, "y")
            labels = np.asarray(y[key]) if isinstance(y, dict) else np.asarray(y)
            out = outs[output]
            if labels.ndim == 1 and labels.dtype.kind in "iu" and override is None:
                task = Task("classification", output_kind=kind, n_classes=int(out.shape[-1]))
            else:
                task = detect_task(labels, tuple(out.shape[1:]), kind, override, loss, output, key,
                                   len(data))
                task = Task(task.kind, task.loss, kind, int(out.shape[1])
                            if task.kind in ("classification", "dense") else None,
                            task.positions)
            heads.append(Head(output, logits, key, task, weights.get(output, 1.0)))
        self.task = MultiTask(tuple(heads))  # type: ignore[assignment]
        return self.task

    def label_target(self, acts: dict[str, Any], y: Any, step: float) -> Any:
        """The target of the trained output's tensor from labels ``y`` (one step
        ``step`` down the task's loss); several outputs: a dict by tensor."""
        if isinstance(self.task, MultiTask):
            return self.task.targets(acts, y, step)
        logits = self.plan.logits
        z = acts[logits].reshape(len(y), -1) if self.task.classification else acts[logits]
        return self.task.target(z, xp_of(z).asarray(y), step).reshape(acts[logits].shape)

    def batch_score(self, acts: dict[str, Any], y: Any) -> tuple[float, int]:
        """Summed loss and correct count of one batch (:meth:`Task.score`)."""
        if isinstance(self.task, MultiTask):
            return self.task.score(acts, y)
        z = acts[self.plan.logits]
        return self.task.score(z.reshape(len(y), -1) if self.task.classification else z,
                               xp_of(z).asarray(y))

    def scores(self, data: LabelledData, idx: np.ndarray) -> tuple[float, int, np.ndarray]:
        """Summed cross-entropy, correct count and predictions on ``data[idx]``
        (another task: its loss and correct positions, :meth:`Task.score`, and
        no predictions)."""
        loss, correct, preds = 0.0, 0, []
        forward = self.frozen_forward([self.plan.logits])
        if not self.task.classification:
            forward = self.frozen_forward(self.plan.head_logits)
            for x, y in data.batches(idx, self.config.run.batch_size):
                batch_loss, batch_correct = self.batch_score(forward(x), y)
                loss += batch_loss
                correct += batch_correct
            return loss, correct, np.zeros(0, np.int64)
        for x, y in data.batches(idx, self.config.run.batch_size):
            z = forward(x)[self.plan.logits]
            z = z.reshape(len(y), -1)
            batch_loss, batch_correct = cross_entropy(z, y)
            loss += batch_loss
            correct += batch_correct
            preds.append(z.argmax(axis=1))
        return loss, correct, np.concatenate(preds) if preds else np.zeros(0, np.int64)

    def evaluate(self, data: LabelledData, idx: np.ndarray | None = None) -> EvalResult:
        """Accuracy, loss, per-class accuracy and confusion on ``data[idx]``."""
        idx = np.arange(len(data)) if idx is None else idx
        if not self.task.classification:
            return self.task_result(data, idx)
        loss, correct, preds = self.scores(data, idx)
        return self.result(loss, correct, preds, data.labels(idx))

    def task_result(self, data: LabelledData, idx: np.ndarray) -> EvalResult:
        """The :class:`EvalResult` of a task other than classification: ``accuracy``
        is the pixel accuracy (dense, binary; NaN for regression), ``metrics`` the
        task's figures (:class:`Metrics`)."""
        if isinstance(self.task, MultiTask):
            return self._multi_result(data, idx)
        metrics = Metrics(self.task)
        forward = self.frozen_forward([self.plan.logits])
        for x, y in data.batches(idx, self.config.run.batch_size):
            metrics.add(forward(x)[self.plan.logits], y)
        out = metrics.result()
        accuracy = out.get("pixel_accuracy", out.get("accuracy", float("nan")))
        return EvalResult(accuracy, out["n"], out["loss"], task=self.task.kind, metrics=out)

    def _multi_result(self, data: LabelledData, idx: np.ndarray) -> EvalResult:
        """Several outputs: each one's metrics under ``metrics["outputs"]``, the
        weighted loss (:class:`MultiTask`) under ``metrics["loss"]``."""
        multi: MultiTask = self.task  # type: ignore[assignment]
        each = {h.output: Metrics(h.task) for h in multi.heads}
        forward = self.frozen_forward(self.plan.head_logits)
        total = 0.0
        for x, y in data.batches(idx, self.config.run.batch_size):
            acts = forward(x)
            total += multi.score(acts, y)[0]  # type: ignore[arg-type]  # Inputs
            for h in multi.heads:
                each[h.output].add(acts[h.logits], y[h.key])
        n = len(idx)
        out = {"task": "multi", "n": n, "loss": total / max(n, 1),
               "outputs": {name: m.result() for name, m in each.items()}}
        return EvalResult(float("nan"), n, total / max(n, 1), task="multi", metrics=out)

    def result(
        self, loss: float, correct: int, preds: np.ndarray, labels: np.ndarray
    ) -> EvalResult:
        return eval_result(loss, correct, preds, labels, self.plan.n_classes)

    # ------------------------------------------------------------ reverse paths

    def needed(self, layer: Layer, downstream: dict[str, list[int]] | None = None) -> list[str]:
        """The tensors the reverse rules read to carry a target back to ``layer``."""
        names = {*self.plan.head_logits, layer.input, layer.output}
        for i in (downstream or self.downstream)[layer.name]:
            pn = self.plan.nodes[i]
            names.update(pn.inputs[j] for j in pn.data_inputs)
            names.add(pn.outputs[0])
        return sorted(names)

    def reverse_plan(
        self, layers: list[Layer], downstream: dict[str, list[int]] | None = None
    ) -> tuple[list[int], list[str]]:
        """The path nodes (indices into plan.nodes, forward order) that carry targets
        back to ``layers``, and the tensors their rules read."""
        paths = downstream or self.downstream
        path = sorted({i for layer in layers for i in paths[layer.name]})
        needed = sorted({n for layer in layers for n in self.needed(layer, paths)})
        return path, needed



def _input_acts(name: str, x: Any, xp: Any) -> dict[str, Any]:
    """The graph inputs of batch ``x`` as activations: ``x`` itself under ``name``,
    or each input of a batch of several (:class:`onnxfbp.data.Inputs`)."""
    if isinstance(x, dict):
        return {k: xp.asarray(v, dtype=xp.float32) for k, v in x.items()}
    return {name: xp.asarray(x, dtype=xp.float32)}
