"""The last rounding of a label run on a QDQ model: GPTQ from the float shadows.

During a run each weight the schedule sets is projected at once onto its grid
(nearest), while the schedule's own float steps accumulate (shadow weights);
:meth:`.qdq.QuantMap.project` keeps each projection's float value. After the
run, each quantized layer whose kept weights have their shadow is rounded again
from it, layers in forward order, with GPTQ error feedback
(:func:`.rounding.gptq_round`) and the Gram ``H = X^T X`` of its input rows in
the quantized model with the layers before it already rounded, so that the
rounding keeps the layer's output ``X W`` rather than each weight:

    min_Q ||X (W_shadow - Q)||^2    vs    Q = nearest(W_shadow)

The result is kept only if it scores better on the held-out split than the
nearest rounding (more correct, ties: lower cross-entropy); else the nearest
rounding stays.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..events import Message
from ..fit.solve import NormalEquations
from ..schedules.state import ModelState, RunContext
from .grid import layer_grid
from .rounding import gptq_round, output_error

__all__ = ["finish_rounding"]


def finish_rounding(state: ModelState, ctx: RunContext) -> dict[str, Any] | None:
    """Round the run's kept weights again by GPTQ (module doc); the summary for the
    report (None: no quantized layer has a shadow)."""
    started = time.perf_counter()
    nearest = dict(state.values)
    quant = state.quant
    sample = ctx.train_idx[: min(len(ctx.train_idx), state.config.minibatch.precond_samples)]
    rows: list[dict[str, Any]] = []
    base = state.scores(ctx.data, ctx.val_idx)
    for layer in reversed(state.layers):  # forward order
        qw = quant.weights.get(layer.weight.initializer)
        if qw is None:
            continue
        w_s = quant.shadow(state.values[layer.weight.initializer])
        bias_q = quant.weights.get(layer.bias.initializer) if layer.bias else None
        b_s = quant.shadow(state.values[layer.bias.initializer]) \
            if layer.bias is not None and bias_q is not None else None
        block = state.block(layer)
        if w_s is None or (block.has_bias_row and b_s is None):
            continue
        grid = layer_grid(layer, block, qw, bias_q, None if b_s is None else tuple(b_s.shape))
        if grid is None:
            continue
        w_view = layer.weight.apply(w_s)
        if tuple(w_view.shape) != qw.shape:
            continue
        if b_s is not None and layer.bias is not None:
            b_s = layer.bias.apply(b_s)
        target = grid.layout(np.asarray(w_view, np.float64), b_s)
        groups, d, k = target.shape
        eq = NormalEquations(groups, d, k)
        for x, _ in ctx.data.batches(sample, 50):
            acts = state.forward(x, [layer.input, layer.output])
            xr, tr = block.rows(acts[layer.input], acts[layer.output], ctx.rng,
                                state.config.minibatch.gram_positions)
            eq.add(xr, tr)
        gram = np.asarray(eq.gram)
        current = np.asarray(block.weights())
        out = np.stack([gptq_round(target[g], gram[g], grid.scale[g], grid.zero[g],
                                   grid.lo, grid.hi) for g in range(groups)])
        rows.append({"name": layer.name, "bits": qw.bits, "granularity": qw.granularity,
                     "output_error_nearest": sum(output_error(target[g], current[g], gram[g])
                                                 for g in range(groups)),
                     "output_error_gptq": sum(output_error(target[g], out[g], gram[g])
                                              for g in range(groups))})
        state.set_weights(layer, block, out)
    if not rows:
        state.values = nearest
        return None
    after = state.scores(ctx.data, ctx.val_idx)
    kept = "gptq" if (after[1], -after[0]) > (base[1], -base[0]) else "nearest"
    if kept == "nearest":
        state.values = nearest
    n = max(len(ctx.val_idx), 1)
    ctx.progress(Message(f"final rounding (GPTQ from the float steps): held-out accuracy "
                         f"nearest {base[1] / n:.4f}, gptq {after[1] / n:.4f}; kept {kept}"))
    return {"method": "gptq", "kept": kept,
            "heldout_accuracy": {"nearest": base[1] / n, "gptq": after[1] / n},
            "layers": rows, "seconds": time.perf_counter() - started}
