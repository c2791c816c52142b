"""Solve: block-wise regularized least squares with streaming normal equations.

For a layer with input rows ``X`` (im2col patches for a convolution, one block
per group; a column of ones when the layer has a bias) and target rows ``T``:

    W = argmin ||X W - T||^2 + lam ||W - W0||^2
      = (G + lam I)^-1 (B + lam W0),      G = sum_batches X^T X,  B = sum X^T T

``G`` and ``B`` are accumulated batch by batch (a reduction: memory is
O(d^2 + d k), independent of the number of samples, and partial sums from
several workers just add), products in float32, sums in float64. Each solve
goes through a Cholesky factor (:func:`spd_inverse`). ``lam`` is relative to
the mean diagonal of ``G`` and chosen on held-out statistics ``(Gv, Bv, cv)``
by the held-out residual

    ||Xv W - Tv||^2 = tr(W^T Gv W) - 2 tr(W^T Bv) + cv

which needs no held-out sample kept in memory. All functions take NumPy or
CuPy arrays (``xp``) and run the same code on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..rules import Array, xp_of

__all__ = [
    "NonFiniteError",
    "NormalEquations",
    "Preconditioner",
    "PreconditionerSums",
    "RidgeChoice",
    "choose_ridge",
    "ridge_solve",
    "require_finite",
    "spd_inverse",
]


class NonFiniteError(ArithmeticError):
    """A matrix about to be factored or solved holds NaN or infinity: LAPACK is
    never called with it (a non-finite Cholesky input may crash the process). The
    caller leaves the layer unchanged and reports ``str(error)`` as the reason."""


def require_finite(a: Array, what: str) -> None:
    """Raise :class:`NonFiniteError` unless every entry of ``a`` is finite."""
    xp = xp_of(a)
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteError(f"non-finite values in {what}; not factored")


@dataclass
class NormalEquations:
    """Streaming sums for ``groups`` independent blocks of size d x k."""

    groups: int
    d: int
    k: int
    xp: Any = np
    gram: Array = field(init=False)
    cross: Array = field(init=False)
    target_sq: float = field(init=False, default=0.0)
    rows: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.gram = self.xp.zeros((self.groups, self.d, self.d), dtype=self.xp.float64)
        self.cross = self.xp.zeros((self.groups, self.d, self.k), dtype=self.xp.float64)

    def add(self, x: Array, t: Array) -> None:
        """Accumulate rows ``x`` (G, n, d) and targets ``t`` (G, n, k)."""
        xp = self.xp
        x = xp.asarray(x, dtype=xp.float32)
        t = xp.asarray(t, dtype=xp.float32)
        xt = x.transpose(0, 2, 1)
        self.gram += xp.matmul(xt, x).astype(xp.float64)
        self.cross += xp.matmul(xt, t).astype(xp.float64)
        self.target_sq += float((t.astype(xp.float64) ** 2).sum())
        self.rows += int(x.shape[1])

    def merge(self, other: NormalEquations) -> None:
        """Add another worker's partial sums (the reduction is associative)."""
        self.gram += other.gram
        self.cross += other.cross
        self.target_sq += other.target_sq
        self.rows += other.rows


def cholesky_inverse(a: Array) -> Array:
    """``L^-1`` for the Cholesky factor ``L`` of a symmetric positive definite ``a``
    (``a^-1 = L^-T L^-1``), from the array module's own LAPACK (see
    :func:`spd_inverse`). :class:`NonFiniteError` if ``a`` is not finite."""
    xp = xp_of(a)
    require_finite(a, "the matrix to factor")
    return xp.linalg.inv(xp.linalg.cholesky(a))


def spd_inverse(a: Array) -> Array:
    """``a^-1`` for a symmetric positive definite ``a`` (``LinAlgError`` if it is not),
    from its Cholesky factor ``L``: ``a^-1 = L^-T L^-1``.

    The array module's own LAPACK (NumPy's or CuPy's) does the work, not SciPy's:
    SciPy ships a second OpenBLAS whose threads, alternating with NumPy's, spin
    against each other (on 2 cores one output-layer iteration took 11.8 ms with
    ``scipy.linalg.cho_solve`` and 2.1 ms with NumPy alone). The matrices here
    are damped (``lam > 0``) and each inverse is applied many times."""
    low_inv = cholesky_inverse(a)
    return low_inv.T @ low_inv


def ridge_solve(gram: Array, cross: Array, w0: Array, lam: float) -> Array:
    """``(G + lam I)^-1 (B + lam W0)`` per block; ``lam`` absolute. One solve each
    (LU of the array module's LAPACK: an inverse would cost three times as much).
    :class:`NonFiniteError` if ``gram``, ``cross`` or ``w0`` is not finite."""
    xp = xp_of(gram)
    require_finite(gram, "the Gram matrix")
    require_finite(cross, "the cross products")
    require_finite(w0, "the starting weights")
    out = xp.empty_like(cross)
    eye = xp.eye(gram.shape[-1], dtype=gram.dtype)
    for g in range(gram.shape[0]):
        out[g] = xp.linalg.solve(gram[g] + lam * eye, cross[g] + lam * w0[g])
    return out


@dataclass
class Preconditioner:
    """The damped per-row Gram ``C + lam I`` of a layer, factored once.

    ``C = X^T X / m`` over ``m`` rows ``X`` (G blocks of d columns), ``lam`` is
    ``damping`` times the mean diagonal of ``C``. Applied to the cross product
    ``B = X_b^T R_b / n`` of a mini-batch's rows and target residuals it gives the
    regularized least-squares step

        dW = argmin ||X_b dW - R_b||^2 / n + lam ||dW||^2 ~ (C + lam I)^-1 B

    with the Gram estimated from the larger sample. Solved in the smaller of the
    two dimensions: a Cholesky factor of the d x d matrix when ``d <= m``, else
    (Woodbury) of the m x m matrix ``X X^T + m lam I = L L^T``, keeping
    ``U = L^-1 X`` (float32, m x d, two GEMMs per step):

        (X^T X / m + lam I)^-1 B = (B - X^T (X X^T + m lam I)^-1 X B) / lam
                                 = (B - U^T (U B)) / lam

    One m x d factor rather than ``X`` and ``(X X^T + m lam I)^-1 X``: half the
    memory (the shared CNN's fc1: 12.5 instead of 25 MB), and a step reads one
    matrix twice rather than two once (fc1's apply, between forward runs as in
    the schedule: 9.0 -> 8.4 ms).
    """

    factors: list[Array]  # per group: (C + lam I)^-1, or U (Woodbury)
    lam: float  # absolute
    woodbury: bool = False

    @classmethod
    def from_sums(cls, sums: PreconditionerSums, damping: float) -> Preconditioner:
        """Factor the damped Gram of ``sums``; :class:`NonFiniteError` if its rows
        are not finite (nothing reaches LAPACK then)."""
        xp = sums.xp
        m = max(sums.count, 1)
        for part in ([sums.gram] if not sums.dual else sums.chunks):
            require_finite(part, "the layer's input rows")
        if not sums.dual:
            cov = sums.gram / m
            lam = damping * (float(xp.mean(xp.diagonal(cov, axis1=1, axis2=2))) or 1.0)
            eye = xp.eye(cov.shape[-1], dtype=cov.dtype)
            return cls([spd_inverse(c + lam * eye) for c in cov], lam)
        rows = xp.concatenate(sums.chunks, axis=1)
        kernel = xp.matmul(rows, rows.transpose(0, 2, 1)).astype(xp.float64)
        lam = damping * (float(xp.trace(kernel, axis1=1, axis2=2).mean()) / m / rows.shape[2])
        lam = lam or damping
        eye = xp.eye(kernel.shape[-1], dtype=kernel.dtype)
        factors = [cholesky_inverse(k + m * lam * eye).astype(xp.float32) @ r
                   for k, r in zip(kernel, rows, strict=True)]
        return cls(factors, lam, True)

    def apply(self, cross: Array) -> Array:
        """``(C + lam I)^-1 B`` for each group block of ``cross`` (G, d, k)."""
        xp = xp_of(cross)
        out = xp.empty_like(cross)
        for g, factor in enumerate(self.factors):
            if not self.woodbury:
                out[g] = factor @ cross[g]
            else:
                inner = factor @ cross[g].astype(xp.float32)
                out[g] = (cross[g] - (factor.T @ inner)) / self.lam
        return out


@dataclass
class PreconditionerSums:
    """Rows streamed into a :class:`Preconditioner`: their Gram (float64), or the
    rows themselves (float32) when fewer rows than columns are expected (``dual``),
    so memory is O(min(d^2, m d)) per block."""

    dual: bool
    xp: Any = np
    gram: Array = None
    chunks: list[Array] = field(default_factory=list)
    count: int = 0

    def add(self, x: Array) -> None:
        """Accumulate rows ``x`` (G, n, d)."""
        xp = self.xp
        x = xp.asarray(x, dtype=xp.float32)
        if self.dual:
            self.chunks.append(x)
        else:
            gram = xp.matmul(x.transpose(0, 2, 1), x).astype(xp.float64)
            self.gram = gram if self.gram is None else self.gram + gram
        self.count += int(x.shape[1])


def heldout_residual(w: Array, val: NormalEquations) -> float:
    """``||Xv W - Tv||^2`` from the held-out sums."""
    xp = xp_of(w)
    quad = float((w * xp.matmul(val.gram, w)).sum())
    lin = float((w * val.cross).sum())
    return quad - 2.0 * lin + val.target_sq


@dataclass(frozen=True)
class RidgeChoice:
    weights: Array  # (G, d, k)
    lam: float  # relative to the mean diagonal of G
    residual: float  # held-out residual of the chosen weights
    residual_before: float  # held-out residual of W0
    why: str | None = None  # when no lam gave finite weights: the last reason


def choose_ridge(
    train: NormalEquations, val: NormalEquations | None, w0: Array, grid: Sequence[float]
) -> RidgeChoice:
    """Solve for every relative ``lam`` in ``grid``; keep the lowest held-out residual.

    Without held-out sums the middle of the grid is used. A solve that is not
    finite (singular or exploding) is skipped; if none is finite, W0 is kept.
    """
    xp = train.xp
    w0 = xp.asarray(w0, dtype=xp.float64)
    scale = float(xp.mean(xp.diagonal(train.gram, axis1=1, axis2=2))) or 1.0
    before = heldout_residual(w0, val) if val is not None else float("nan")
    candidates = list(grid) if val is not None else [sorted(grid)[len(grid) // 2]]
    best = RidgeChoice(w0, float("inf"), before, before)
    why = None
    if not np.isfinite(scale):
        return RidgeChoice(w0, float("inf"), before, before,
                           "non-finite values in the Gram matrix; not factored")
    for lam in candidates:
        try:
            w = ridge_solve(train.gram, train.cross, w0, lam * scale)
        except NonFiniteError as err:  # the same for every lam
            return RidgeChoice(w0, float("inf"), before, before, str(err))
        except Exception as err:  # LinAlgError: not positive definite at this lam
            why = f"solve failed ({err})"
            continue
        if not bool(xp.isfinite(w).all()):
            why = "the solve gave non-finite weights"
            continue
        res = heldout_residual(w, val) if val is not None else 0.0
        if res < best.residual or best.lam == float("inf"):
            best = RidgeChoice(w, float(lam), res, before)
    if best.lam == float("inf"):
        return RidgeChoice(w0, float("inf"), before, before, why)
    return best
