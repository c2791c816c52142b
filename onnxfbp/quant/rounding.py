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

__all__ = ["gptq_round", "output_error"]


def gptq_round(w: np.ndarray, gram: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               lo: np.ndarray, hi: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """Grid values (d, k) for float weights ``w`` (d, k) with ``gram`` (d, d); the grid of
    entry ``(i, j)`` is ``(q - zero[i, j]) * scale[i, j]``, ``lo[i] <= q <= hi[i]``."""
    w = np.array(w, dtype=np.float64)
    d = w.shape[0]
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damping * float(np.mean(np.diag(h))) * np.eye(d)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        u = np.diag(1.0 / np.sqrt(np.diag(h)))  # no feedback: nearest rounding
    out = np.empty_like(w)
    for i in range(d):
        q = np.clip(np.rint(w[i] / scale[i] + zero[i]), lo[i], hi[i])
        out[i] = (q - zero[i]) * scale[i]
        if i + 1 < d:
            err = (w[i] - out[i]) / u[i, i]
            w[i + 1:] -= np.outer(u[i, i + 1:], err)
    return out


def output_error(w: np.ndarray, q: np.ndarray, gram: np.ndarray) -> float:
    """``tr((W - Q)^T H (W - Q))``: the squared output change summed over rows."""
    e = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float((e * (gram @ e)).sum())
