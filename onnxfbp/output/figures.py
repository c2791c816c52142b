"""The figures of the HTML report, drawn with matplotlib (Agg) and returned as
figures for :mod:`onnxfbp.output.html` to embed as base64 PNG: accuracy before
and after, per class, confusion matrices, layer visits, time per phase and
feature maps next to their reconstructed targets, and per trained output that is
not a classifier predicted vs true values or masks before and after. Each draws a bounded amount,
whatever the report's size."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np

BEFORE, AFTER = "#9aa5b1", "#2563eb"
KEPT, REVERTED = "#16a34a", "#d97706"
IGNORE_SHOWN = 255  # a dense label the metrics ignore: left blank in the masks


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def measured_splits(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, before, after) for held-out, eval and retain, where measured."""
    out = [("held-out", report["heldout"]["before"], report["heldout"]["after"])]
    ev = report.get("eval")
    if ev is not None and ev.get("after") is not None:
        out.append(("eval", ev["before"], ev["after"]))
    kept = report.get("retain")
    if isinstance(kept, dict) and kept.get("after") is not None:
        out.append(("retain", kept["before"], kept["after"]))
    return out


def class_names(report: dict[str, Any], k: int) -> list[str]:
    names = report.get("class_names") or report["plan"].get("class_names")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    return [str(i) for i in range(k)]


def split_figure(result: dict[str, Any]) -> tuple[str, float]:
    """The figure a split is judged by: its accuracy, or for another task the
    gate's metric (``mean_iou``, ``mae``, ``loss``; NaN when absent)."""
    from ..fit.tasks import GATE_METRIC  # noqa: PLC0415

    task = result.get("task")
    if task is None:
        return "accuracy", float(result["accuracy"])
    name = GATE_METRIC.get(task, ("loss", True))[0]
    value = (result.get("metrics") or {}).get(name)
    return name, float("nan") if value is None else float(value)


def fig_accuracy(report: dict[str, Any]) -> Any:
    splits = measured_splits(report)
    fig = _figure(1.6 + 1.5 * len(splits), 4.4)
    ax = fig.add_subplot()
    x = np.arange(len(splits))
    for offset, which, color, label in ((-0.2, 1, BEFORE, "before"), (0.2, 2, AFTER, "after")):
        values = [split_figure(s[1] if which == 1 else s[2])[1] for s in splits]
        bars = ax.bar(x + offset, values, 0.38, color=color, label=label)
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center",
                    va="bottom", fontsize=9)
    ax.set_xticks(x, [f"{s[0]}\n(n={s[1]['n']})" for s in splits])
    ax.set_ylim(0, 1.12)
    figure = split_figure(splits[0][1])[0] if splits else "accuracy"
    ax.set_ylabel(figure)
    ax.set_title(f"{figure} before / after")
    ax.legend(loc="lower right", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def fig_per_class(report: dict[str, Any]) -> Any | None:
    splits = [s for s in measured_splits(report) if s[1]["per_class"] and s[2]["per_class"]]
    if not splits:
        return None
    k = max(len(s[1]["per_class"]) for s in splits)
    fig = _figure(max(6.5, min(14.0, 2.0 + 0.45 * k)), 0.3 + 2.4 * len(splits))
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    names = class_names(report, k)
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


def fig_confusions(report: dict[str, Any]) -> Any | None:
    splits = [s for s in measured_splits(report) if s[1]["confusion"] and s[2]["confusion"]]
    if not splits:
        return None
    k = len(splits[0][1]["confusion"])
    cell = 0.34 if k <= 12 else max(0.06, 4.0 / k)
    side = min(max(2.6, cell * k + 1.0), 9.0)  # big k: one pixel per cell at most
    fig = _figure(3 * side + 0.6, side * len(splits) + 0.4)
    axes = fig.subplots(len(splits), 3, squeeze=False)
    names = class_names(report, k)
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


def fig_layers(report: dict[str, Any]) -> Any | None:
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

    base = split_figure(report["heldout"]["before"])[1]
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


def fig_timings(report: dict[str, Any]) -> Any | None:
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


def fig_feature_map(name: str, fm: dict[str, Any], max_samples: int,
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


def fig_task(name: str, tf: dict[str, Any]) -> Any | None:
    """A trained output's ``task_figures`` entry: predicted vs true (regression,
    one panel per stored value, with y = x), or per sample the input, the true
    mask and the predicted masks before and after (dense, binary)."""
    true = np.asarray(tf["true"], dtype=np.float64)
    before = np.asarray(tf["before"], dtype=np.float64)
    after = np.asarray(tf["after"], dtype=np.float64)
    if tf["task"] == "regression" and true.ndim == 2:
        d = true.shape[1]
        fig = _figure(0.6 + 3.3 * d, 3.6)
        axes = fig.subplots(1, d, squeeze=False)[0]
        for j, ax in enumerate(axes):
            t = true[:, j]
            lo = float(min(t.min(), before[:, j].min(), after[:, j].min()))
            hi = float(max(t.max(), before[:, j].max(), after[:, j].max()))
            ax.plot([lo, hi], [lo, hi], color="#52606d", linewidth=0.8, linestyle="--",
                    label="y = x")
            for pred, color, what in ((before[:, j], BEFORE, "before"),
                                      (after[:, j], AFTER, "after")):
                mae = float(np.abs(pred - t).mean())
                ax.scatter(t, pred, s=6, alpha=0.6, color=color, label=f"{what} (MAE {mae:.3g})")
            ax.set_xlabel(f"true value {j}" if d > 1 else "true", fontsize=8)
            ax.set_ylabel("predicted", fontsize=8)
            ax.legend(fontsize=7, loc="upper left")
            ax.spines[["top", "right"]].set_visible(False)
        fig.suptitle(f"{name}: predicted vs true, {tf['split']} (n={len(true)})", fontsize=9)
        return fig
    if tf["task"] in ("dense", "binary") and true.ndim == 3:
        image = tf.get("input")
        cols = ([("input", np.asarray(image, dtype=np.float64))] if image is not None else []) \
            + [("true", true), ("before", before), ("after", after)]
        s = len(true)
        fig = _figure(0.4 + 2.0 * len(cols), 0.5 + 2.0 * s)
        axes = fig.subplots(s, len(cols), squeeze=False)
        top = max(float(np.where(true == IGNORE_SHOWN, 0, true).max(initial=1)),
                  float(before.max(initial=1)), float(after.max(initial=1)), 1.0)
        for i in range(s):
            for j, (what, arr) in enumerate(cols):
                ax = axes[i, j]
                if what == "input":
                    ax.imshow(arr[i], cmap="gray", interpolation="nearest")
                else:
                    mask = np.ma.masked_equal(arr[i], IGNORE_SHOWN)
                    ax.imshow(mask, cmap="tab20" if tf["task"] == "dense" else "gray",
                              vmin=0, vmax=top, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(what, fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"sample {tf['samples'][i]}", fontsize=8)
        fig.suptitle(f"{name}: masks, {tf['split']}"
                     + (" (classes; blank: ignored)" if tf["task"] == "dense" else ""),
                     fontsize=9)
        return fig
    return None


# ---------------------------------------------------------------------------- HTML

