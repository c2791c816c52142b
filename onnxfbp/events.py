"""Progress of a refine run as typed events; :mod:`onnxfbp.cli.progress` renders them.

The pipeline calls ``progress(event)`` (a ``Callable[[Event], None]``) with:

- :class:`Message`: a note in words (boundaries, few held-out samples, the
  reverse pass falling back to arrays);
- :class:`LayerVisited`: one layer's update judged (its :class:`LayerReport`);
- :class:`StepChecked`: a held-out check of the minibatch schedule;
- :class:`StepBackedOff`: a minibatch blow-up, back to the kept weights with a
  smaller step;
- :class:`ShardsDone`: on a Dask cluster, the shards of a pass done so far and
  the workers busy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from .output.results import LayerReport

__all__ = ["Event", "LayerVisited", "Message", "Progress", "ShardsDone", "StepBackedOff",
           "StepChecked"]


@dataclass(frozen=True)
class Message:
    text: str


@dataclass(frozen=True)
class LayerVisited:
    report: LayerReport


@dataclass(frozen=True)
class StepChecked:
    """Held-out accuracy and mean loss of the minibatch ``step`` of ``total``."""

    step: int
    total: int
    accuracy: float
    loss: float


@dataclass(frozen=True)
class StepBackedOff:
    """At minibatch ``step``: ``why``; the step scale is now ``lr``."""

    step: int
    why: str
    lr: float


@dataclass(frozen=True)
class ShardsDone:
    """On a cluster: ``done`` of ``total`` tasks of a ``phase`` (sums, scores,
    features, validate, ...) finished; ``busy`` workers still running tasks."""

    phase: str
    done: int
    total: int
    busy: int


Event = Union[Message, LayerVisited, StepChecked, StepBackedOff, ShardsDone]  # noqa: UP007
Progress = Callable[[Event], None]
