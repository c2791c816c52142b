"""The JSON report of a refine run: its schema, a checker, and an HTML renderer.

``RefineResult.to_dict()`` (written by ``onnxfbp refine/demo --report``) is the
report. :data:`SCHEMA` describes it in a JSON-Schema subset (``type``,
``properties``, ``required``, ``items``, ``additionalProperties``, ``minimum``,
``maximum``, ``pattern``); :func:`validate_report` checks a report against it
plus the cross-field facts a schema cannot say (a confusion matrix is k x k and
sums to n, feature maps and their targets have one shape, ...), raising
:class:`ReportError` with the path of the first bad field.

:func:`render_html` turns a report file into one self-contained HTML file:
figures are drawn with matplotlib (Agg) and embedded as base64 PNG, styles are
inline, nothing is fetched. ``onnxfbp report REPORT.json -o report.html`` calls it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, OutputError

__all__ = [
    "SCHEMA",
    "ReportError",
    "build_html",
    "load_report",
    "render_html",
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
        "accuracy": {"type": "number", "minimum": 0, "maximum": 1,
                     "description": "fraction of samples whose arg-max class is the label"},
        "n": {"type": "integer", "minimum": 0, "description": "samples in the split"},
        "loss": {"type": ["number", "null"],
                 "description": "mean cross-entropy of the class scores"},
        "per_class": {"type": ["array", "null"],
                      "items": {"type": "number", "minimum": 0, "maximum": 1},
                      "description": "accuracy (recall) per true class, index = class"},
        "confusion": {"type": ["array", "null"],
                      "items": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                      "description": "counts, row = true class, column = predicted class"},
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
        "clipped_steps": {"type": "integer", "minimum": 0,
                          "description": "minibatch steps cut to the layer's trust region"},
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


# ---------------------------------------------------------------------------- figures

BEFORE, AFTER = "#9aa5b1", "#2563eb"
KEPT, REVERTED = "#16a34a", "#d97706"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _splits(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, before, after) for held-out, eval and retain, where measured."""
    out = [("held-out", report["heldout"]["before"], report["heldout"]["after"])]
    ev = report.get("eval")
    if ev is not None and ev.get("after") is not None:
        out.append(("eval", ev["before"], ev["after"]))
    kept = report.get("retain")
    if isinstance(kept, dict) and kept.get("after") is not None:
        out.append(("retain", kept["before"], kept["after"]))
    return out


def _class_names(report: dict[str, Any], k: int) -> list[str]:
    names = report.get("class_names") or report["plan"].get("class_names")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    return [str(i) for i in range(k)]


def _fig_accuracy(report: dict[str, Any]) -> Any:
    splits = _splits(report)
    fig = _figure(1.6 + 1.5 * len(splits), 4.4)
    ax = fig.add_subplot()
    x = np.arange(len(splits))
    for offset, which, color, label in ((-0.2, 1, BEFORE, "before"), (0.2, 2, AFTER, "after")):
        values = [float((s[1] if which == 1 else s[2])["accuracy"]) for s in splits]
        bars = ax.bar(x + offset, values, 0.38, color=color, label=label)
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center",
                    va="bottom", fontsize=9)
    ax.set_xticks(x, [f"{s[0]}\n(n={s[1]['n']})" for s in splits])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy before / after")
    ax.legend(loc="lower right", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _fig_per_class(report: dict[str, Any]) -> Any | None:
    splits = [s for s in _splits(report) if s[1]["per_class"] and s[2]["per_class"]]
    if not splits:
        return None
    k = max(len(s[1]["per_class"]) for s in splits)
    fig = _figure(max(6.5, min(14.0, 2.0 + 0.45 * k)), 0.3 + 2.4 * len(splits))
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    names = _class_names(report, k)
    for ax, (label, before, after) in zip(axes, splits, strict=True):
        x = np.arange(len(before["per_class"]))
        if k <= 60:
            ax.bar(x - 0.2, before["per_class"], 0.38, color=BEFORE, label="before")
            ax.bar(x + 0.2, after["per_class"], 0.38, color=AFTER, label="after")
            ax.set_xticks(x, names[: len(x)], fontsize=8, rotation=0 if k <= 12 else 90)
        else:
            ax.plot(x, before["per_class"], color=BEFORE, label="before")
            ax.plot(x, after["per_class"], color=AFTER, label="after")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"per-class accuracy, {label} (n={before['n']})", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(loc="lower right", fontsize=8, ncols=2)
    axes[-1].set_xlabel("true class")
    return fig


def _fig_confusions(report: dict[str, Any]) -> Any | None:
    splits = [s for s in _splits(report) if s[1]["confusion"] and s[2]["confusion"]]
    if not splits:
        return None
    k = len(splits[0][1]["confusion"])
    cell = 0.34 if k <= 12 else max(0.06, 4.0 / k)
    side = min(max(2.6, cell * k + 1.0), 9.0)  # big k: one pixel per cell at most
    fig = _figure(3 * side + 0.6, side * len(splits) + 0.4)
    axes = fig.subplots(len(splits), 3, squeeze=False)
    names = _class_names(report, k)
    for row, (label, before, after) in enumerate(splits):
        cb = np.asarray(before["confusion"], dtype=np.int64)
        ca = np.asarray(after["confusion"], dtype=np.int64)
        diff = ca - cb
        better = np.where(np.eye(len(diff), dtype=bool), diff, -diff)  # >0: better
        vmax = max(int(np.abs(better).max()), 1)
        panels = (
            (cb, f"{label} before (acc {before['accuracy']:.3f})", "Blues"),
            (ca, f"{label} after (acc {after['accuracy']:.3f})", "Blues"),
            (diff, f"{label} change (green: better)", "PiYG"),
        )
        for col, (matrix, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            if col < 2:
                rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
                ax.imshow(matrix / rows, cmap=cmap, vmin=0, vmax=1)
            else:
                ax.imshow(better, cmap=cmap, vmin=-vmax, vmax=vmax)
            ax.set_title(title, fontsize=9)
            if k <= 15:
                for i in range(k):
                    for j in range(k):
                        v = int(matrix[i, j])
                        if v == 0:
                            continue
                        dark = col < 2 and v / max(int(matrix[i].sum()), 1) > 0.5
                        ax.text(j, i, f"{v:+d}" if col == 2 else str(v), ha="center", va="center",
                                fontsize=6.5, color="white" if dark else "black")
            if k <= 30:
                ax.set_xticks(range(k), names, fontsize=7)
                ax.set_yticks(range(k), names, fontsize=7)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_xlabel("predicted", fontsize=8)
            if col == 0:
                ax.set_ylabel("true", fontsize=8)
    return fig


def _visit_labels(layers: list[dict[str, Any]]) -> list[str]:
    return [f"{v['sweep'] + 1}: {_short(v['name'])}" for v in layers]


def _short(name: str, width: int = 28) -> str:
    """``name`` cut to ``width`` characters from the end, at a ``/`` where possible."""
    if len(name) <= width:
        return name
    parts = name.split("/")
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(tail) + 2 > width:
            break
        tail = f"{part}/{tail}"
    return "…" + (tail if len(tail) < width else tail[-(width - 1):])


MAX_FIGURE_VISITS = 60  # layer visits drawn (the last ones); the table lists more
MAX_TABLE_ROWS = 300  # rows of any table; beyond, a note says how many were left out


def _fig_layers(report: dict[str, Any]) -> Any | None:
    layers = report["layers"][-MAX_FIGURE_VISITS:]
    if not layers:
        return None
    n = len(layers)
    fig = _figure(max(9.0, min(16.0, 2.5 + 0.55 * n)), 9.0)
    ax_res, ax_rel, ax_acc = fig.subplots(3, 1, sharex=True)
    x = np.arange(n)
    colors = [KEPT if v["accepted"] else REVERTED for v in layers]

    def finite(v: float | None) -> float:
        return float(v) if v is not None and math.isfinite(v) and v > 0 else np.nan

    rb = [finite(v["residual_before"]) for v in layers]
    ra = [finite(v["residual_after"]) for v in layers]
    ax_res.bar(x - 0.2, rb, 0.38, color=BEFORE, label="old weights")
    ax_res.bar(x + 0.2, ra, 0.38, color=AFTER, label="candidate")
    if np.isfinite(rb + ra).any():
        ax_res.set_yscale("log")
    ax_res.set_ylabel("target residual\nper held-out row")
    ax_res.set_title("layer visits: target residual, weight change, held-out accuracy", fontsize=10)
    ax_res.legend(fontsize=8, loc="best")

    rel = [v["relative_change"] for v in layers]
    bars = ax_rel.bar(x, rel, 0.6, color=colors)
    for bar, v in zip(bars, layers, strict=True):
        if not v["accepted"]:
            bar.set_hatch("//")
    for xi, v in zip(x, layers, strict=True):
        lam = "lam -" if v["lam"] is None else f"lam {v['lam']:.3g}"
        ax_rel.text(xi, v["relative_change"], lam, ha="center", va="bottom", fontsize=7)
    ax_rel.set_ylabel("relative weight\nchange")
    from matplotlib.patches import Patch  # noqa: PLC0415

    ax_rel.legend(handles=[Patch(color=KEPT, label="kept"),
                           Patch(facecolor=REVERTED, hatch="//", label="reverted")], fontsize=8)
    ax_rel.margins(y=0.15)

    base = report["heldout"]["before"]["accuracy"]
    running, current = [], base
    for v in layers:
        if v["accepted"] and v["heldout_accuracy"] is not None:
            current = v["heldout_accuracy"]
        running.append(current)
    cand = [np.nan if v["heldout_accuracy"] is None else v["heldout_accuracy"] for v in layers]
    ax_acc.axhline(base, color=BEFORE, linestyle="--", linewidth=1, label=f"before ({base:.3f})")
    ax_acc.step(x, running, where="mid", color=AFTER, label="kept so far")
    for xi, c, v in zip(x, cand, layers, strict=True):
        ax_acc.plot(xi, c, marker="o" if v["accepted"] else "x", linestyle="none",
                    color=KEPT if v["accepted"] else REVERTED, markersize=6)
    ax_acc.set_ylabel("held-out accuracy\nof the candidate")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_acc.set_xticks(x, _visit_labels(layers), rotation=30, ha="right", fontsize=8)
    ax_acc.set_xlabel("sweep: layer")
    for ax in (ax_res, ax_rel, ax_acc):
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def _fig_timings(report: dict[str, Any]) -> Any | None:
    timings = {k: v for k, v in report["timings"].items() if k != "total"}
    if not timings:
        return None
    fig = _figure(7.0, 0.5 + 0.32 * len(timings))
    ax = fig.add_subplot()
    names = list(timings)
    values = [timings[k] for k in names]
    ax.barh(names, values, color=AFTER)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}s", va="center", fontsize=8)
    ax.invert_yaxis()
    total = report["timings"].get("total")
    ax.set_title("time per phase" + (f" (total {total:.1f}s)" if total is not None else ""),
                 fontsize=10)
    ax.set_xlabel("seconds")
    ax.margins(x=0.15)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _fig_feature_map(name: str, fm: dict[str, Any], max_samples: int,
                     max_channels: int) -> Any | None:
    """Actual vs reconstructed target (and their difference) for a few samples."""
    actual = np.asarray(fm["actual"], dtype=np.float64)
    target = np.asarray(fm["target"], dtype=np.float64)
    s = min(actual.shape[0], max_samples)
    samples = list(fm.get("samples") or range(actual.shape[0]))
    labels = fm.get("labels")

    def sample_title(i: int) -> str:
        title = f"sample {samples[i]}"
        return title + (f", label {labels[i]}" if labels else "")

    if actual.ndim == 4:  # [sample][channel][h][w]
        c = min(actual.shape[1], max_channels)
        channels = list(fm.get("channels") or range(actual.shape[1]))
        fig = _figure(1.2 + 1.35 * c, 0.4 + 3 * 1.3 * s)
        axes = fig.subplots(3 * s, c, squeeze=False)
        for i in range(s):
            for j in range(c):
                a, t = actual[i, j], target[i, j]
                lo, hi = float(min(a.min(), t.min())), float(max(a.max(), t.max()))
                d = t - a
                dmax = max(float(np.abs(d).max()), 1e-12)
                rows = ((a, "viridis", lo, hi, "actual"), (t, "viridis", lo, hi, "target"),
                        (d, "RdBu_r", -dmax, dmax, "target − actual"))
                for r, (img, cmap, vmin, vmax, what) in enumerate(rows):
                    ax = axes[3 * i + r, j]
                    ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0 and r == 0:
                        ax.set_title(f"channel {channels[j]}", fontsize=8)
                    if j == 0:
                        ax.set_ylabel(f"{sample_title(i)}\n{what}" if r == 0 else what, fontsize=7)
        fig.suptitle(f"{name} ({fm['op']}): output vs reconstructed target "
                     "(colour scale shared per channel; bottom row: what the target asks for)",
                     fontsize=9)
        return fig
    if actual.ndim in (2, 3):  # [sample][feature] or [sample][channel][length]
        flat_a = actual.reshape(actual.shape[0], -1)
        flat_t = target.reshape(target.shape[0], -1)
        fig = _figure(9.0, 0.5 + 1.7 * s)
        axes = fig.subplots(s, 1, squeeze=False)[:, 0]
        for i in range(s):
            ax = axes[i]
            x = np.arange(flat_a.shape[1])
            if actual.ndim == 2 and len(fm.get("channels") or ()) == len(x):
                x = np.asarray(fm["channels"])  # feature indices, when a subset was kept
            style = {"marker": ".", "markersize": 3} if len(x) <= 128 else {}
            ax.plot(x, flat_a[i], color=BEFORE, linewidth=1, label="actual", **style)
            ax.plot(x, flat_t[i], color=AFTER, linewidth=1, label="target", **style)
            ax.set_ylabel(sample_title(i), fontsize=7)
            ax.spines[["top", "right"]].set_visible(False)
        axes[0].legend(fontsize=8, ncols=2, loc="upper right")
        axes[-1].set_xlabel("feature")
        fig.suptitle(f"{name} ({fm['op']}): output vs reconstructed target", fontsize=9)
        return fig
    return None


# ---------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;
background:#f6f7f9;color:#1f2933}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d5dae0;padding-bottom:4px}
.sub{color:#52606d;font-size:13px;margin:0 0 16px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d5dae0;border-radius:8px;padding:10px 14px;min-width:150px}
.card .k{font-size:12px;color:#52606d}.card .v{font-size:20px;font-weight:600}
.up{color:#16a34a}.down{color:#dc2626}
figure{background:#fff;border:1px solid #d5dae0;border-radius:8px;margin:12px 0;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:12px;color:#52606d;margin-top:4px}
table{border-collapse:collapse;background:#fff;font-size:12.5px;margin:8px 0;width:100%}
th,td{border:1px solid #d5dae0;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef1f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kept{color:#16a34a;font-weight:600}.reverted{color:#b45309;font-weight:600}
.note{background:#fffbea;border:1px solid #f0d78c;border-radius:6px;padding:8px 12px;font-size:13px}
details{margin:8px 0}summary{cursor:pointer;color:#334e68}
code{font-size:12px}
.grid2{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,3fr);gap:12px;align-items:start}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(fig: Any, alt: str, caption: str = "") -> str:
    data = _png(fig)
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _num(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           numeric: Sequence[int] = (), total: int | None = None) -> str:
    """An HTML table of at most MAX_TABLE_ROWS rows; a note counts the rest (of
    ``total`` rows, when the caller built only the first ones)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    left_out = max((len(rows) if total is None else total) - MAX_TABLE_ROWS, 0)
    for row in rows[:MAX_TABLE_ROWS]:
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    note = (f'<p class="note">{left_out} more row(s) not shown: the page lists the first '
            f"{MAX_TABLE_ROWS}; the JSON report has them all.</p>" if left_out else "")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + note)


def _kv_table(d: dict[str, Any]) -> str:
    rows = [[_e(k), _e(json.dumps(v) if isinstance(v, (list, dict)) else v)] for k, v in d.items()]
    return _table(["key", "value"], rows)


def _delta(before: float, after: float) -> str:
    d = after - before
    cls = "up" if d > 0 else "down" if d < 0 else ""
    return f'<span class="{cls}">{d:+.4f}</span>'


def _cards(report: dict[str, Any]) -> str:
    cards = []
    for label, before, after in _splits(report):
        cards.append(
            f'<div class="card"><div class="k">{_e(label)} accuracy (n={before["n"]})</div>'
            f'<div class="v">{before["accuracy"]:.4f} → {after["accuracy"]:.4f}</div>'
            f'<div class="k">{_delta(before["accuracy"], after["accuracy"])}</div></div>'
        )
    kept = sorted({v["name"] for v in report["layers"] if v["accepted"]})
    sweeps = len({v["sweep"] for v in report["layers"]})
    cards.append(f'<div class="card"><div class="k">layers changed</div>'
                 f'<div class="v">{len(kept)}</div>'
                 f'<div class="k">{len(report["layers"])} visits in {sweeps} sweep(s)</div></div>')
    total = report["timings"].get("total")
    env = report["environment"]
    cards.append(f'<div class="card"><div class="k">time</div><div class="v">'
                 f'{_num(total, ".1f")}s</div><div class="k">{_e(env["device"])}: '
                 f'{_e(", ".join(env["providers"]))}</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _layer_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in report["layers"][:MAX_TABLE_ROWS]:  # the table shows no more
        rb, ra = v["residual_before"], v["residual_after"]
        drop = (f" ({(ra - rb) / rb:+.1%})" if rb and ra is not None and math.isfinite(rb)
                and math.isfinite(ra) else "")
        word = v.get("outcome") or ("kept" if v["accepted"] else "reverted")
        outcome = (f'<span class="{"kept" if word == "kept" else "reverted"}">'
                   f'{_e(word)}</span> {_e(v["reason"])}')
        rows.append([
            str(v["sweep"] + 1), f"<code>{_e(v['name'])}</code>", _e(v["op"]),
            _e("×".join(str(d) for d in v["weight_shape"])), _num(v["lam"], ".3g"),
            _num(v["relative_change"], ".4f"), f"{_num(rb)} → {_num(ra)}{drop}",
            _num(v["heldout_accuracy"], ".4f"), outcome, _num(v["seconds"], ".2f"),
        ])
    return rows


def _per_class_table(report: dict[str, Any]) -> str:
    splits = [s for s in _splits(report) if s[1]["per_class"] and s[2]["per_class"]]
    if not splits:
        return ""
    k = max(len(s[1]["per_class"]) for s in splits)
    names = _class_names(report, k)
    header = ["class"] + [f"{lab} {when}" for lab, _, _ in splits for when in ("before", "after")]
    rows = []
    for c in range(k):
        row = [_e(names[c])]
        for _, before, after in splits:
            for res in (before, after):
                pc = res["per_class"]
                row.append(_num(pc[c], ".4f") if c < len(pc) else "–")
        rows.append(row)
    return _table(header, rows, numeric=range(1, len(header)))


def build_html(report: dict[str, Any], *, title: str | None = None, source: str | None = None,
               max_samples: int = 3, max_channels: int = 6, max_feature_layers: int = 6) -> str:
    """One self-contained HTML page for a (validated) report."""
    parts: list[str] = []
    title = title or "onnxfbp refine report"
    sub = []
    if source:
        sub.append(f"report: {_e(source)}")
    if report.get("model"):
        sub.append(f"model: {_e(report['model'])}")
    sub.append(f"refined model: {_e(report['written'] or '(not written)')}")
    sub.append(f"schema {_e(report['schema'])}")
    sub.append(f"rendered {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    parts.append(f"<h1>{_e(title)}</h1><p class=\"sub\">{' · '.join(sub)}</p>")
    parts.append(_cards(report))

    parts.append("<h2>Accuracy</h2>")
    acc = _img(_fig_accuracy(report), "accuracy before and after",
               "held-out: the part of the adaptation data set aside for choices; "
               "eval: the separate evaluation data, when given; "
               "retain: the held-out original-domain data, when given")
    per_class = _fig_per_class(report)
    pc_img = _img(per_class, "per-class accuracy before and after") if per_class is not None else ""
    parts.append(f'<div class="grid2"><div>{acc}</div><div>{pc_img}</div></div>')
    table = _per_class_table(report)
    if table:
        parts.append(f"<details><summary>per-class accuracy table</summary>{table}</details>")

    parts.append("<h2>Confusion matrices</h2>")
    conf = _fig_confusions(report)
    if conf is None:
        parts.append('<p class="note">This report has no confusion matrices.</p>')
    else:
        parts.append(_img(conf, "confusion matrices before and after",
                          "rows: true class, columns: predicted class; colour: fraction of the "
                          "row; change: after − before counts, green where the refined model is "
                          "better"))

    parts.append("<h2>Layers</h2>")
    layer_fig = _fig_layers(report)
    if layer_fig is None:
        parts.append('<p class="note">No layer was visited.</p>')
    else:
        n_visits = len(report["layers"])
        parts.append(_img(layer_fig, "per-layer residual and weight change",
                          "residual: squared distance of the layer's output to its reconstructed "
                          "target per held-out row (log scale); hatched: candidate reverted"
                          + (f"; the last {MAX_FIGURE_VISITS} of {n_visits} visits"
                             if n_visits > MAX_FIGURE_VISITS else "")))
        if n_visits > MAX_TABLE_ROWS:
            parts.append(f'<p class="note">{n_visits} layer visits: the table lists the first '
                         f"{MAX_TABLE_ROWS}.</p>")
        parts.append(_table(
            ["sweep", "layer", "op", "weight", "lam", "rel. change", "residual before → after",
             "held-out acc", "outcome", "s"], _layer_rows(report), numeric=(0, 4, 5, 7, 9),
            total=len(report["layers"])))
    plan = report["plan"]
    plan_rows = [[f"<code>{_e(p['name'])}</code>", _e(p["op"]),
                  '<span class="kept">yes</span>' if p["refined"] else "no",
                  _e(p.get("outcome") or ""), _e(p["reason"] or "")]
                 for p in plan["layers"]]
    parts.append("<details><summary>all parametric layers of the graph "
                 f"({len(plan_rows)})</summary>"
                 + _table(["layer", "op", "refined", "outcome", "why not"], plan_rows)
                 + (f"<p>transitional boundaries: {_e('; '.join(plan['boundaries']))}</p>"
                    if plan["boundaries"] else "") + "</details>")

    parts.append("<h2>Feature maps</h2>")
    fmaps = report.get("feature_maps") or {}
    if not fmaps:
        parts.append('<p class="note">This report has no feature maps (<code>feature_maps</code> '
                     "is absent): it was written by an onnxfbp that does not record them.</p>")
    for i, (name, fm) in enumerate(fmaps.items()):
        if i >= max_feature_layers:
            parts.append(f'<p class="note">{len(fmaps) - i} more layer(s) not drawn.</p>')
            break
        fig = _fig_feature_map(name, fm, max_samples, max_channels)
        if fig is None:
            shape = list(np.asarray(fm["actual"]).shape)
            parts.append(f'<p class="note">{_e(name)}: cannot draw a feature map of shape '
                         f"{shape}.</p>")
        else:
            parts.append(_img(fig, f"feature maps of {name}",
                              f"{name}: layer output (actual) next to the target reconstructed "
                              "from the labels"))

    parts.append("<h2>Time</h2>")
    tfig = _fig_timings(report)
    if tfig is not None:
        parts.append(_img(tfig, "time per phase"))
    parts.append("<h2>Environment</h2>")
    parts.append(_kv_table(report["environment"]))
    parts.append("<details><summary>configuration</summary>" + _kv_table(report["config"])
                 + "</details>")

    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )


def render_html(report_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                force: bool = False, **options: Any) -> Path:
    """Read the JSON report at ``report_path`` and write one self-contained HTML file.

    The output follows the path rules of :mod:`onnxfbp.paths` (an existing file only
    with ``force``, never a link, device or FIFO, never the report itself) and is
    placed whole or not at all. Raises :class:`ReportError` for a missing or
    malformed report and :class:`OutputError` when the HTML cannot be written.
    """
    from ..paths import (  # noqa: PLC0415
        Commit,
        check_destination,
        check_distinct,
        remove_stale_staging,
    )

    report_path, output_path = Path(report_path), Path(output_path)
    if os.path.exists(output_path) and os.path.exists(report_path) \
            and output_path.resolve() == report_path.resolve():
        raise OutputError(f"output {output_path} is the report itself; choose another -o path")
    if os.path.isdir(output_path):
        raise OutputError(f"output {output_path} is a directory; give a file name such as "
                          "report.html")
    if not os.path.isdir(output_path.parent):
        raise OutputError(f"cannot write {output_path}: directory {output_path.parent} "
                          "does not exist")
    check_distinct([(output_path, "output")], [(report_path, "the report itself")])
    check_destination(output_path, "output", force, "choose another -o path")
    report = load_report(report_path)
    page = build_html(report, source=str(report_path), **options)
    remove_stale_staging([output_path])
    with Commit(force) as commit:
        staged = commit.stage(output_path, main=True)
        try:
            staged.write_text(page, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {output_path}: {exc.strerror or exc}") from None
        commit.commit()
    return output_path
