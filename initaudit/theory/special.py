"""Polygamma functions and the log-cumulants of the random factors in a layer.

numpy has no digamma; these use the recurrence psi(x) = psi(x+1) - 1/x up to x >= 8 and
then the asymptotic series, accurate to ~1e-12 there.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

Cumulants = tuple[float, float, float]  # mean, variance, third cumulant of a log


def digamma(x: float) -> float:
    shift = 0.0
    while x < 12.0:
        shift -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    series = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))
    return shift + math.log(x) - 0.5 / x - series


def trigamma(x: float) -> float:
    shift = 0.0
    while x < 12.0:
        shift += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    series = 1 / x + f / 2 + f / x * (1 / 6 - f * (1 / 30 - f * (1 / 42 - f / 30)))
    return shift + series


def tetragamma(x: float) -> float:
    shift = 0.0
    while x < 12.0:
        shift -= 2.0 / (x * x * x)
        x += 1.0
    f = 1.0 / (x * x)
    series = -f - f / x - f * f / 2 + f**3 / 6 - f**4 / 6 + f**5 * 3 / 10 - f**6 * 5 / 6
    return shift + series


def log_chi2_mean(k: float) -> Cumulants:
    """Cumulants of ln(chi^2_k / k): the noise in an average of k squared Gaussians."""
    return digamma(k / 2) + math.log(2 / k), trigamma(k / 2), tetragamma(k / 2)


def log_gamma_matched(relative_variance: float) -> Cumulants:
    """Cumulants of ln Y for Y ~ Gamma with mean 1 and the given relative variance.

    Used for averages of n i.i.d. positive terms whose exact law has no closed form:
    the Gamma law matches the first two moments, and is exact for chi^2.
    """
    if relative_variance <= 0:
        return 0.0, 0.0, 0.0
    shape = 1.0 / relative_variance
    return digamma(shape) - math.log(shape), trigamma(shape), tetragamma(shape)


@lru_cache(maxsize=512)
def log_relu_average(n: int) -> Cumulants:
    """Exact cumulants of ln((1/n) sum_k relu(g_k)^2) for g ~ N(0, I_n), given it is not 0.

    The sum is chi^2_B with B ~ Binomial(n, 1/2) (Hanin & Rolnick): a mixture over B of
    log-chi^2 laws. B = 0 (probability 2^-n, a dead layer) is excluded.
    """
    b = np.arange(1, n + 1)
    log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in b])
    pmf = np.exp(log_pmf - n * math.log(2))
    pmf /= pmf.sum()
    means = np.array([digamma(k / 2) for k in b]) + math.log(2 / n)
    variances = np.array([trigamma(k / 2) for k in b])
    thirds = np.array([tetragamma(k / 2) for k in b])
    mean = float(pmf @ means)
    centred = means - mean
    variance = float(pmf @ variances + pmf @ centred**2)
    third = float(pmf @ thirds + 3 * pmf @ (centred * variances) + pmf @ centred**3)
    return mean, variance, third


def median_from_cumulants(mean: float, variance: float, third: float) -> float:
    """Median of exp(X) from X's first three cumulants (Cornish–Fisher, first order)."""
    if variance <= 0:
        return math.exp(mean)
    return math.exp(mean - third / (6 * variance))
