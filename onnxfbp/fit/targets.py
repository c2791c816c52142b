"""Targets from labels for classifiers, and the scores used to judge them.

The network output target is one step of size ``step`` from the current
logits ``z`` toward the labels, in the direction that lowers cross-entropy:

    t = z + step * (onehot(y) - softmax(z))

For a linear last layer, fitting ``t`` by least squares and repeating is the
bound-optimization (Bohning) iteration for logistic regression when
``step = 2``: the softmax cross-entropy Hessian is bounded by ``I / 2``. Larger
steps move further per sweep; the held-out check keeps only steps that help.
Graphs ending in Softmax / LogSoftmax get the target on the Softmax input.
"""

from __future__ import annotations

import numpy as np

from ..rules import Array, xp_of

__all__ = ["cross_entropy", "label_target", "log_softmax"]


def log_softmax(z: Array) -> Array:
    xp = xp_of(z)
    z = z.astype(xp.float64) - z.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


def label_target(z: Array, y: Array, step: float) -> Array:
    """``z + step * (onehot(y) - softmax(z))`` for logits ``z`` of shape (N, K)."""
    xp = xp_of(z)
    p = xp.exp(log_softmax(z))
    p[xp.arange(len(y)), y] -= 1.0
    return (z - step * p).astype(z.dtype)


def cross_entropy(z: Array, y: Array) -> tuple[float, int]:
    """Summed cross-entropy of logits ``z`` and the number of correct argmaxes."""
    xp = xp_of(z)
    logp = log_softmax(z)
    loss = -float(logp[xp.arange(len(y)), y].sum())
    correct = int((z.argmax(axis=1) == y).sum())
    return loss, correct


def as_logits(scores: np.ndarray, kind: str) -> np.ndarray:
    """Logit-like scores from a graph output of the given kind."""
    if kind == "probabilities":
        return np.log(np.clip(scores, 1e-12, None))
    return scores
