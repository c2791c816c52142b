"""The reference reverse pass: the inverse rules (or their linearizations) node
by node, on arrays of NumPy or CuPy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph.plan import Layer, Plan
from ..rules import RULES, Array

__all__ = ["reverse", "reverse_target"]


def reverse(
    plan: Plan,
    acts: Mapping[str, Array],
    t_logits: Array,
    path: list[int],
    views: Mapping[str, Any],
    mu: float,
    linearized: bool = False,
) -> tuple[dict[str, Array], dict[str, int]]:
    """Carry the logits target back through the nodes ``path`` (indices into
    plan.nodes, forward order) with the inverse rules (proximal weight ``mu``).
    Returns, per tensor, the summed target residuals of its consumers and their
    count (targets average). A node without an inverse (``PlanNode.inverse``)
    passes the mean residual by its linearization (:meth:`vjp`); the sweep
    schedules' paths have none (:func:`onnxfbp.schedules.state.nodes_after`),
    the reconstructed targets of the report may.

    ``linearized``: each rule's :meth:`vjp` instead, and the residuals of several
    consumers add up (count 1): the residual at each tensor is ``-dL/dx`` for
    the loss whose negative gradient at the logits is the logits residual."""
    if isinstance(t_logits, Mapping):  # several trained outputs: a target each
        sums: dict[str, Array] = {k: t - acts[k] for k, t in t_logits.items()}
    else:
        sums = {plan.logits: t_logits - acts[plan.logits]}
    counts: dict[str, int] = dict.fromkeys(sums, 1)
    for i in reversed(path):
        pn = plan.nodes[i]
        out = pn.outputs[0]
        rule = RULES[pn.op]
        if rule.multi_output:  # one residual per output (None: none reached it)
            if not any(o in sums for o in pn.outputs):
                continue
            xs = [acts[pn.inputs[j]] for j in pn.data_inputs]
            r_all = [sums[o] / (1 if linearized else counts[o]) if o in sums else None
                     for o in pn.outputs]
            deltas = rule.vjp(views[pn.name], r_all, xs, [acts.get(o) for o in pn.outputs])
            _add(sums, counts, pn.inputs, pn.data_inputs, deltas, linearized)
            continue
        if out not in sums:
            continue
        o0 = acts[out]
        xs = [acts[pn.inputs[j]] for j in pn.data_inputs]
        if linearized or pn.inverse is not None:  # (no inverse: its linearization)
            r = sums[out] if linearized else sums[out] / counts[out]
            deltas = rule.vjp(views[pn.name], r, xs, o0)
        else:
            t = o0 + sums[out] / counts[out]
            new = rule.inverse(views[pn.name], t, xs, o0, mu)
            deltas = [x_t - x0 for x_t, x0 in zip(new, xs, strict=True)]
        _add(sums, counts, pn.inputs, pn.data_inputs, deltas, linearized)
    return sums, counts


def _add(
    sums: dict[str, Array], counts: dict[str, int], inputs: list[str],
    data_inputs: tuple[int, ...], deltas: list[Array], linearized: bool,
) -> None:
    """Add each data input's residual to what its other consumers gave it (fan-out:
    a tensor read by several path nodes, or twice by one, sums them all)."""
    for j, delta in zip(data_inputs, deltas, strict=True):
        name = inputs[j]
        sums[name] = sums.get(name, 0) + delta
        counts[name] = 1 if linearized else counts.get(name, 0) + 1


def reverse_target(
    plan: Plan,
    acts: Mapping[str, Array],
    t_logits: Array,
    layer: Layer,
    path: list[int],
    views: Mapping[str, Any],
    mu: float,
) -> Array:
    """The target at ``layer.output`` carried back from the logits target
    (the mean of its consumers' targets)."""
    sums, counts = reverse(plan, acts, t_logits, path, views, mu)
    if layer.output not in sums:
        raise RuntimeError(f"no target reached {layer.output}")
    return acts[layer.output] + sums[layer.output] / counts[layer.output]
