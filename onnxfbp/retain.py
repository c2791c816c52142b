"""Retain data (``--retain-data``): original-domain samples the run must not forget.

The retain samples join the run's data (:func:`attach_retain`): their training
part trains with the adaptation data (labelled ones of a classifier, in a second
run where the bound cost the first most of its gain, also pulled toward the input
model's logits: :func:`retry_anchored`), their held-out part is the constraint
:class:`onnxfbp.schedules.state.Retain` every update keeps, and the gate checks
it again on the result (``refine._gate``). Their targets are their labels, or,
unlabelled, the input model's own outputs computed once before any change: its
predicted classes (classification, dense), its 0/1 masks (binary) or its values
(regression).

The bound ``--max-retain-drop`` is on the task's gate figure (:func:`retain_drop`
in :mod:`onnxfbp.fit.tasks`): the drop of the accuracy (classification) or of the
mean IoU (dense, binary), and for regression the rise of the MAE divided by the
MAE of always predicting the mean of the retain held-out targets (``scale``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .data import JoinedData, LabelledData, from_arrays, load_data
from .errors import DataError, UnsupportedModelError
from .events import Message, Progress
from .fit.head import SEED_SALT
from .fit.targets import log_softmax
from .fit.tasks import MultiTask
from .output.results import EvalResult
from .schedules.state import Anchor, ModelState, Retain, RunContext, Score

__all__ = ["RetainLike", "Retained", "as_retain", "attach_retain", "retain_eval",
           "retry_anchored"]

RETRY_BELOW = 0.8  # a second, anchored run when the kept gain is below this share of the best

RetainLike = LabelledData | tuple[np.ndarray, np.ndarray | None] | str | os.PathLike[str]


def as_retain(data: RetainLike, input_name: str) -> LabelledData:
    """Retain data as :class:`LabelledData`, labels optional (``(x, None)``, or a
    file without ``y``)."""
    if isinstance(data, LabelledData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, input_name, labels_optional=True, what="retain data file")
    x, y = data
    if y is not None:
        return from_arrays(x, y, "retain arrays")
    x = x if isinstance(x, np.memmap) else np.asarray(x)
    out = from_arrays(x, np.zeros(len(x) if x.ndim else 0, np.int64), "retain arrays")
    out.labelled = False
    return out


@dataclass
class Retained:
    """The retain data inside the run's data: its split, targets (labels, or the
    input model's outputs), the input model's softmax on it (classification;
    None otherwise) and the scale of a regression's MAE bound (1 otherwise)."""

    data: LabelledData
    joined: JoinedData
    train_idx: np.ndarray  # into joined
    val_idx: np.ndarray  # into joined
    probs: np.ndarray | None
    scale: float = 1.0
    logits: np.ndarray | None = None  # classification: the input model's (n, classes)

    def credit(self) -> np.ndarray:
        """:class:`Retain` credit of the held-out part (classification): one-hot
        labels, or the input model's softmax for unlabelled data."""
        assert self.probs is not None
        local = self.val_idx - len(self.joined.first)
        if self.data.labelled:
            return np.eye(self.probs.shape[1])[self.joined.second_labels[local]]
        return self.probs[local]


def _outputs(state: ModelState, data: LabelledData, idx: np.ndarray) -> np.ndarray:
    """The current model's target tensor (``plan.logits``) on ``data[idx]``, float64."""
    forward = state.frozen_forward([state.plan.logits])
    parts = [np.asarray(forward(x)[state.plan.logits], np.float64)
             for x, _ in data.batches(idx, state.config.run.batch_size)]
    return np.concatenate(parts)


def _model_targets(state: ModelState, z: np.ndarray) -> np.ndarray:
    """The input model's own outputs ``z`` as labels of its task: classes (dense),
    0/1 masks (binary) or values (regression)."""
    task = state.task
    shape = (len(z), *z.shape[2:]) if task.kind == "dense" else z.shape
    pred = np.asarray(task.predictions(z, np.empty(shape, np.float32)))
    return pred if task.kind == "dense" else pred.astype(np.float32)


def _split(state: ModelState, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The retain data's own training and held-out split (``retain_holdout`` of
    it held out, its own draw; fewer than 10 samples: the training part judges
    itself)."""
    pick = np.random.default_rng([state.config.split.seed, SEED_SALT, 2])
    is_val = pick.random(n) < state.config.retain.retain_holdout if n >= 10 else np.zeros(n, bool)
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    return train, (val if len(val) else train)


def _join(state: ModelState, adapt: LabelledData, retain: LabelledData,
          progress: Progress) -> Retained:
    """Append ``retain`` to ``adapt`` with its targets, computed once before any change."""
    if isinstance(state.task, MultiTask):
        raise UnsupportedModelError("--retain-data works with one trained output; drop "
                                    "--retain-data or train one --target")
    z = _outputs(state, retain, np.arange(len(retain)))
    classification = state.task.classification
    want = adapt.labels(np.zeros(1, np.int64)).shape[1:]
    if retain.labelled:
        labels = retain.labels()
        if labels.shape[1:] != want:
            raise DataError(f"retain labels have shape {['N', *labels.shape[1:]]} but the "
                            f"adaptation labels {['N', *want]}; give retain labels of the "
                            "same shape")
    else:
        progress(Message(f"retain data: {len(retain)} samples without labels; the input "
                         "model's outputs are their targets"))
        labels = (z.reshape(len(z), -1).argmax(axis=1) if classification
                  else _model_targets(state, z).reshape(len(z), *want))
    train, val = _split(state, len(retain))
    probs = np.exp(log_softmax(z.reshape(len(z), -1))) if classification else None
    scale = 1.0
    if state.task.kind == "regression":  # the MAE of predicting the held-out targets' mean
        held = np.asarray(labels[val], np.float64).reshape(len(val), -1)
        scale = float(np.abs(held - held.mean(axis=0)).mean()) or 1.0
    offset = len(adapt)
    logits = z.reshape(len(z), -1).astype(np.float32) if classification else None
    return Retained(retain, JoinedData(adapt, retain, labels), train + offset, val + offset,
                    probs, scale, logits)


def retain_eval(state: ModelState, retained: Retained) -> tuple[EvalResult, float | None]:
    """The current model on the retain held-out part, and (classification) its
    agreement with the input model's predictions. Labelled, or another task: the
    usual figures against the targets. Unlabelled classification: the accuracy
    the input model expects, ``mean_i p0[i, pred_i]`` (``p0`` its softmax), and
    the cross-entropy against ``p0``; no per-class figures."""
    idx = retained.val_idx
    if retained.probs is None:
        return state.evaluate(retained.joined, idx), None
    if retained.data.labelled:
        result = state.evaluate(retained.joined, idx)
        z = None
    else:
        z = _outputs(state, retained.joined, idx).reshape(len(idx), -1)
        q = retained.credit()
        preds = z.argmax(axis=1)
        score = float(q[np.arange(len(preds)), preds].sum())
        loss = -float((q * log_softmax(z)).sum())
        result = EvalResult(score / len(idx), len(idx), loss / len(idx))
    z = z if z is not None else _outputs(state, retained.joined, idx).reshape(len(idx), -1)
    pseudo = retained.probs[idx - len(retained.joined.first)].argmax(axis=1)
    return result, float((z.argmax(axis=1) == pseudo).mean())


def attach_retain(state: ModelState, ctx: RunContext,
                  retain_data: LabelledData) -> tuple[Retained, EvalResult]:
    """Join ``retain_data`` to the run's data: its training part to
    ``ctx.train_idx``, its held-out part as ``ctx.retain``; the input model's
    result on that held-out part."""
    retained = _join(state, ctx.data, retain_data, ctx.progress)
    before, _ = retain_eval(state, retained)
    ctx.train_idx = np.concatenate([ctx.train_idx, retained.train_idx])
    ctx.data = retained.joined
    max_drop = state.config.retain.max_retain_drop
    # labelled only: the second run changes more predictions, and the unlabelled
    # bound's estimate cannot tell whether they were right (docs/retain.md)
    if (retained.logits is not None and retained.data.labelled
            and state.config.retain.retain_anchor > 0):
        ctx.anchor = Anchor(len(retained.joined.first), retained.logits,
                            state.config.retain.retain_anchor)
    if retained.probs is not None:
        ctx.retain = Retain(retained.val_idx, retained.credit(), before.accuracy * before.n,
                            max_drop)
    else:
        ctx.retain = Retain(retained.val_idx, np.zeros((0, 0)), 0.0, max_drop, before,
                            retained.scale)
    return retained, before


def retry_anchored(state: ModelState, ctx: RunContext, before: Score,
                   start: dict[str, np.ndarray], mark: int,
                   schedule: Callable[[], EvalResult | None],
                   estimate: EvalResult | None) -> EvalResult | None:
    """After ``schedule`` ran once from the weights ``start`` (held-out score
    ``before``; its layer reports from index ``mark`` of ``ctx.reports``): where
    the retain bound kept less than ``RETRY_BELOW`` of its best held-out gain
    regardless of the bound, run it again from ``start`` with the retain samples
    anchored to the input model's logits (:class:`Anchor`), and keep the run with
    the better held-out score (the other's layer reports are dropped; the
    progress and ``anchor.outcome`` say which). Returns the kept run's
    ``estimate`` (``schedule``'s return: a refitted output layer's held-out
    estimate, or None)."""
    anchor, best = ctx.anchor, ctx.unbound_score
    if anchor is None or best is None:
        return estimate
    gain, kept = best.correct - before.correct, ctx.score.correct - before.correct
    if gain <= 0 or kept >= RETRY_BELOW * gain:
        return estimate
    n = len(ctx.val_idx)
    # the first run's result, to restore if the anchored run is not better
    values, score, blend, unbound = dict(state.values), ctx.score, ctx.blend, ctx.unbound
    first_end = len(ctx.reports)
    ctx.progress(Message(
        f"retain bound: the schedule kept {kept} of the {gain} held-out samples it won "
        f"regardless of the bound; running it again with the retain samples pulled toward "
        f"the input model's logits (weight {anchor.weight:g})"))
    state.values, ctx.score = dict(start), Score(before.loss, before.correct)
    ctx.blend, ctx.unbound, ctx.unbound_score = None, None, None
    anchor.on = True
    try:
        second_estimate = schedule()
    finally:
        anchor.on = False
    second = ctx.score
    use_second = Score(score.loss, score.correct).better(second.loss, second.correct,
                                                         commit=False)
    anchor.outcome = {"first_heldout_accuracy": score.correct / n,
                      "anchored_heldout_accuracy": second.correct / n,
                      "kept": "anchored" if use_second else "first"}
    if use_second:  # drop the first run's layer reports
        ctx.reports = ctx.reports[:mark] + ctx.reports[first_end:]
    else:
        state.values, ctx.score, ctx.blend = values, score, blend
        ctx.unbound, ctx.unbound_score = unbound, best
        ctx.reports = ctx.reports[:first_end]
    ctx.progress(Message(
        f"retain bound: the anchored run {'is' if use_second else 'is not'} better on "
        f"held-out ({second.correct / n:.4f} vs {score.correct / n:.4f}); keeping the "
        f"{'anchored' if use_second else 'first'} run"))
    return second_estimate if use_second else estimate
