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

Reverse step ``J^T r = r f'(x0)`` in closed form (NumPy and ONNX alike): Elu
``gamma r`` for ``x > 0``, else ``gamma alpha e^x r``; Softplus ``sigma(x)``;
HardSigmoid ``alpha [0 < alpha x + beta < 1]``; HardSwish ``x / 3 + 1/2`` on
``(-3, 3)``, 1 above; Swish ``s + alpha x s (1 - s)``, ``s = sigma(alpha x)``; Mish
``t + x sigma(x) (1 - t^2)``, ``t = tanh(softplus x)``; Gelu ``Phi(x) + x phi(x)``
(tanh form: ``(1 + t) / 2 + x (1 - t^2) c (1 + 3 k x^2) / 2``,
``t = tanh(c (x + k x^3))``, ``c = sqrt(2 / pi)``, ``k = 0.044715``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import TYPE_CHECKING

import numpy as np

from . import Array, InverseRule, NodeView, decode, register, xp_of

if TYPE_CHECKING:
    from ..reverse.adjoint import AdjointBuilder

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
_TANH_K = 0.044715  # Gelu's tanh form: tanh(c (x + k x^3))


def _gelu(x: Array) -> Array:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _gelu_d(x: Array) -> Array:
    xp = xp_of(x)
    return 0.5 * (1.0 + _erf(x / np.sqrt(2.0))) + x * xp.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + xp_of(x).tanh(_TANH_C * (x + _TANH_K * x**3)))


def _gelu_tanh_d(x: Array) -> Array:
    th = xp_of(x).tanh(_TANH_C * (x + _TANH_K * x**3))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th**2) * _TANH_C * (1.0 + 3 * _TANH_K * x**2)


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
    defaults = {"Elu": {"alpha": 1.0},
                "Selu": {"alpha": 1.67326319217681884765625,
                         "gamma": 1.05070102214813232421875}}

    def params(self, node: NodeView) -> tuple[float, float]:
        """``(alpha, gamma)``: Elu's gamma is 1."""
        gamma = float(node.attr("gamma")) if node.op_type == "Selu" else 1.0
        return float(node.attr("alpha")), gamma

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

    def slope(self, node: NodeView, x: Array) -> Array:
        alpha, gamma = self.params(node)
        xp = xp_of(x)
        return gamma * xp.where(x > 0, 1.0, alpha * xp.exp(xp.minimum(x, 0)))

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        alpha, gamma = self.params(node)
        x = b.act(xs[0])
        negative = b.op("Mul", [b.op("Exp", [b.op("Min", [x, b.const(0.0)])]),
                                b.const(alpha)])
        slope = b.op("Where", [b.op("Greater", [x, b.const(0.0)]), b.const(1.0), negative])
        return [b.op("Mul", [r, slope if gamma == 1.0 else b.op("Mul", [slope, b.const(gamma)])])]


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

    def slope(self, node: NodeView, x: Array) -> Array:
        return _sigmoid(x)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        return [b.op("Mul", [r, b.op("Sigmoid", [b.act(xs[0])])])]


@register
class HardSigmoidRule(_Elementwise):
    """``clip(alpha x + beta, 0, 1)``: the ramp inverse; flat parts keep ``x0`` when
    it already gives the clamped target."""

    op_types = ("HardSigmoid",)
    defaults = {"HardSigmoid": {"alpha": 0.2, "beta": 0.5}}

    def params(self, node: NodeView) -> tuple[float, float]:
        """``(alpha, beta)``."""
        return float(node.attr("alpha")), float(node.attr("beta"))

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

    def slope(self, node: NodeView, x: Array) -> Array:
        alpha, beta = self.params(node)
        z = alpha * x + beta
        return alpha * ((z > 0.0) & (z < 1.0))

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        alpha, beta = self.params(node)
        z = b.op("Add", [b.op("Mul", [b.act(xs[0]), b.const(alpha)]), b.const(beta)])
        return [b.op("Mul", [r, b.op("Mul", [b.inside(z, 0.0, 1.0), b.const(alpha)])])]


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

    def slope(self, node: NodeView, x: Array) -> Array:
        return (x / 3.0 + 0.5) * ((x > -3.0) & (x < 3.0)) + (x > 3.0)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x = b.act(xs[0])
        ramp = b.op("Add", [b.op("Mul", [x, b.const(1.0 / 3.0)]), b.const(0.5)])
        above = b.as_float(b.op("Greater", [x, b.const(3.0)]))
        slope = b.op("Add", [b.op("Mul", [ramp, b.inside(x, -3.0, 3.0)]), above])
        return [b.op("Mul", [r, slope])]


@register
class DipRule(_Elementwise):
    """Gelu, Mish and Swish: decreasing left of their minimum, increasing right of it;
    Newton on each side."""

    op_types = ("Gelu", "Mish", "Swish")
    defaults = {"Gelu": {"approximate": "none"}, "Swish": {"alpha": 1.0}}

    def _key(self, node: NodeView) -> tuple[str, str, float]:
        """``(op, approximate, alpha)``: Gelu's form, Swish's alpha (else 1)."""
        approx = decode(node.attr("approximate")) if node.op_type == "Gelu" else "none"
        alpha = float(node.attr("alpha")) if node.op_type == "Swish" else 1.0
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

    def slope(self, node: NodeView, x: Array) -> Array:
        return _fns(*self._key(node))[1](x)

    def emit_adjoint(
        self, b: AdjointBuilder, node: NodeView, r: str, xs: list[str], o: str
    ) -> list[str] | None:
        x = b.act(xs[0])
        kind, approx, alpha = self._key(node)
        mul, add, sub = (lambda *a: b.op("Mul", list(a))), (lambda *a: b.op("Add", list(a))), (
            lambda *a: b.op("Sub", list(a)))
        one = b.const(1.0)
        if kind == "Swish":
            sig = b.op("Sigmoid", [mul(x, b.const(alpha))])
            slope = add(sig, mul(mul(x, b.const(alpha)), mul(sig, sub(one, sig))))
        elif kind == "Mish":
            t = b.op("Tanh", [b.op("Softplus", [x])])
            slope = add(t, mul(mul(x, b.op("Sigmoid", [x])), sub(one, mul(t, t))))
        elif approx == "tanh":
            c, k = _TANH_C, _TANH_K
            x2 = mul(x, x)
            t = b.op("Tanh", [mul(b.const(c), add(x, mul(b.const(k), mul(x2, x))))])
            inner = mul(b.const(c), add(one, mul(b.const(3.0 * k), x2)))
            slope = mul(b.const(0.5), add(add(one, t), mul(mul(x, sub(one, mul(t, t))), inner)))
        else:
            cdf = mul(b.const(0.5), add(one, b.op("Erf", [mul(x, b.const(1.0 / np.sqrt(2.0)))])))
            pdf = mul(b.const(1.0 / np.sqrt(2.0 * np.pi)),
                      b.op("Exp", [mul(b.const(-0.5), mul(x, x))]))
            slope = add(cdf, mul(x, pdf))
        return [mul(r, slope)]
