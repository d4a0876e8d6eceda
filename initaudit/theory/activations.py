"""Activation functions and their Gaussian moments.

Positively homogeneous activations (ReLU, LeakyReLU, PReLU, identity) map a symmetric
input's moments exactly: E[phi(z)^p] = a_p E[|z|^p] for p = 2, 4. Every other activation
is integrated by Gauss–Hermite quadrature at the actual pre-activation variance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_SQRT2 = math.sqrt(2.0)
_LEGENDRE = np.polynomial.legendre.leggauss(96)
_TAIL = 13.0  # standard deviations; the Gaussian mass beyond is below 1e-38


def _expect(f: Callable[[np.ndarray], np.ndarray], mean: float, sd: float) -> float:
    """E f(mean + sd Z) for Z ~ N(0, 1), by Gauss–Legendre panels split where the argument
    crosses 0: the activations with a kink (ReLU family, ELU, SELU) have it there, and a
    panel edge at the kink keeps the rule exponentially accurate."""
    return _expect_powers(f, mean, sd, (1,))[0]


def _expect_powers(
    f: Callable[[np.ndarray], np.ndarray], mean: float, sd: float, powers: tuple[int, ...]
) -> list[float]:
    """[E f(mean + sd Z)^p for p in powers] on :func:`_expect`'s panels, f evaluated once."""
    kink = -mean / sd
    edges = [-_TAIL, kink, _TAIL] if -_TAIL < kink < _TAIL else [-_TAIL, _TAIL]
    nodes, weights = _LEGENDRE
    totals = [0.0] * len(powers)
    for a, b in itertools.pairwise(edges):
        z = 0.5 * (b - a) * nodes + 0.5 * (b + a)
        density = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        values = f(mean + sd * z)
        for k, p in enumerate(powers):
            totals[k] += 0.5 * (b - a) * float(np.sum(weights * density * (values if p == 1 else values**p)))
    return totals


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class Activation:
    """An activation's law. ``homogeneous`` gives (a1, a2, a4) with
    E[phi(z)] = a1 E|z|, E[phi(z)^2] = a2 E[z^2], E[phi(z)^4] = a4 E[z^4] for symmetric z."""

    name: str
    phi: Callable[[np.ndarray], np.ndarray]
    homogeneous: tuple[float, float, float] | None = None

    def moments(self, variance: float, mean: float = 0.0) -> tuple[float, float, float]:
        """E[phi(z)], E[phi(z)^2], E[phi(z)^4] for z ~ N(mean, variance)."""
        return _gauss_moments(self, float(variance), float(mean))

    def second_moment(self, variance: float, mean: float = 0.0) -> float:
        return _gauss_second(self, float(variance), float(mean))

    def excess(self, variance: float = 1.0) -> float:
        """c_phi = E[phi^4]/E[phi^2]^2 - 1: the per-unit relative variance of phi(z)^2."""
        _, m2, m4 = self.moments(variance)
        return m4 / (m2 * m2) - 1.0 if m2 > 0 else 0.0

    def log_slope(self, variance: float) -> float:
        """d ln E[phi^2] / d ln q: how a change in input length carries to the output."""
        if self.homogeneous is not None:
            return 1.0
        h = 1e-3
        up = self.second_moment(variance * math.exp(h))
        down = self.second_moment(variance * math.exp(-h))
        if up <= 0 or down <= 0:
            return 0.0
        return (math.log(up) - math.log(down)) / (2 * h)

    def right_gain(self) -> float:
        """sigma^2 that keeps the pre-activation variance at 1: 1 / E[phi(z)^2], z ~ N(0,1)."""
        return 1.0 / self.second_moment(1.0)


@lru_cache(maxsize=4096)
def _gauss_moments(act: Activation, variance: float, mean: float) -> tuple[float, float, float]:
    if variance <= 0:
        value = float(act.phi(np.array([mean]))[0])
        return value, value**2, value**4
    if act.homogeneous is not None and mean == 0.0:
        a1, a2, a4 = act.homogeneous
        return a1 * math.sqrt(2 * variance / math.pi), a2 * variance, a4 * 3 * variance**2
    return tuple(_expect_powers(act.phi, mean, math.sqrt(variance), (1, 2, 4)))  # type: ignore[return-value]


@lru_cache(maxsize=4096)
def _gauss_second(act: Activation, variance: float, mean: float) -> float:
    """E[phi(z)^2], z ~ N(mean, variance): :func:`_gauss_moments`'s middle entry, alone."""
    if variance <= 0 or (act.homogeneous is not None and mean == 0.0):
        return _gauss_moments(act, variance, mean)[1]
    return _expect_powers(act.phi, mean, math.sqrt(variance), (2,))[0]


def _leaky(alpha: float) -> Activation:
    return Activation(
        name="leaky_relu",
        phi=lambda x: np.where(x > 0, x, alpha * x),
        homogeneous=((1 - alpha) / 2, (1 + alpha**2) / 2, (1 + alpha**4) / 2),
    )


def _elu(alpha: float, scale: float = 1.0, name: str = "elu") -> Activation:
    return Activation(name, lambda x: scale * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))))


_FIXED: dict[str, Activation] = {
    "relu": Activation("relu", lambda x: np.maximum(x, 0), (0.5, 0.5, 0.5)),
    "identity": Activation("identity", lambda x: x, (0.0, 1.0, 1.0)),
    "tanh": Activation("tanh", np.tanh),
    "sigmoid": Activation("sigmoid", _sigmoid),
    "softplus": Activation("softplus", lambda x: np.logaddexp(0, x)),
    "silu": Activation("silu", lambda x: x * _sigmoid(x)),
    "gelu": Activation("gelu", lambda x: 0.5 * x * (1 + _erf(x / _SQRT2))),
    "gelu_tanh": Activation(
        "gelu_tanh", lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    ),
}

SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805


def get_activation(name: str, alpha: float | None = None, **attrs: object) -> Activation:
    """The activation called ``name`` (see ``graph.ACTIVATIONS``) with its parameters.

    Accepts a layer's whole ``attrs`` as keywords; the keys it does not use are ignored.
    """
    if name in ("leaky_relu", "prelu"):
        return _leaky(0.01 if alpha is None else float(alpha))
    if name == "elu":
        return _elu(1.0 if alpha is None else float(alpha))
    if name == "selu":
        scale = attrs.get("gamma", SELU_SCALE)
        return _elu(SELU_ALPHA if alpha is None else float(alpha), float(scale), "selu")  # type: ignore[arg-type]
    if name == "gelu" and attrs.get("approximate") == "tanh":
        return _FIXED["gelu_tanh"]
    try:
        return _FIXED[name]
    except KeyError:
        raise KeyError(f"unknown activation {name!r}") from None
