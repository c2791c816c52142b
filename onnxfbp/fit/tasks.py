"""Tasks beyond classification: what a target output learns from its labels.

The task follows from the labels and the output (``--task`` overrides it):

- ``classification``: integer labels ``[N]``, output ``[N, C]`` (logits,
  Softmax or LogSoftmax); the path of :mod:`onnxfbp.fit.targets`, unchanged;
- ``dense``: integer labels ``[N, d1..dk]``, output ``[N, C, d1..dk]``: a
  class per position (segmentation); label ``255`` is ignored;
- ``binary``: float labels ``[N, 1, d1..]`` in [0, 1] under a Sigmoid output:
  binary cross-entropy per position (masks);
- ``regression``: float labels of the output's shape otherwise, loss ``mse``
  (``L = r^2 / 2``), ``l1`` (``L = |r|``) or ``huber`` (``delta = 1``), with
  ``r = z - y`` on the output itself.

Each task's target is the same construction as the classifier's, in the space
of the tensor the plan sets targets on (the input of a final Softmax or
Sigmoid, else the output):

    t = z - step * dL/dz

- dense: ``dL/dz = softmax(z, axis=1) - onehot(y)`` (0 where ignored);
- binary: ``dL/dz = sigmoid(z) - y``;
- regression: ``dL/dz = r`` (mse), ``clip(r, -1, 1)`` (huber) or
  ``sign(r) * mean|r|`` (l1: the sign at the scale of the errors). The step is
  at most 1 here: ``step = 1`` with mse is the label itself (the least-squares
  target), a larger step would overshoot it.

:meth:`Task.score` gives what every update is judged by, as the classifier's
(summed loss, correct count): correct positions for dense and binary tasks,
none for regression (the loss alone decides). :class:`Metrics` accumulates the
reported figures: accuracy; pixel accuracy and mean IoU (dense, binary); MAE
and RMSE (regression). :data:`GATE_METRIC` is the one the gate compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DataError
from ..rules import Array, xp_of
from .targets import cross_entropy, label_target

__all__ = ["GATE_METRIC", "LOSSES", "TASKS", "Head", "Metrics", "MultiTask", "Task",
           "detect_task", "gate_value", "metric_line", "parse_pairs", "retain_drop", "task_gain"]

TASKS = ("classification", "dense", "binary", "regression")
LOSSES = ("mse", "l1", "huber")
IGNORE = 255
# the metric each task's gate compares, and whether lower is better
GATE_METRIC = {"classification": ("accuracy", False), "dense": ("mean_iou", False),
               "binary": ("mean_iou", False), "regression": ("mae", True),
               "multi": ("loss", True)}
_HUBER_DELTA = 1.0


@dataclass(frozen=True)
class Task:
    """One target output's task: its kind, regression loss, the output's kind
    (``logits``, ``probabilities``, ``sigmoid-probabilities``...) and classes."""

    kind: str
    loss: str = "mse"
    output_kind: str = "logits"
    n_classes: int | None = None
    positions: int = 1  # scored positions per sample (dense, binary)

    @property
    def classification(self) -> bool:
        return self.kind == "classification"

    def accuracy(self, correct: int, n: int) -> float | None:
        """The accuracy a correct count of ``n`` samples shows: per sample, per
        position (dense, binary: ignored positions count as misses); None for
        regression."""
        if self.kind == "regression":
            return None
        return correct / max(n * self.positions, 1)

    def _shaped(self, z: Array, y: Array) -> Array:
        """``z`` with its sample axes as the labels' (dense: classes on axis 1)."""
        if self.kind == "dense":
            return z.reshape(len(y), -1, *y.shape[1:])
        if self.kind == "classification":
            return z.reshape(len(y), -1)
        return z.reshape(y.shape)

    def gradient(self, z: Array, y: Array) -> Array:
        """``dL/dz`` per sample (shaped as ``z``): float64, dense in ``z``'s precision."""
        xp = xp_of(z)
        shape = z.shape
        if self.kind == "classification":
            zz = z.reshape(len(y), -1)
            return (zz - label_target(zz, y, 1.0)).reshape(shape)
        zs = self._shaped(z, y)
        zs = zs if self.kind == "dense" else zs.astype(xp.float64)  # dense: large, float32
        if self.kind == "dense":
            g = _softmax1(zs)
            valid = y != IGNORE
            labels = xp.where(valid, y, 0).astype(xp.int64)
            g -= xp.arange(zs.shape[1]).reshape(1, -1, *([1] * (zs.ndim - 2))) == labels[:, None]
            g *= valid[:, None]
        elif self.kind == "binary":
            g = _sigmoid(zs) - y
        else:
            value, slope = self._value(zs)
            r = value - y
            if self.loss == "l1":
                g = xp.sign(r) * float(xp.abs(r).mean() or 1.0)
            elif self.loss == "huber":
                g = xp.clip(r, -_HUBER_DELTA, _HUBER_DELTA)
            else:
                g = r
            g = g * slope
        return g.reshape(shape)

    def _value(self, zs: Array) -> tuple[Array, Array | float]:
        """A regression output's value from the target tensor ``zs`` and its slope
        (a final Sigmoid: ``s = sigmoid(z)``, ``ds/dz = s (1 - s)``)."""
        if self.output_kind == "sigmoid-probabilities":
            s = _sigmoid(zs)
            return s, s * (1.0 - s)
        return zs, 1.0

    def target(self, z: Array, y: Array, step: float) -> Array:
        """``z - step * dL/dz``, shaped and typed as ``z`` (the classifier's
        :func:`label_target` for classification)."""
        if self.kind == "classification":
            return label_target(z.reshape(len(y), -1), y, step).reshape(z.shape)
        if self.kind == "regression":
            step = min(step, 1.0)
        return (z - step * self.gradient(z, y)).astype(z.dtype)

    def score(self, z: Array, y: Array) -> tuple[float, int]:
        """Summed loss and correct count (samples, or positions for dense and binary
        tasks; 0 for regression) of ``z`` against labels ``y``."""
        if self.kind == "classification":
            return cross_entropy(z.reshape(len(y), -1), y)
        xp = xp_of(z)
        if self.kind == "dense":  # in z's precision (float32): the arrays are large
            zd = self._shaped(z, y)
            valid = y != IGNORE
            top = zd.max(axis=1)
            lse = xp.log(xp.exp(zd - top[:, None]).sum(axis=1)) + top
            labels = xp.where(valid, y, 0).astype(xp.int64)
            picked = xp.take_along_axis(zd, labels[:, None], axis=1)[:, 0]
            loss = float(((lse - picked) * valid).sum(dtype=xp.float64))
            return loss, int(((zd.argmax(axis=1) == labels) & valid).sum())
        zs = self._shaped(z, y).astype(xp.float64)
        if self.kind == "binary":
            # -[y log s + (1 - y) log(1 - s)] = softplus(z) - y z, stably
            loss = float((xp.logaddexp(0.0, zs) - y * zs).sum())
            return loss, int(((zs > 0) == (y >= 0.5)).sum())
        r = self._value(zs)[0] - y
        if self.loss == "l1":
            return float(xp.abs(r).sum()), 0
        if self.loss == "huber":
            a = xp.abs(r)
            d = _HUBER_DELTA
            return float(xp.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d)).sum()), 0
        return float(0.5 * (r * r).sum()), 0

    def predictions(self, z: Array, y: Array) -> np.ndarray:
        """What the output predicts, in the labels' space (classes, or values)."""
        xp = xp_of(z)
        zs = self._shaped(z, y)
        if self.kind in ("classification", "dense"):
            return np.asarray(zs.argmax(axis=1))
        if self.kind == "binary":
            return np.asarray(zs > 0).astype(np.int64)
        return np.asarray(self._value(zs.astype(xp.float64))[0])


@dataclass
class Metrics:
    """Streamed metrics of one task: add batches, then :meth:`result`."""

    task: Task
    n: int = 0
    loss: float = 0.0
    correct: int = 0
    units: int = 0  # positions scored (dense, binary) or values (regression)
    abs_err: float = 0.0
    sq_err: float = 0.0
    confusion: np.ndarray | None = None
    _extra: dict[str, Any] = field(default_factory=dict)

    def add(self, z: Array, y: np.ndarray) -> None:
        task = self.task
        loss, correct = task.score(z, y)
        self.n += len(y)
        self.loss += loss
        self.correct += correct
        pred = np.asarray(task.predictions(z, y))
        if task.kind == "regression":
            r = pred - np.asarray(y, np.float64).reshape(pred.shape)
            self.abs_err += float(np.abs(r).sum())
            self.sq_err += float((r * r).sum())
            self.units += r.size
            return
        truth = np.asarray(y)
        if task.kind == "binary":
            truth = (truth >= 0.5).astype(np.int64).reshape(pred.shape)
            k = 2
        else:
            k = int(task.n_classes or max(int(pred.max(initial=0)), 1) + 1)
        valid = truth != IGNORE if task.kind == "dense" else np.ones(truth.shape, bool)
        t, p = truth[valid].astype(np.int64), pred[valid].astype(np.int64)
        k = max(k, int(t.max(initial=0)) + 1, int(p.max(initial=0)) + 1)
        if self.confusion is None or len(self.confusion) < k:
            grown = np.zeros((k, k), np.int64)
            if self.confusion is not None:
                m = len(self.confusion)
                grown[:m, :m] = self.confusion
            self.confusion = grown
        self.confusion += np.bincount(t * len(self.confusion) + p,
                                      minlength=self.confusion.size).reshape(self.confusion.shape)
        self.units += int(valid.sum())

    def result(self) -> dict[str, Any]:
        """``task``, ``n``, ``loss`` (mean per sample) and the task's metrics."""
        kind = self.task.kind
        out: dict[str, Any] = {"task": kind, "n": self.n, "loss": self.loss / max(self.n, 1)}
        if kind == "regression":
            out["loss_kind"] = self.task.loss
            out["mae"] = self.abs_err / max(self.units, 1)
            out["rmse"] = float(np.sqrt(self.sq_err / max(self.units, 1)))
            return out
        if kind == "classification":
            out["accuracy"] = self.correct / max(self.n, 1)
            return out
        conf = self.confusion if self.confusion is not None else np.zeros((1, 1), np.int64)
        inter = np.diag(conf).astype(np.float64)
        union = conf.sum(axis=0) + conf.sum(axis=1) - inter
        present = union > 0
        out["pixel_accuracy"] = float(inter.sum() / max(conf.sum(), 1))
        out["mean_iou"] = float((inter[present] / union[present]).mean()) if present.any() else 0.0
        out["iou"] = [float(i / u) if u else None for i, u in zip(inter, union, strict=True)]
        return out


def _softmax1(z: Array) -> Array:
    xp = xp_of(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: Array) -> Array:
    xp = xp_of(z)
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def detect_task(y: np.ndarray, out_shape: tuple[int, ...], output_kind: str,
                override: str | None = None, loss: str = "mse", output: str = "output",
                key: str = "y", n: int | None = None) -> Task:
    """The task of labels ``y`` (a few samples of ``n``) for an output of per-sample
    shape ``out_shape``; :class:`DataError` naming the shapes that would fit when none does."""
    y = np.asarray(y)
    shown = [len(y) if n is None else n, *y.shape[1:]]
    lab = tuple(y.shape[1:])
    integer = np.issubdtype(y.dtype, np.integer)
    floating = np.issubdtype(y.dtype, np.floating)
    classes = int(out_shape[0]) if out_shape else None
    fits = {
        "classification": integer and lab == () and len(out_shape) == 1,
        "dense": integer and len(out_shape) >= 2 and lab == tuple(out_shape[1:]),
        "binary": floating and output_kind == "sigmoid-probabilities"
        and len(out_shape) >= 2 and lab == tuple(out_shape) and out_shape[0] == 1
        and (not y.size or (float(y.min()) >= 0.0 and float(y.max()) <= 1.0)),
        "regression": floating and int(np.prod(lab, dtype=np.int64)) == int(
            np.prod(out_shape, dtype=np.int64)) and len(lab) >= 1,
    }
    if override is not None:
        if override not in TASKS:
            raise DataError(f"unknown task {override!r}; use one of {', '.join(TASKS)}")
        if not fits[override] and not (override == "regression" and integer
                                        and lab == tuple(out_shape)):
            raise DataError(
                f"labels of shape {shown} under {key!r} ({y.dtype}) do not fit task "
                f"{override} for output {output!r} of shape {['N', *out_shape]}; "
                + _expected(out_shape, output_kind))
        kind = override
    else:
        kind = next((k for k in TASKS if fits[k]), "")
        if not kind:
            raise DataError(
                f"labels of shape {shown} under {key!r} ({y.dtype}) fit no task for output "
                f"{output!r} of shape {['N', *out_shape]}; " + _expected(out_shape, output_kind))
    if loss not in LOSSES:
        raise DataError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    n_classes = classes if kind in ("classification", "dense") else None
    positions = int(np.prod(out_shape[1:], dtype=np.int64)) if kind in ("dense", "binary") else 1
    return Task(kind, loss, output_kind, n_classes, positions)


def _expected(out_shape: tuple[int, ...], output_kind: str) -> str:
    """The label shapes that would fit an output of per-sample shape ``out_shape``."""
    want = [f"float labels {['N', *out_shape]} (regression)"]
    if len(out_shape) == 1:
        want.insert(0, "integer class labels, 1-D ['N'] (classification)")
    if len(out_shape) >= 2:
        want.insert(0, f"integer labels {['N', *out_shape[1:]]} (dense classes)")
        if output_kind == "sigmoid-probabilities" and out_shape[0] == 1:
            want.append(f"float labels {['N', *out_shape]} in [0, 1] (binary masks)")
    return "give " + " or ".join(want)


def parse_pairs(items: list[str] | tuple[str, ...], what: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` pairs of a repeatable option, in order; :class:`DataError` otherwise."""
    out = []
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value:
            raise DataError(f"{what} {item!r} is not NAME=VALUE; write it as OUTPUT=VALUE")
        out.append((name, value))
    return out


def gate_value(result: Any) -> float:
    """The figure the gate compares of an :class:`EvalResult`: its task's
    :data:`GATE_METRIC` (classification: the accuracy)."""
    if getattr(result, "task", None) is None or not result.metrics:
        return float(result.accuracy)
    return float(result.metrics[GATE_METRIC[result.task][0]])


def task_gain(before: Any, after: Any) -> float:
    """How much better ``after`` is than ``before`` by the gate's figure (positive:
    better; a lower-is-better figure such as MAE counts its decrease)."""
    gain = gate_value(after) - gate_value(before)
    lower = getattr(after, "task", None) is not None and GATE_METRIC[after.task][1]
    return -gain if lower else gain


def retain_drop(before: Any, after: Any, scale: float = 1.0) -> float:
    """How far ``after`` fell behind ``before`` on retain data, in the units of
    ``--max-retain-drop``: the decrease of the gate's figure (accuracy, mean
    IoU); for a lower-is-better one (MAE) its increase divided by ``scale`` (the
    MAE of always predicting the targets' mean)."""
    gain = task_gain(before, after)
    lower = getattr(after, "task", None) is not None and GATE_METRIC[after.task][1]
    return -gain / scale if lower else -gain


@dataclass(frozen=True)
class Head:
    """One trained output of several: its graph output, the tensor its target is
    set on, the labels' key in the data, its task and loss weight."""

    output: str
    logits: str
    key: str
    task: Task
    weight: float = 1.0


@dataclass(frozen=True)
class MultiTask:
    """Several outputs trained together (``--target`` given more than once). The
    loss is ``sum_k w_k L_k / P_k`` (``P_k``: positions per sample of output k, 1
    unless dense): each output's residual ``t_k - z_k`` is scaled by ``w_k / P_k``
    and the reverse pass starts from all of them (their residuals add where the
    paths meet). Every update is judged by that loss alone (correct count 0)."""

    heads: tuple[Head, ...]
    kind: str = "multi"
    loss: str = "weighted sum"
    output_kind: str = "several"
    n_classes: int | None = None
    classification: bool = False
    positions: int = 1  # the loss is per sample (each output's positions averaged)

    def accuracy(self, correct: int, n: int) -> float | None:
        return None  # the weighted loss judges

    def scale(self, head: Head, z: Array, n: int) -> float:
        positions = int(np.prod(z.shape[2:])) if head.task.kind in ("dense", "binary") \
            and z.ndim > 2 else 1
        return head.weight / max(positions, 1)

    def targets(self, acts: dict[str, Any], y: dict[str, Any], step: float) -> dict[str, Any]:
        """``{target tensor: z + scale (t - z)}`` for each head."""
        out = {}
        for head in self.heads:
            z = acts[head.logits]
            labels = xp_of(z).asarray(y[head.key])
            zz = z.reshape(len(labels), -1) if head.task.classification else z
            t = head.task.target(zz, labels, step).reshape(z.shape)
            out[head.logits] = (z + self.scale(head, z, len(labels)) * (t - z)).astype(z.dtype)
        return out

    def score(self, acts: dict[str, Any], y: dict[str, Any]) -> tuple[float, int]:
        """The weighted loss summed over samples (correct count 0: the loss decides)."""
        total = 0.0
        for head in self.heads:
            z = acts[head.logits]
            labels = xp_of(z).asarray(y[head.key])
            total += self.scale(head, z, 1) * head.task.score(z, labels)[0]
        return total, 0


def metric_line(before: Any, after: Any = None) -> str:
    """``mae 0.3412 -> 0.2813, rmse ... (n=294)``: a task's metrics in one line."""
    def figures(result: Any) -> dict[str, float]:
        m = result.metrics or {}
        if m.get("task") == "multi":
            return {f"{name}.{k}": v for name, sub in m.get("outputs", {}).items()
                    for k, v in sub.items() if isinstance(v, float) and k != "loss"}
        return {k: v for k, v in m.items() if isinstance(v, float) and k != "loss"}
    a = figures(before)
    b = figures(after) if after is not None else {}
    parts = [f"{k} {v:.4f}" + (f" -> {b[k]:.4f}" if k in b else "") for k, v in a.items()]
    return f"{before.task}: " + ", ".join(parts) + f" (n={before.n})"
