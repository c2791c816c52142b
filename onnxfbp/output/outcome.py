"""What a run changed, in plain words: the lines the CLI prints after the figures
and the HTML report shows under its header, from the report's ``plan``,
``data`` and ``warnings`` (the same for a result in memory and a report read
back)."""

from __future__ import annotations

from typing import Any

__all__ = ["outcome_lines"]


def outcome_lines(plan: dict[str, Any] | None, data: dict[str, Any] | None,
                  warnings: list[str] | None) -> list[str]:
    """Layers changed, layers reverted or left unchanged and why (the plan's
    ``changed`` is the truth: the weights differ from the input model's), whether
    the output layer alone carries the gain, what the blend back kept, whether
    the schedule ran a second time with the retain samples anchored, and the
    run's warnings."""
    rows = [p for p in (plan or {}).get("layers", []) if p.get("selected", p["refined"])]
    changed = [p["name"] for p in rows if p.get("changed", p["refined"])]
    lines = [f"layers changed ({len(changed)} of {len(rows)}): "
             + (", ".join(changed) if changed else "none")]
    for p in rows:
        if not p.get("changed", p["refined"]):
            lines.append(f"  {p.get('outcome') or 'unchanged'}: {p['name']} "
                         f"({p.get('reason') or 'no update kept'})")
    if len(rows) > 1 and changed == [rows[-1]["name"]]:  # plan order: the output layer last
        lines.append("only the output layer changed: it alone carries the gain")
    data = data or {}
    if (blend := data.get("blend")) is not None:
        what = "change" if blend["of"] == "kept" else "best change regardless of the retain bound"
        lines.append(f"blended back: {blend['a']:g} of the schedule's {what} kept")
    if second := ((data.get("retain") or {}).get("anchor") or {}).get("second_run"):
        lines.append(f"retain bound: ran the schedule again with the retain samples anchored, "
                     f"kept the {second['kept']} run (held-out "
                     f"{second['anchored_heldout_accuracy']:.4f} anchored, "
                     f"{second['first_heldout_accuracy']:.4f} first)")
    lines.extend(warnings or [])  # shown even with --quiet
    return lines
