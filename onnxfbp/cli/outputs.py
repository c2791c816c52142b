"""The CLI's options for what is trained (``--target``, ``--target-weight``,
``--task``, ``--loss``) and the ``eval --json`` payload of each output."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ConfigError

__all__ = ["eval_line", "eval_payload", "heldout_line", "task_options", "target_settings"]


def target_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``output_name``, ``targets`` and ``target_weights`` settings from ``--output-name``,
    ``--target OUTPUT=KEY`` (repeatable) and ``--target-weight OUTPUT=W``."""
    from ..fit.tasks import parse_pairs  # noqa: PLC0415

    pairs = parse_pairs(getattr(args, "target", None) or [], "--target")
    weights = parse_pairs(getattr(args, "target_weight", None) or [], "--target-weight")
    out: dict[str, Any] = {"output_name": getattr(args, "output_name", None)}
    if pairs:
        out["output_name"] = pairs[0][0]
        out["targets"] = tuple(f"{o}={k}" for o, k in pairs)
    if weights:
        out["target_weights"] = tuple(f"{o}={_weight(w)}" for o, w in weights)
    return out


def task_options(p: argparse.ArgumentParser, weights: bool = False) -> None:
    """``--target``, ``--task`` and ``--loss`` (refine and eval); ``--target-weight``
    with ``weights`` (refine)."""
    p.add_argument("--target", action="append", metavar="OUTPUT=KEY",
                   help="train OUTPUT on the labels under KEY in the data files (default: "
                        "the first output, labels 'y'); repeatable")
    p.add_argument("--task", choices=("classification", "dense", "binary", "regression"),
                   help="the task, when the labels and the output leave it ambiguous "
                        "(default: from them)")
    p.add_argument("--loss", choices=("mse", "l1", "huber"), default=None,
                   help="regression loss (default mse)")
    if weights:
        p.add_argument("--target-weight", action="append", metavar="OUTPUT=W",
                       help="weight of that target's loss (default 1; repeatable)")


def eval_payload(result: Any, name: str) -> dict[str, Any]:
    """``{"outputs": {NAME: {"task", "n", metrics...}}}``; a single classification
    output also keeps today's top-level ``accuracy``, ``n``, ``loss``, ``per_class``."""
    if result.task is None:
        return {"accuracy": result.accuracy, "n": result.n, "loss": result.loss,
                "per_class": result.per_class,
                "outputs": {name: {"task": "classification", "n": result.n,
                                   "accuracy": result.accuracy, "loss": result.loss}}}
    if result.task == "multi":
        return {"outputs": dict((result.metrics or {}).get("outputs", {}))}
    return {"outputs": {name: dict(result.metrics or {})}}


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--target-weight {text!r} is not a positive number; "
                          "write OUTPUT=W with W > 0")
    return value


def heldout_line(before: Any, after: Any, split: str = "held-out") -> str:
    """The held-out (or ``eval``) line of ``refine``: accuracy, or the task's metrics."""
    if before.task is None:
        head = "held-out accuracy:" if split == "held-out" else f"{split} accuracy:    "
        return f"{head} {before.accuracy:.4f} -> {after.accuracy:.4f} (n={before.n})"
    from ..fit.tasks import metric_line  # noqa: PLC0415

    return f"{split} {metric_line(before, after)}"


def eval_line(result: Any, name: str) -> str:
    """The line of ``eval`` without ``--json``."""
    if result.task is None:
        return f"accuracy {result.accuracy:.4f} on {result.n} samples"
    from ..fit.tasks import metric_line  # noqa: PLC0415

    return f"{name}: {metric_line(result)}"
