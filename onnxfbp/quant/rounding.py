"""Rounding with the layer's Gram: GPTQ / OBQ-style error feedback.

For a layer with input rows ``X`` (im2col rows for a convolution, a column of
ones for the bias) and float weights ``W`` (d x k, the solver's layout), the
integer weights ``Q`` (on the layer's grid: ``(q - zp) * s``, ``q`` clipped to
its type's range) should keep the layer's output: minimize

    ||X (W - Q)||^2 = tr((W - Q)^T H (W - Q)),      H = X^T X (+ damping)

Rows of ``W`` (input columns) are rounded one at a time; the error of row ``i``
is spread over the rows not yet rounded by the optimal (OBS) update

    e = (w_i - q_i) / U_ii,      W[i+1:] -= U[i, i+1:]^T e

with ``U`` the upper Cholesky factor of ``H^-1`` (Frantar et al., GPTQ, 2022).
The bias row is rounded last, on its own (fine, int32) grid, so it absorbs
the rest of the error. Nearest rounding (``rint(W / s) + zp``) is the same with
no feedback.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RATIOS", "gptq_round", "output_error", "refit_scale_ratios"]

# candidate scale ratios (clipping: a ratio below 1 clips the largest weights)
RATIOS = tuple(round(0.3 + 0.05 * i, 2) for i in range(19))  # 0.3 .. 1.2


def gptq_round(w: np.ndarray, gram: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               lo: np.ndarray, hi: np.ndarray, damping: float = 0.01, block: int = 128
               ) -> np.ndarray:
    """Grid values (d, k) for float weights ``w`` (d, k) with ``gram`` (d, d); the grid of
    entry ``(i, j)`` is ``(q - zero[i, j]) * scale[i, j]``, ``lo[i] <= q <= hi[i]``."""
    w = np.array(w, dtype=np.float64)
    d = w.shape[0]
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damping * float(np.mean(np.diag(h))) * np.eye(d)
    u = _upper_inverse_factor(h)
    out = np.empty_like(w)
    for start in range(0, d, block):  # GPTQ's lazy batches: feedback inside, then once
        stop = min(start + block, d)
        errs = np.empty((stop - start, w.shape[1]))
        for i in range(start, stop):
            q = np.clip(np.rint(w[i] / scale[i] + zero[i]), lo[i], hi[i])
            out[i] = (q - zero[i]) * scale[i]
            err = (w[i] - out[i]) / u[i, i]
            errs[i - start] = err
            if i + 1 < stop:
                w[i + 1:stop] -= np.outer(u[i, i + 1:stop], err)
        if stop < d:
            w[stop:] -= u[start:stop, stop:].T @ errs
    return out


def refit_scale_ratios(w: np.ndarray, gram: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                       lo: np.ndarray, hi: np.ndarray, channel: np.ndarray,
                       ratios: tuple[float, ...] = RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """The scale ratio ``r`` per scale channel that minimizes the layer's output error
    after GPTQ rounding on the grid ``(q - zero) * r * scale``:

        r_c = argmin_r  sum_{g, j: channel[g, :, j] = c}  e_gj^T H_g e_gj,
        e_gj = w_gj - gptq_round(w_g, H_g, r scale_g)_j

    (columns ``j`` round independently, so channels with their own scale are chosen
    independently). ``w``, ``scale``, ``zero``: (groups, d, k); ``gram``: (groups, d, d);
    ``channel``: (groups, d, k) int, the scale channel of each entry, -1 for entries
    whose scale stays (the bias row); each column must hold one channel. Returns
    (ratio per channel, output error per channel at ratio 1)."""
    weight = channel >= 0
    n = int(channel.max()) + 1 if weight.any() else 0
    col = np.where(weight.any(axis=1), np.max(np.where(weight, channel, -1), axis=1), -1)
    errors = np.zeros((len(ratios), n))
    k = w.shape[2]
    for g in range(w.shape[0]):  # all ratios in one call: columns round independently
        s = np.concatenate([np.where(weight[g], scale[g] * r, scale[g]) for r in ratios], 1)
        wide = np.tile(np.asarray(w[g], np.float64), (1, len(ratios)))
        e = wide - gptq_round(wide, gram[g], s, np.tile(zero[g], (1, len(ratios))), lo, hi)
        per_col = (e * (np.asarray(gram[g], np.float64) @ e)).sum(axis=0)
        keep = col[g] >= 0
        for a in range(len(ratios)):
            np.add.at(errors[a], col[g][keep], per_col[a * k:(a + 1) * k][keep])
    best = np.asarray(ratios)[errors.argmin(axis=0)]
    one = errors[list(ratios).index(1.0)] if 1.0 in ratios else errors.min(axis=0)
    return best, one


def _upper_inverse_factor(h: np.ndarray) -> np.ndarray:
    """Upper triangular ``U`` with ``U^T U = h^-1``: ``h = R R^T`` with ``R = U^-1``
    upper, from the Cholesky factor of ``h`` in reversed order (one factorization
    and one triangular inverse, no full inverse). Diagonal (no feedback, nearest
    rounding) if ``h`` is not positive definite."""
    from scipy.linalg import lapack  # noqa: PLC0415

    rev = slice(None, None, -1)
    try:
        r = np.linalg.cholesky(h[rev, rev])[rev, rev]  # upper, h = r r^T
    except np.linalg.LinAlgError:
        return np.diag(1.0 / np.sqrt(np.diag(h)))
    u, info = lapack.dtrtri(r, lower=0)
    if info != 0 or not np.isfinite(u).all():
        return np.diag(1.0 / np.sqrt(np.diag(h)))
    return np.asarray(u)


def output_error(w: np.ndarray, q: np.ndarray, gram: np.ndarray) -> float:
    """``tr((W - Q)^T H (W - Q))``: the squared output change summed over rows."""
    e = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float((e * (gram @ e)).sum())
