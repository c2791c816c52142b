"""The JSON report of a refine run: its schema, a checker and a reader.

``RefineResult.to_dict()`` (written by ``onnxfbp refine/demo --report``) is the
report. :data:`SCHEMA` describes it in a JSON-Schema subset (``type``,
``properties``, ``required``, ``items``, ``additionalProperties``, ``minimum``,
``maximum``, ``pattern``); :func:`validate_report` checks a report against it
plus the cross-field facts a schema cannot say (a confusion matrix is k x k and
sums to n, feature maps and their targets have one shape, so do a task figure's
true values and predictions, ...), raising
:class:`ReportError` with the path of the first bad field.

:mod:`onnxfbp.output.html` renders a report as one self-contained HTML page
(:mod:`onnxfbp.output.figures` draws its figures).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = [
    "SCHEMA",
    "ReportError",
    "load_report",
    "validate_report",
]

SCHEMA_PREFIX = "onnxfbp.report/1"

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}

EVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "accuracy of one model on one labelled split",
    "required": ["accuracy", "n", "loss", "per_class", "confusion"],
    "properties": {
        "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                     "description": "fraction of samples whose arg-max class is the label "
                                    "(dense, binary: of positions; null: regression, several "
                                    "outputs)"},
        "n": {"type": "integer", "minimum": 0, "description": "samples in the split"},
        "loss": {"type": ["number", "null"],
                 "description": "mean cross-entropy of the class scores"},
        "per_class": {"type": ["array", "null"],
                      "items": {"type": "number", "minimum": 0, "maximum": 1},
                      "description": "accuracy (recall) per true class, index = class"},
        "confusion": {"type": ["array", "null"],
                      "items": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                      "description": "counts, row = true class, column = predicted class"},
        "task": {"type": ["string", "null"],
                 "description": "null: classification; dense, binary, regression or multi"},
        "metrics": {"type": ["object", "null"],
                    "description": "that task's metrics: task, n, loss; pixel_accuracy, "
                                   "mean_iou, iou (dense, binary); mae, rmse, loss_kind "
                                   "(regression); outputs (multi: these per output)"},
    },
}

LAYER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "one visit of one layer in one sweep (a layer appears once per sweep)",
    "required": ["sweep", "name", "op", "weight_shape", "accepted", "reason", "lam",
                 "relative_change", "residual_before", "residual_after", "heldout_accuracy",
                 "seconds"],
    "properties": {
        "sweep": {"type": "integer", "minimum": 0, "description": "0-based back-to-front pass"},
        "name": {"type": "string", "description": "ONNX node name of the layer"},
        "op": {"type": "string", "description": "Conv, Gemm or MatMul"},
        "weight_shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                         "description": "shape of the weight as the node reads it"},
        "accepted": {"type": "boolean", "description": "the new weights were kept"},
        "reason": {"type": "string", "description": "why they were kept or reverted"},
        "lam": {"type": ["number", "null"],
                "description": "chosen ridge weight, relative to mean diag(X^T X); "
                               "null: no finite solution"},
        "relative_change": {"type": "number", "minimum": 0,
                            "description": "||W_new - W_old|| / ||W_old|| of the candidate"},
        "residual_before": {"type": ["number", "null"],
                            "description": "held-out target residual per row with the old weights"},
        "residual_after": {"type": ["number", "null"],
                           "description": "held-out target residual per row with the candidate"},
        "heldout_accuracy": {"type": ["number", "null"],
                             "description": "held-out accuracy of the candidate (kept or not)"},
        "seconds": {"type": "number", "minimum": 0, "description": "wall time of the visit"},
        "outcome": {"type": ["string", "null"],
                    "description": "kept, reverted (tried, then undone) or skipped (no finite "
                                   "update, e.g. non-finite features: left unchanged)"},
        "halvings": {"type": "integer", "minimum": 0,
                     "description": "minibatch blow-ups survived, each halving the step"},
    },
}

FEATURE_MAP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "a few samples of one layer's output next to its reconstructed target",
    "required": ["op", "actual", "target"],
    "properties": {
        "op": {"type": "string"},
        "samples": {"type": "array", "items": {"type": "integer"},
                    "description": "indices of the samples (first axis of actual/target)"},
        "channels": {"type": "array", "items": {"type": "integer"},
                     "description": "channel indices (second axis of actual/target, conv layers)"},
        "labels": {"type": "array", "items": {"type": "integer"},
                   "description": "optional: class label of each sample"},
        "actual": {"type": "array", "description": "layer output, [sample][channel][h][w] "
                   "(conv) or [sample][feature] (dense)"},
        "target": {"type": "array", "description": "reconstructed target, same shape as actual"},
    },
}

TASK_FIGURE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "one trained output that is not a classifier, on a few samples of the "
                   "eval data (or the held-out split): before and after the run",
    "required": ["task", "split", "samples", "true", "before", "after"],
    "properties": {
        "task": {"type": "string", "description": "regression, dense or binary"},
        "split": {"type": "string", "description": "eval or held-out"},
        "samples": {"type": "array", "items": {"type": "integer"},
                    "description": "indices of the samples in that split"},
        "true": {"type": "array", "description": "regression: [sample][value], at most 500 "
                 "samples and the first 4 values of each; dense, binary: [sample][h][w] "
                 "masks (classes, 255 ignored; or 0/1), at most 3 samples, strided to at "
                 "most 128 per side"},
        "before": {"type": "array", "description": "the input model's predictions, as true"},
        "after": {"type": "array", "description": "the refined model's predictions, as true"},
        "input": {"type": ["array", "null"],
                  "description": "dense, binary: the first channel of the first input "
                                 "[sample][h][w], strided as the masks; null if not an image"},
    },
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "the report of one refine run (RefineResult.to_dict())",
    "required": ["schema", "written", "heldout", "eval", "layers", "timings", "environment",
                 "plan", "config"],
    "properties": {
        "schema": {"type": "string", "pattern": r"^onnxfbp\.report/1(\.\d+)*$",
                   "description": "format tag; readers accept any onnxfbp.report/1.x"},
        "written": {"type": ["string", "null"],
                    "description": "path of the refined model, or null"},
        "heldout": {
            "type": "object", "required": ["before", "after"],
            "description": "the held-out part of the adaptation data (RefineConfig.holdout)",
            "properties": {"before": EVAL_SCHEMA, "after": EVAL_SCHEMA},
        },
        "eval": {
            "type": ["object", "null"], "required": ["before", "after"],
            "description": "--eval-data / eval_data=, or null when none was given",
            "properties": {"before": EVAL_SCHEMA,
                           "after": {**EVAL_SCHEMA, "type": ["object", "null"]}},
        },
        "retain": {
            "type": ["object", "null"], "required": ["before", "after"],
            "description": "the held-out part of --retain-data / retain_data= (the original "
                           "domain; unlabelled: agreement with the input model), or null",
            "properties": {"before": EVAL_SCHEMA,
                           "after": {**EVAL_SCHEMA, "type": ["object", "null"]}},
        },
        "layers": {"type": "array", "items": LAYER_SCHEMA, "description": "layer visits, in order"},
        "timings": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0},
                    "description": "seconds per phase: plan, validate, evaluate_before, "
                    "forward_and_targets, solve, evaluate_after, total, write"},
        "environment": {
            "type": "object",
            "required": ["onnxfbp", "onnx", "onnxruntime", "numpy", "python", "device",
                         "providers"],
            "properties": {
                "onnxfbp": {"type": "string"}, "onnx": {"type": "string"},
                "onnxruntime": {"type": "string"}, "numpy": {"type": "string"},
                "python": {"type": "string"},
                "device": {"type": "string", "description": "cpu or cuda"},
                "providers": {"type": "array", "items": {"type": "string"},
                              "description": "onnxruntime execution providers, in order"},
                "batch_mode": {"type": "string"},
                "reverse_pass": {"type": ["string", "null"],
                                 "description": "minibatch: 'onnxruntime' (compiled; on a "
                                 "GPU 'onnxruntime (CUDA, CuPy in and out)' or "
                                 "'onnxruntime (host copies)'), 'numpy (reason)' or "
                                 "'cupy (reason)'; null otherwise"},
                "kept_branch": {"type": ["string", "null"],
                                "description": "minibatch: the deepest layer whose residual "
                                "was computed at its kept output positions only "
                                "(onnxfbp.reverse.kept_branch); null if none"},
                "cluster": {"type": "object", "required": ["workers", "threads", "phases"],
                            "description": "optional (--dask / client=): scheduler, "
                            "workers, threads, onnxruntime_threads, schedule, and per "
                            "phase seconds (driver wall), worker_seconds and tasks"},
            },
        },
        "plan": {
            "type": "object",
            "required": ["input", "output", "logits", "output_kind", "n_classes", "boundaries",
                         "layers"],
            "properties": {
                "input": {"type": "string"}, "output": {"type": "string"},
                "logits": {"type": "string"},
                "output_kind": {"type": "string"},
                "n_classes": {"type": ["integer", "null"]},
                "boundaries": {"type": "array", "items": {"type": "string"}},
                "layers": {"type": "array", "items": {
                    "type": "object", "required": ["name", "op", "refined", "reason"],
                    "properties": {"name": {"type": "string"}, "op": {"type": "string"},
                                   "refined": {"type": "boolean",
                                               "description": "its weights changed"},
                                   "selected": {"type": "boolean",
                                                "description": "the run tried to refine it"},
                                   "changed": {"type": "boolean",
                                               "description": "its weights differ from the "
                                                              "input model's"},
                                   "outcome": {"type": "string",
                                               "description": "changed, reverted, skipped, "
                                                              "unchanged or not selected"},
                                   "reason": {"type": ["string", "null"],
                                              "description": "why it is not refined"}},
                }},
            },
        },
        "config": {"type": "object", "description": "the RefineConfig of the run"},
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "optional: suspicious data (a class missing or rare, "
                                    "inputs far outside the retain data's range)"},
        "feature_maps": {"type": "object", "additionalProperties": FEATURE_MAP_SCHEMA,
                         "description": "optional: layer name -> feature maps of a few samples"},
        "task_figures": {"type": "object", "additionalProperties": TASK_FIGURE_SCHEMA,
                         "description": "optional: output name -> true values or masks and "
                                        "the predictions before and after"},
    },
}


class ReportError(DataError):
    """The report is missing, not JSON, or not an onnxfbp report (one-line message)."""


# ---------------------------------------------------------------------------- checking

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "number": (int, float), "integer": (int,), "null": (type(None),),
}


def _type_name(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name):
            return name
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def _check(value: Any, schema: dict[str, Any], path: str) -> None:
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in names):
            raise ReportError(f"{path or 'report'}: expected {' or '.join(names)}, "
                              f"got {_type_name(value)}")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if "minimum" in schema and value < schema["minimum"]:
            raise ReportError(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ReportError(f"{path}: {value} is above the maximum {schema['maximum']}")
    elif isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise ReportError(f"{path}: {value!r} does not match {schema['pattern']}")
    elif isinstance(value, list):
        items = schema.get("items")
        if items is not None:
            for i, item in enumerate(value):
                _check(item, items, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise ReportError(f"{_join(path, key)}: missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                _check(item, props[key], _join(path, key))
            elif isinstance(extra, dict):
                _check(item, extra, _join(path, key))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_eval(result: dict[str, Any] | None, path: str) -> None:
    if result is None:
        return
    n, confusion, per_class = result["n"], result["confusion"], result["per_class"]
    if confusion is not None:
        k = len(confusion)
        if any(len(row) != k for row in confusion):
            raise ReportError(f"{path}.confusion: not a square matrix")
        total = sum(sum(row) for row in confusion)
        if total != n:
            raise ReportError(f"{path}.confusion: counts sum to {total}, but n is {n}")
        if n and abs(sum(confusion[i][i] for i in range(k)) / n - result["accuracy"]) > 1e-6:
            raise ReportError(f"{path}.accuracy: {result['accuracy']} disagrees with the "
                              "confusion matrix")
        if per_class is not None and len(per_class) != k:
            raise ReportError(f"{path}.per_class: {len(per_class)} classes, confusion has {k}")


def _nested_shape(value: Any, path: str) -> tuple[int, ...]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ReportError(f"{path}: not a rectangular array of numbers ({exc})") from None
    return tuple(arr.shape)


def _check_feature_map(fm: dict[str, Any], path: str) -> None:
    shape = _nested_shape(fm["actual"], f"{path}.actual")
    tshape = _nested_shape(fm["target"], f"{path}.target")
    if shape != tshape:
        raise ReportError(f"{path}: actual has shape {list(shape)} but target {list(tshape)}")
    if len(shape) < 2:
        raise ReportError(f"{path}.actual: expected [sample][...], got shape {list(shape)}")
    if "samples" in fm and len(fm["samples"]) != shape[0]:
        raise ReportError(f"{path}.samples: {len(fm['samples'])} indices for {shape[0]} samples")
    if "labels" in fm and len(fm["labels"]) != shape[0]:
        raise ReportError(f"{path}.labels: {len(fm['labels'])} labels for {shape[0]} samples")
    if "channels" in fm and len(shape) >= 3 and len(fm["channels"]) != shape[1]:
        raise ReportError(f"{path}.channels: {len(fm['channels'])} indices for {shape[1]} channels")


def _check_task_figure(tf: dict[str, Any], path: str) -> None:
    shape = _nested_shape(tf["true"], f"{path}.true")
    for part in ("before", "after"):
        if _nested_shape(tf[part], f"{path}.{part}") != shape:
            raise ReportError(f"{path}.{part}: shape differs from true's {list(shape)}")
    if len(shape) < 2 or len(tf["samples"]) != shape[0]:
        raise ReportError(f"{path}.samples: {len(tf['samples'])} indices for true of shape "
                          f"{list(shape)}")


def validate_report(report: Any) -> None:
    """Raise :class:`ReportError` unless ``report`` (parsed JSON) is an onnxfbp report.

    Extra fields are allowed (newer writers may add some); every field in
    :data:`SCHEMA`'s ``required`` lists must be present with the given type.
    """
    if isinstance(report, dict) and isinstance(report.get("schema"), str) \
            and not report["schema"].startswith(SCHEMA_PREFIX):
        raise ReportError(f"schema: {report['schema']!r} is not {SCHEMA_PREFIX!r} "
                          "(written by a newer onnxfbp?)")
    _check(report, SCHEMA, "")
    for split in ("heldout", "eval", "retain"):
        part = report.get(split)
        if part is None:
            continue
        _check_eval(part["before"], f"{split}.before")
        _check_eval(part["after"], f"{split}.after")
        if part["after"] is not None and part["before"]["n"] != part["after"]["n"]:
            raise ReportError(f"{split}: before and after were measured on different sample counts")
    for name, fm in (report.get("feature_maps") or {}).items():
        _check_feature_map(fm, f"feature_maps[{name!r}]")
    for name, tf in (report.get("task_figures") or {}).items():
        _check_task_figure(tf, f"task_figures[{name!r}]")


MAX_REPORT_BYTES = 512 * 2**20  # reports of real runs are kilobytes to a few megabytes
MAX_REPORT_DEPTH = 64  # brackets: the deepest field of a report (feature maps) is ~8


def _max_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of JSON ``text`` (strings skipped), in linear time."""
    # Strings hold no brackets that count: drop them (escapes first), then scan the rest.
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    depth = best = 0
    for chunk in re.finditer(r"[\[\]{}]+", stripped):
        for ch in chunk.group():
            depth += 1 if ch in "[{" else -1
            best = max(best, depth)
    return best


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a JSON report; :class:`ReportError` (one line) if it is not one."""
    from ..paths import check_input_file  # noqa: PLC0415

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ReportError(f"report {path} not found") from None
    except (OSError, ValueError):
        st = None
    if st is not None and not os.path.isdir(path):
        check_input_file(path, "report", ReportError)
        if st.st_size > MAX_REPORT_BYTES:
            raise ReportError(f"report {path} is {st.st_size} bytes, over the limit of "
                              f"{MAX_REPORT_BYTES}; it is not an onnxfbp report")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"report {path} not found") from None
    except IsADirectoryError:
        raise ReportError(f"report {path} is a directory, not a JSON file") from None
    except UnicodeDecodeError:
        raise ReportError(f"report {path} is not a JSON report (not UTF-8 text)") from None
    except OSError as exc:
        raise ReportError(f"cannot read report {path}: {exc.strerror or exc}") from None
    depth = _max_depth(text)
    if depth > MAX_REPORT_DEPTH:
        raise ReportError(f"report {path} nests {depth} levels deep (an onnxfbp report has "
                          f"fewer than {MAX_REPORT_DEPTH}); it is not an onnxfbp report")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"report {path} is not valid JSON (line {exc.lineno}, "
                          f"column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ReportError(f"report {path} nests too deep; it is not an onnxfbp report") from None
    if not isinstance(report, dict):
        raise ReportError(f"report {path} is not an onnxfbp report "
                          f"(top level is {_type_name(report)})")
    try:
        validate_report(report)
    except ReportError as exc:
        raise ReportError(f"report {path} is not an onnxfbp report: {exc}") from None
    return report
