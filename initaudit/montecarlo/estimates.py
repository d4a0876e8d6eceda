"""Per-tap statistics of a Monte Carlo ensemble, each with its standard error (numpy only).

``values`` are M_j over independent network samples; everything is relative to M_0.
Standard errors are large-sample ones from the same samples:

- mean: ``sd / sqrt(n)``.
- median: distribution-free, from the order statistics that bracket the median with 95%
  binomial coverage, ``(r_(c + z sqrt(n)/2) - r_(c - z sqrt(n)/2)) / (2 z)`` with
  ``c = (n-1)/2`` and linear interpolation between order statistics: the asymptotic
  ``1 / (2 f(m) sqrt(n))`` without estimating the density f.
- log-moments of ``r = M_j / M_0`` (THEORY compares these because M_L is heavy-tailed):
  ``E ln r`` with ``sd(ln r) / sqrt(n)``; ``Var ln r`` with ``sqrt((m4 - s^4 (n-3)/(n-1)) / n)``,
  m4 the fourth central moment of ln r. They are over the positive samples: a network whose
  signal died (M = 0 exactly) has no logarithm; ``zeros`` counts those.
- second moment ``E[r^2]`` with ``sd(r^2) / sqrt(n)``, and ``spread = E[r^2]/E[r]^2 - 1``
  (the prediction's ``spread``) by the delta method. Trust these only where the tails are
  light (THEORY: L/n <~ 0.2): on log-normal samples the se's are right within 5% for
  Var ln r = 0.09, but 10-20% low at 0.36 and 20-50% low at 1 (n = 500-2000); the mean,
  median and log-moment se's stay within 7% at Var ln r = 1. ``second_se_approximate`` marks
  the taps where ``Var ln r > 0.25`` (HEAVY_TAIL_LOG_VAR), where those se's run 10% low or worse.

Non-finite samples (NaN, or inf from an overflowing float32 network) are left out of every
statistic and counted in ``nonfinite``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

_Z = 1.959963984540054  # two-sided 95% normal quantile, for the median's order statistics
#: Above this Var ln r the second moment's and spread's standard errors run 10% low or worse.
HEAVY_TAIL_LOG_VAR = 0.25


@dataclass(frozen=True)
class TapEstimate:
    """Monte Carlo statistics of M_j / M_0 at one tap, each with its standard error."""

    name: str
    mean: float
    mean_se: float
    median: float
    median_se: float
    log_mean: float  # E ln(M_j / M_0) over the positive samples
    log_mean_se: float
    log_var: float  # Var ln(M_j / M_0) over the positive samples
    log_var_se: float
    second: float  # E[(M_j / M_0)^2]
    second_se: float
    samples: int  # finite samples used
    spread: float = math.nan  # E[r^2] / E[r]^2 - 1
    spread_se: float = math.nan
    zeros: int = 0  # samples with M_j = 0: left out of the log-moments
    nonfinite: int = 0  # NaN or inf samples: left out of everything

    @property
    def second_se_approximate(self) -> bool:
        """True where the tails are heavy enough that ``second_se`` and ``spread_se`` are
        approximate (biased low): Var ln r above :data:`HEAVY_TAIL_LOG_VAR`, or unknown."""
        return not (math.isfinite(self.log_var) and self.log_var <= HEAVY_TAIL_LOG_VAR)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "second_se_approximate": self.second_se_approximate}


def estimate(values: np.ndarray, m0: float | np.ndarray, *, name: str = "") -> TapEstimate:
    """Statistics of ``values / m0`` (``m0`` a number, or one per sample when the input was
    drawn afresh for each network)."""
    raw = np.asarray(values, dtype=np.float64).reshape(-1)
    ratio = raw / np.asarray(m0, dtype=np.float64)
    finite = np.isfinite(ratio)
    r = ratio[finite]
    n = int(r.size)
    nan = math.nan
    positive = r[r > 0]
    zeros = int(np.count_nonzero(r == 0))
    mean, mean_se = _mean_se(r)
    median, median_se = median_with_se(r)
    logs = np.log(positive)
    log_mean, log_mean_se = _mean_se(logs)
    log_var, log_var_se = variance_with_se(logs)
    second, second_se = _mean_se(r * r)
    spread, spread_se = _spread(r)
    return TapEstimate(
        name=name,
        mean=mean,
        mean_se=mean_se,
        median=median if n else nan,
        median_se=median_se,
        log_mean=log_mean,
        log_mean_se=log_mean_se,
        log_var=log_var,
        log_var_se=log_var_se,
        second=second,
        second_se=second_se,
        samples=n,
        spread=spread,
        spread_se=spread_se,
        zeros=zeros,
        nonfinite=int(ratio.size - n),
    )


def var_hat(per_network_taps: np.ndarray, m0: float | np.ndarray = 1.0) -> tuple[float, float]:
    """FM2's ``Var^[M] = (1/L) sum_j M_j^2 - ((1/L) sum_j M_j)^2`` per network (a row of the
    (samples, L) array, over its L taps, divided by ``m0``), averaged over networks; with its
    standard error. Rows with a non-finite entry are left out."""
    taps = np.asarray(per_network_taps, dtype=np.float64)
    if taps.ndim != 2:
        raise ValueError("per_network_taps must be a (samples, taps) array")
    scale = np.asarray(m0, dtype=np.float64)
    taps = taps / (scale.reshape(-1, 1) if scale.ndim else scale)
    rows = taps[np.isfinite(taps).all(axis=1)]
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return math.nan, math.nan
    per_network = rows.var(axis=1)  # ddof 0: the empirical variance across one network's layers
    return _mean_se(per_network)


def median_with_se(x: np.ndarray) -> tuple[float, float]:
    """The sample median and its distribution-free standard error (module docstring)."""
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan
    ordered = np.sort(x)
    median = float(np.median(ordered))
    if n < 3:
        return median, math.nan
    half = _Z * math.sqrt(n) / 2
    centre = (n - 1) / 2  # the median's position among 0-based order statistics
    lo, hi = np.interp([max(centre - half, 0.0), min(centre + half, n - 1.0)], np.arange(n), ordered)
    return median, float(hi - lo) / (2 * _Z)


def variance_with_se(x: np.ndarray) -> tuple[float, float]:
    """The unbiased sample variance and its large-sample standard error,
    ``sqrt((m4 - s^4 (n-3)/(n-1)) / n)``."""
    n = int(x.size)
    if n < 2:
        return math.nan, math.nan
    var = float(np.var(x, ddof=1))
    if n < 4:
        return var, math.nan
    m4 = float(np.mean((x - x.mean()) ** 4))
    return var, math.sqrt(max(m4 - var * var * (n - 3) / (n - 1), 0.0) / n)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan
    mean = float(np.mean(x))
    if n < 2:
        return mean, math.nan
    return mean, float(np.std(x, ddof=1)) / math.sqrt(n)


def _spread(r: np.ndarray) -> tuple[float, float]:
    """E[r^2]/E[r]^2 - 1 and its delta-method se from the joint covariance of (r, r^2)."""
    n = int(r.size)
    if n < 2:
        return math.nan, math.nan
    a, b = float(r.mean()), float((r * r).mean())
    if a == 0:
        return math.nan, math.nan
    cov = np.cov(np.stack([r, r * r]), ddof=1)
    grad = np.array([-2 * b / a**3, 1 / a**2])
    return b / (a * a) - 1, math.sqrt(max(float(grad @ cov @ grad), 0.0) / n)
