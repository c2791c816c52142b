"""Warnings on suspicious data: plain sentences, never errors.

- :func:`label_warnings`: a class missing from the adaptation labels, or holding
  under ``min_share`` (1 %) of them: the refined model sees (almost) no example
  of it and may forget it.
- :func:`input_range_warning`: the adaptation inputs lie far outside the range of
  the retain data's inputs (what the first layer saw when it was trained): often a
  preprocessing mismatch (0-255 against 0-1, a missing normalization).

Each returns the warning lines; :func:`announce` sends them to the progress
callback as :class:`Message` events (the report keeps them under ``warnings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import LabelledData
from .events import Message, Progress

__all__ = ["InputStats", "announce", "input_range_warning", "label_warnings"]

MIN_SHARE = 0.01  # a class below this share of the adaptation labels is warned about


def label_warnings(data: LabelledData, n_classes: int | None,
                   min_share: float = MIN_SHARE) -> list[str]:
    """Classes (of ``0 .. n_classes - 1``) missing from ``data``'s labels or holding
    under ``min_share`` of them; an empty list when every class is there enough."""
    labels = data.labels()
    n = len(labels)
    if n == 0:
        return []
    k = max(int(n_classes or 0), int(labels.max(initial=-1)) + 1)
    counts = np.bincount(labels, minlength=k)
    missing = [c for c in range(k) if counts[c] == 0]
    rare = [c for c in range(k) if 0 < counts[c] < min_share * n]
    out = []
    if missing:
        out.append(f"warning: class{'es' if len(missing) > 1 else ''} "
                   f"{_classes(missing)} missing from the {n} adaptation labels; the refined "
                   "model may forget them: add labelled samples of every class")
    if rare:
        detail = ", ".join(f"{c}: {counts[c]}" for c in rare)
        out.append(f"warning: class{'es' if len(rare) > 1 else ''} below {min_share:.0%} of "
                   f"the {n} adaptation labels ({detail}); the refined model may forget "
                   f"{'them' if len(rare) > 1 else 'it'}: add labelled samples")
    return out


def _classes(classes: Sequence[int]) -> str:
    shown = ", ".join(str(c) for c in classes[:20])
    return shown + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")


@dataclass(frozen=True)
class InputStats:
    """Summary of input values: count, minimum, maximum, mean and standard deviation."""

    n: int
    low: float
    high: float
    mean: float
    std: float

    @classmethod
    def of(cls, x: np.ndarray) -> InputStats:
        """The statistics of every value of ``x`` (non-finite values left out)."""
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if not len(v):
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        return cls(len(v), float(v.min()), float(v.max()), float(v.mean()), float(v.std()))


def input_range_warning(adapt: InputStats, retain: InputStats) -> str | None:
    """A warning when the adaptation inputs are far outside the retain inputs'
    range, else None. Far outside: the adaptation mean is more than 3 retain
    standard deviations from the retain mean, or the adaptation range reaches
    beyond the retain range by more than the retain range's width."""
    if adapt.n == 0 or retain.n == 0:
        return None
    width = max(retain.high - retain.low, 1e-12)
    spread = max(retain.std, 1e-12)
    off_mean = abs(adapt.mean - retain.mean) > 3 * spread
    off_range = adapt.low < retain.low - width or adapt.high > retain.high + width
    if not (off_mean or off_range):
        return None
    return (f"warning: adaptation inputs lie far outside the retain data's range (mean "
            f"{adapt.mean:.4g} against {retain.mean:.4g} +- {retain.std:.3g}; values "
            f"[{adapt.low:.4g}, {adapt.high:.4g}] against [{retain.low:.4g}, "
            f"{retain.high:.4g}]); check that both get the same preprocessing")


def range_warnings(data: LabelledData, retain: LabelledData | None,
                   sample: int = 512) -> list[str]:
    """:func:`input_range_warning` on the first ``sample`` inputs of the adaptation
    and the retain data (none without retain data)."""
    if retain is None:
        return []
    stats = [InputStats.of(d.take(np.arange(min(len(d), sample)))[0]) for d in (data, retain)]
    line = input_range_warning(*stats)
    return [line] if line else []


def announce(lines: list[str], progress: Progress) -> list[str]:
    """Send each warning line to ``progress`` as a :class:`Message`; returns ``lines``."""
    for line in lines:
        progress(Message(line))
    return lines
