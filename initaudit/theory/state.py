"""The random state of one tensor at init, as the transfer rules see it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from initaudit.theory.special import Cumulants, log_chi2_mean, median_from_cumulants

#: The chi^2 noise of a fresh linear output depends on the width alone: read on every layer.
_chi2_noise = lru_cache(maxsize=1024)(log_chi2_mean)


@dataclass(frozen=True)
class Law:
    """Marginal law of an entry: phi(z) with z ~ N(mean, variance). Pooling needs it."""

    activation: str = "identity"
    alpha: float | None = None
    mean: float = 0.0
    variance: float = 1.0


@dataclass(frozen=True)
class Modes:
    """Odd Hermite modes of a stream's coordinates, the ones a ReLU reading the stream sees.

    With x = y / RMS(y) the stream's coordinates in units of their root mean square,
    h_j = (1/n) sum_k He_j(x_k). The positive fraction of the stream's energy is exactly
    (1 + sum_odd a_j h_j) / 2 (a_1 = 2 sqrt(2/pi), a_3 = a_1 / 6 for ReLU), so a branch that
    applies ReLU to the stream grows it more when h_1 (the coordinate mean) is positive.
    Each mode has a mean, a variance, and a covariance with ln M (the stream's log length):
    for i.i.d. Gaussian coordinates they are 0, j!/n and 0; a fixed input has all zero.
    """

    mean1: float = 0.0
    var1: float = 0.0
    cov1: float = 0.0
    mean3: float = 0.0
    var3: float = 0.0
    cov3: float = 0.0

    @classmethod
    def iid(cls, width: int) -> Modes:
        """Coordinates i.i.d. Gaussian given the length (the output of a random linear layer)."""
        n = max(width, 1)
        return cls(var1=1.0 / n, var3=6.0 / n)


@dataclass(frozen=True)
class SignalState:
    """Moments of a tensor's entries over the random weights, normalized so M_0 = 1.

    Entries are treated as exchangeable: ``m2 = E[x_k^2]`` (so E[M] = m2 where
    M = ||x||^2 / n), ``m4 = E[x_k^4]``, ``c22 = E[x_k^2 x_l^2]`` for k != l, and ``mu`` the
    per-entry mean. Then E[M^2] = m4/n + (1 - 1/n) c22 exactly.

    ``log`` holds the cumulants of ln S, where S is the length's *scale*: when ``fresh``
    (the output of a random linear layer, entries i.i.d. N(0, S) given S) the measured
    length is S * chi^2_n/n, and the next activation replaces that chi^2 noise with its
    own; otherwise S is the length itself.
    """

    width: int
    mu: float
    m2: float
    m4: float
    c22: float
    log: Cumulants = (0.0, 0.0, 0.0)
    fresh: bool = False
    law: Law = Law()
    #: Set by residual joins, which track the stream's coordinate modes; None: i.i.d. coordinates.
    modes: Modes | None = None

    @classmethod
    def input(cls, width: int, mean_square: float = 1.0) -> SignalState:
        """A fixed input with Gaussian-like entries and M_0 = ``mean_square`` exactly (1 by default:
        a float input, normalized). An embedding lookup starts at its table's mean square: every
        field follows from :meth:`scaled` (m4, c22 by its square, ln M by its log; the coordinate
        modes are in units of the RMS, so they stay zero)."""
        n = max(width, 1)
        c22 = (n - 3) / (n - 1) if n > 1 else 1.0
        state = cls(width=n, mu=0.0, m2=1.0, m4=3.0 if n > 1 else 1.0, c22=c22, law=Law(), modes=Modes())
        if mean_square == 1.0 or not (math.isfinite(mean_square) and mean_square > 0):
            return state
        return state.scaled(math.sqrt(mean_square))

    @property
    def stream_modes(self) -> Modes:
        return self.modes if self.modes is not None else Modes.iid(self.width)

    @property
    def mean_length(self) -> float:
        return self.m2

    @property
    def second_length(self) -> float:
        n = self.width
        return self.m4 / n + (1 - 1 / n) * self.c22

    @property
    def spread(self) -> float:
        """Relative variance of the length: E[M^2]/E[M]^2 - 1."""
        if self.m2 <= 0:
            return 0.0
        ratio = self.second_length / self.m2 / self.m2  # not m2**2: that raises past 1e154
        return max(ratio - 1.0, 0.0) if not math.isnan(ratio) else math.inf

    @property
    def log_length(self) -> Cumulants:
        """Cumulants of ln M: the scale's, plus the chi^2 noise of a fresh linear output."""
        if not self.fresh:
            return self.log
        noise = _chi2_noise(self.width)
        return tuple(a + b for a, b in zip(self.log, noise, strict=True))  # type: ignore[return-value]

    @property
    def median(self) -> float:
        if self.m2 <= 0:
            return 0.0
        try:
            return median_from_cumulants(*self.log_length)
        except OverflowError:  # a length beyond float range (e^709): say so rather than crash
            return math.inf

    def scaled(self, factor: float) -> SignalState:
        """The state of ``factor`` times this tensor (factor applies to entries)."""
        f2 = factor * factor
        k1, k2, k3 = self.log
        log = (k1 + math.log(f2), k2, k3) if f2 > 0 else (-math.inf, 0.0, 0.0)
        if self.law.activation == "identity":
            law = replace(self.law, mean=self.law.mean * factor, variance=self.law.variance * f2)
        else:  # a scaled phi(z) is no longer phi of a Gaussian: fall back to a Gaussian law
            law = Law(mean=self.mu * factor, variance=max(self.m2 - self.mu * self.mu, 0.0) * f2)
        return replace(
            self, mu=self.mu * factor, m2=self.m2 * f2, m4=self.m4 * f2 * f2, c22=self.c22 * f2 * f2,
            log=log, law=law,
        )  # fmt: skip
