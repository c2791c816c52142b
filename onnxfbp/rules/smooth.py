"""Element-wise activations with monotone pieces: Elu, Selu, Softplus, HardSigmoid,
HardSwish, Gelu, Mish, Swish (also ``x * Sigmoid(x)``, which the planner fuses).

Each is inverted element by element, exactly where the target is reachable:
the function is split into pieces on which it is strictly monotone, the target
``t`` is clamped into each piece's range and solved for on it, and of these
candidates and ``x0`` itself the one whose output is closest to ``t`` wins (ties:
the one closest to ``x0``). So ``|f(x*) - t| <= |f(x0) - t|`` for every entry; a
non-monotone function (Gelu, Mish, Swish, HardSwish dip below zero) keeps an entry
on its own side of the minimum when both sides reach ``t``.

- Elu:         x* = t (t >= 0), log(1 + t / alpha) (t < 0, clamped above -alpha)
- Selu:        the Elu inverse of t / gamma
- Softplus:    x* = t + log(1 - e^-t), t clamped above 0
- HardSigmoid: x* = (t - beta) / alpha on the ramp, t clamped to [0, 1]
- HardSwish:   x* = (-3 +- sqrt(9 + 24 t)) / 2 on the ramp, x* = t above 3
- Gelu, Mish, Swish: safeguarded Newton steps on each side of the minimum
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial

import numpy as np

from . import Array, InverseRule, NodeView, register, xp_of

Fn = Callable[[Array], Array]


def _erf(x: Array) -> Array:
    if xp_of(x) is np:
        from scipy.special import erf  # noqa: PLC0415

        return erf(x)
    from cupyx.scipy.special import erf as cupy_erf  # noqa: PLC0415

    return cupy_erf(x)


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + xp_of(x).tanh(0.5 * x))


def _softplus(x: Array) -> Array:
    xp = xp_of(x)
    return xp.logaddexp(0.0, x)


def _best(f: Fn, t: Array, x0: Array, candidates: Sequence[Array]) -> Array:
    """Per entry, the candidate (or ``x0``) whose output is closest to ``t``; ties go
    to the one closest to ``x0``."""
    xp = xp_of(t)
    best = x0
    err = xp.abs(f(x0) - t)
    dist = xp.zeros_like(x0)
    tol = 1e-9 * (1.0 + xp.abs(t))
    for c in candidates:
        e = xp.abs(f(c) - t)
        d = xp.abs(c - x0)
        take = (e < err - tol) | ((e <= err + tol) & (d < dist))
        best = xp.where(take, c, best)
        err = xp.where(take, e, err)
        dist = xp.where(take, d, dist)
    return best


def _newton(f: Fn, df: Fn, t: Array, x: Array, lo: Array, hi: Array, increasing: bool,
            steps: int = 60) -> Array:
    """Solve ``f(x) = t`` (flat arrays) on ``[lo, hi]``, where ``f`` is strictly monotone
    and ``t`` within its range, from the start ``x``: Newton steps, bisection when a
    step leaves the bracket; converged entries drop out of the work."""
    xp = xp_of(t)
    x, a, b = x.copy(), lo.copy(), hi.copy()
    active = xp.arange(x.size)
    for _ in range(steps):
        if active.size == 0:
            break
        xa, ta, aa, ba = x[active], t[active], a[active], b[active]
        r = f(xa) - ta
        done = xp.abs(r) <= 1e-12 * (1.0 + xp.abs(ta))
        above = r > 0 if increasing else r < 0
        ba = xp.where(above, xa, ba)
        aa = xp.where(above, aa, xa)
        d = df(xa)
        ok = xp.abs(d) > 1e-300
        xn = xa - xp.where(ok, r / xp.where(ok, d, 1.0), 0.0)
        inside = ok & (xn > aa) & (xn < ba)
        xn = xp.where(inside, xn, 0.5 * (aa + ba))
        done |= xp.abs(xn - xa) <= 1e-13 * (1.0 + xp.abs(xa))
        x[active] = xp.where(done, xa, xn)
        a[active], b[active] = aa, ba
        active = active[~done]
    return x


@cache
def _argmin(kind: str, approx: str = "none", alpha: float = 1.0) -> tuple[float, float]:
    """Location and value of the minimum of Gelu / Mish / Swish (scalar bisection on f')."""
    f, df = _fns(kind, approx, alpha)
    a, b = -5.0 / alpha, 0.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if float(df(np.array(m))) < 0:
            a = m
        else:
            b = m
    x = 0.5 * (a + b)
    return x, float(f(np.array(x)))


_TANH_C = float(np.sqrt(2.0 / np.pi))


def _gelu(x: Array) -> Array:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _gelu_d(x: Array) -> Array:
    xp = xp_of(x)
    return 0.5 * (1.0 + _erf(x / np.sqrt(2.0))) + x * xp.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + xp_of(x).tanh(_TANH_C * (x + 0.044715 * x**3)))


def _gelu_tanh_d(x: Array) -> Array:
    th = xp_of(x).tanh(_TANH_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th**2) * _TANH_C * (1.0 + 3 * 0.044715 * x**2)


def _mish(x: Array) -> Array:
    return x * xp_of(x).tanh(_softplus(x))


def _mish_d(x: Array) -> Array:
    th = xp_of(x).tanh(_softplus(x))
    return th + x * (1.0 - th**2) * _sigmoid(x)


def _swish(x: Array, alpha: float) -> Array:
    return x * _sigmoid(alpha * x)


def _swish_d(x: Array, alpha: float) -> Array:
    s = _sigmoid(alpha * x)
    return s + alpha * x * s * (1.0 - s)


def _fns(kind: str, approx: str = "none", alpha: float = 1.0) -> tuple[Fn, Fn]:
    """``f`` and ``f'`` of Gelu (exact or tanh approximation), Mish, Swish(alpha)."""
    if kind == "Gelu":
        return (_gelu_tanh, _gelu_tanh_d) if approx == "tanh" else (_gelu, _gelu_d)
    if kind == "Mish":
        return _mish, _mish_d
    return partial(_swish, alpha=alpha), partial(_swish_d, alpha=alpha)


class _Elementwise(InverseRule):
    """Shared forward/inverse: subclasses give ``f`` and the per-piece candidates."""

    elementwise = True

    def fn(self, node: NodeView) -> Fn:
        raise NotImplementedError

    def candidates(self, node: NodeView, t: Array, x0: Array) -> list[Array]:
        raise NotImplementedError

    def forward(self, node: NodeView, xs: Sequence[Array]) -> Array:
        x = xs[0]
        return self.fn(node)(x.astype(xp_of(x).float64)).astype(x.dtype)

    def inverse(
        self, node: NodeView, t: Array, xs: Sequence[Array], o0: Array, mu: float
    ) -> list[Array]:
        xp = xp_of(t)
        x0 = xs[0].astype(xp.float64)
        t64 = xp.broadcast_to(t, x0.shape).astype(xp.float64)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            cands = self.candidates(node, t64, x0)
            x = _best(self.fn(node), t64, x0, cands)
        return [x.astype(xs[0].dtype)]


def _elu_inverse(t: Array, alpha: float) -> Array:
    xp = xp_of(t)
    neg = xp.log1p(xp.maximum(t / alpha, -1.0 + 1e-12))
    return xp.where(t >= 0, t, neg)


@register
class EluRule(_Elementwise):
    """Elu and Selu: monotone, range (-alpha (* gamma), inf); closed-form inverse."""

    op_types = ("Elu", "Selu")

    def params(self, node: NodeView) -> tuple[float, float]:
        """``(alpha, gamma)``: Selu's defaults, or Elu's ``alpha`` with ``gamma = 1``."""
        if node.op_type == "Selu":
            return float(node.attr("alpha", 1.67326319217681884765625)), float(
                node.attr("gamma", 1.05070102214813232421875))
        return float(node.attr("alpha", 1.0)), 1.0

    def check(self, node: NodeView) -> str | None:
        if self.params(node)[0] <= 0:
            return f"{node.op_type} with alpha <= 0 is not monotone"
        return super().check(node)

    def fn(self, node: NodeView) -> Fn:
        alpha, gamma = self.params(node)

        def f(x: Array) -> Array:
            xp = xp_of(x)
            return gamma * xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0)))

        return f

    def candidates(self, node: NodeView, t: Array, x0: Array) -> list[Array]:
        alpha, gamma = self.params(node)
        return [_elu_inverse(t / gamma, alpha)]


@register
class SoftplusRule(_Elementwise):
    """``log(1 + e^x)``: range (0, inf); ``x* = t + log(1 - e^-t)``."""

    op_types = ("Softplus",)

    def fn(self, node: NodeView) -> Fn:
        return _softplus

    def candidates(self, node: NodeView, t: Array, x0: Array) -> list[Array]:
        xp = xp_of(t)
        tc = xp.maximum(t, 1e-12)
        return [tc + xp.log(-xp.expm1(-tc))]


@register
class HardSigmoidRule(_Elementwise):
    """``clip(alpha x + beta, 0, 1)``: the ramp inverse; flat parts keep ``x0`` when
    it already gives the clamped target."""

    op_types = ("HardSigmoid",)

    def params(self, node: NodeView) -> tuple[float, float]:
        """``(alpha, beta)`` with ONNX's defaults."""
        return float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))

    def check(self, node: NodeView) -> str | None:
        if self.params(node)[0] == 0:
            return "HardSigmoid with alpha = 0 is constant"
        return super().check(node)

    def fn(self, node: NodeView) -> Fn:
        alpha, beta = self.params(node)
        return lambda x: xp_of(x).clip(alpha * x + beta, 0.0, 1.0)

    def candidates(self, node: NodeView, t: Array, x0: Array) -> list[Array]:
        alpha, beta = self.params(node)
        return [(xp_of(t).clip(t, 0.0, 1.0) - beta) / alpha]


@register
class HardSwishRule(_Elementwise):
    """``x * clip(x / 6 + 1/2, 0, 1)``: minimum -3/8 at x = -3/2; quadratic on [-3, 3]."""

    op_types = ("HardSwish",)

    def fn(self, node: NodeView) -> Fn:
        return lambda x: x * xp_of(x).clip(x / 6.0 + 0.5, 0.0, 1.0)

    def candidates(self, node: NodeView, t: Array, x0: Array) -> list[Array]:
        xp = xp_of(t)
        root = xp.sqrt(xp.maximum(9.0 + 24.0 * t, 0.0))
        right = xp.where(t >= 3.0, t, (-3.0 + root) / 2.0)  # x >= -3/2
        left = (-3.0 - xp.minimum(root, 3.0)) / 2.0  # x in [-3, -3/2], t in [-3/8, 0]
        return [right, left]


@register
class DipRule(_Elementwise):
    """Gelu, Mish and Swish: decreasing left of their minimum, increasing right of it;
    Newton on each side."""

    op_types = ("Gelu", "Mish", "Swish")

    def _key(self, node: NodeView) -> tuple[str, str, float]:
        approx = node.attr("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else str(approx)
        alpha = float(node.attr("alpha", 1.0)) if node.op_type == "Swish" else 1.0
        return node.op_type, approx, alpha

    def check(self, node: NodeView) -> str | None:
        if self._key(node)[2] <= 0:
            return "Swish with alpha <= 0 is not supported"
        return super().check(node)

    def fn(self, node: NodeView) -> Fn:
        return _fns(*self._key(node))[0]

    def candidates(self, node: NodeView, t: Array, x0: Array) -> list[Array]:
        xp = xp_of(t)
        key = self._key(node)
        f, df = _fns(*key)
        x_min, f_min = _argmin(*key)
        far = -30.0 / key[2]
        f_far = float(f(np.array(far)))
        tf, xf = t.ravel(), x0.ravel()
        # right of the minimum: every target at or above f_min is reachable
        right = xp.full_like(tf, x_min)
        inner = tf > f_min
        tr = tf[inner]
        hi = 2.0 * xp.maximum(tr, 0.0) + 2.0
        right[inner] = _newton(f, df, tr, xp.clip(xf[inner], x_min, hi),
                               xp.full_like(tr, x_min), hi, increasing=True)
        # left of it, only where x0 is there and the target is reachable there
        left = right.copy()
        there = (xf < x_min) & inner & (tf < f_far)
        tl = tf[there]
        left[there] = _newton(f, df, tl, xp.clip(xf[there], far, x_min), xp.full_like(tl, far),
                              xp.full_like(tl, x_min), increasing=False)
        return [right.reshape(t.shape), left.reshape(t.shape)]
