"""The HTML report: one self-contained page from a JSON report (figures as base64
PNG from :mod:`onnxfbp.output.figures`, inline styles, nothing fetched, every
value escaped). ``onnxfbp report REPORT.json -o report.html`` calls
:func:`render_html`."""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from .figures import (
    MAX_FIGURE_VISITS,
    MAX_TABLE_ROWS,
    class_names,
    fig_accuracy,
    fig_confusions,
    fig_feature_map,
    fig_layers,
    fig_per_class,
    fig_task,
    fig_timings,
    measured_splits,
    png,
    split_figure,
)
from .outcome import outcome_lines
from .report import load_report

__all__ = ["build_html", "render_html"]

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
    data = png(fig)
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
    for label, before, after in measured_splits(report):
        name, b = split_figure(before)
        a = split_figure(after)[1]
        cards.append(
            f'<div class="card"><div class="k">{_e(label)} {_e(name)} (n={before["n"]})</div>'
            f'<div class="v">{b:.4f} → {a:.4f}</div>'
            f'<div class="k">{_delta(b, a)}</div></div>'
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
    splits = [s for s in measured_splits(report) if s[1]["per_class"] and s[2]["per_class"]]
    if not splits:
        return ""
    k = max(len(s[1]["per_class"]) for s in splits)
    names = class_names(report, k)
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


def _header(report: dict[str, Any], title: str, source: str | None) -> str:
    sub = []
    if source:
        sub.append(f"report: {_e(source)}")
    if report.get("model"):
        sub.append(f"model: {_e(report['model'])}")
    sub.append(f"refined model: {_e(report['written'] or '(not written)')}")
    sub.append(f"schema {_e(report['schema'])}")
    sub.append(f"rendered {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    said = outcome_lines(report.get("plan"), report.get("data"), report.get("warnings"))
    outcome = "<ul class=\"outcome\">" + "".join(f"<li>{_e(x)}</li>" for x in said) + "</ul>"
    return (f"<h1>{_e(title)}</h1><p class=\"sub\">{' · '.join(sub)}</p>" + _cards(report)
            + outcome)


def _accuracy_section(report: dict[str, Any]) -> list[str]:
    parts = ["<h2>Accuracy</h2>"]
    acc = _img(fig_accuracy(report), "accuracy before and after",
               "held-out: the part of the adaptation data set aside for choices; "
               "eval: the separate evaluation data, when given; "
               "retain: the held-out original-domain data, when given")
    per_class = fig_per_class(report)
    pc_img = _img(per_class, "per-class accuracy before and after") if per_class is not None else ""
    parts.append(f'<div class="grid2"><div>{acc}</div><div>{pc_img}</div></div>')
    table = _per_class_table(report)
    if table:
        parts.append(f"<details><summary>per-class accuracy table</summary>{table}</details>")
    parts.append("<h2>Confusion matrices</h2>")
    conf = fig_confusions(report)
    if conf is None:
        parts.append('<p class="note">This report has no confusion matrices.</p>')
    else:
        parts.append(_img(conf, "confusion matrices before and after",
                          "rows: true class, columns: predicted class; colour: fraction of the "
                          "row; change: after − before counts, green where the refined model is "
                          "better"))
    return parts


def _layers_section(report: dict[str, Any]) -> list[str]:
    parts = ["<h2>Layers</h2>"]
    layer_fig = fig_layers(report)
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
    return parts


def _feature_maps_section(report: dict[str, Any], max_samples: int, max_channels: int,
                          max_feature_layers: int) -> list[str]:
    parts = ["<h2>Feature maps</h2>"]
    fmaps = report.get("feature_maps") or {}
    if not fmaps:
        parts.append('<p class="note">This report has no feature maps (<code>feature_maps</code> '
                     "is absent): it was written by an onnxfbp that does not record them.</p>")
    for i, (name, fm) in enumerate(fmaps.items()):
        if i >= max_feature_layers:
            parts.append(f'<p class="note">{len(fmaps) - i} more layer(s) not drawn.</p>')
            break
        fig = fig_feature_map(name, fm, max_samples, max_channels)
        if fig is None:
            shape = list(np.asarray(fm["actual"]).shape)
            parts.append(f'<p class="note">{_e(name)}: cannot draw a feature map of shape '
                         f"{shape}.</p>")
        else:
            parts.append(_img(fig, f"feature maps of {name}",
                              f"{name}: layer output (actual) next to the target reconstructed "
                              "from the labels"))
    return parts


def _task_section(report: dict[str, Any]) -> list[str]:
    """Per trained output that is not a classifier: its ``task_figures`` drawn."""
    figures = report.get("task_figures") or {}
    if not figures:
        return []
    parts = ["<h2>Outputs</h2>"]
    for name, tf in figures.items():
        fig = fig_task(name, tf)
        if fig is None:
            parts.append(f'<p class="note">{_e(name)}: cannot draw a {_e(tf["task"])} '
                         "output of this shape.</p>")
            continue
        caption = ("predicted vs true values; grey: the input model, blue: the refined "
                   "model; dashed: y = x" if tf["task"] == "regression" else
                   "per sample: the input's first channel, the true mask, the input "
                   "model's and the refined model's predicted masks")
        parts.append(_img(fig, f"{tf['task']} output {name} before and after",
                          f"{name} ({tf['task']}, {tf['split']}, samples "
                          f"{len(tf['samples'])}): {caption}"))
    return parts


def build_html(report: dict[str, Any], *, title: str | None = None, source: str | None = None,
               max_samples: int = 3, max_channels: int = 6, max_feature_layers: int = 6) -> str:
    """One self-contained HTML page for a (validated) report."""
    title = title or "onnxfbp refine report"
    parts = [_header(report, title, source), *_accuracy_section(report),
             *_task_section(report),
             *_layers_section(report),
             *_feature_maps_section(report, max_samples, max_channels, max_feature_layers),
             "<h2>Time</h2>"]
    tfig = fig_timings(report)
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
