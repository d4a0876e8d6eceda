"""Weight statistics from an array, and which known init scheme they match.

Pure numpy. Statistics are accumulated in float64 over chunks so that a 1 GB tensor
costs one pass and no full-size float64 copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 22  # elements per accumulation step


@dataclass(frozen=True)
class TensorStats:
    """Summary of one weight tensor; every moment is over its finite entries."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    count: int
    mean: float
    std: float
    second_moment: float  # E[w^2], what a layer's gain actually depends on
    kurtosis: float  # E[w^4] / E[w^2]^2 (Gaussian 3, uniform 1.8); nan if all zero
    absmax: float
    nonfinite: int
    zeros: int

    @property
    def rms(self) -> float:
        return math.sqrt(self.second_moment)

    @property
    def all_zero(self) -> bool:
        return self.count > 0 and self.zeros == self.count

    @property
    def finite(self) -> bool:
        return self.nonfinite == 0


def tensor_stats(name: str, array: np.ndarray) -> TensorStats:
    """Compute :class:`TensorStats` for ``array`` in one chunked pass."""
    flat = np.asarray(array).reshape(-1)
    count = int(flat.size)
    s1 = s2 = s4 = 0.0
    absmax = 0.0
    nonfinite = zeros = finite_count = 0
    for start in range(0, count, _CHUNK):
        chunk = flat[start : start + _CHUNK].astype(np.float64, copy=False)
        finite = np.isfinite(chunk)
        bad = int(chunk.size - np.count_nonzero(finite))
        if bad:
            nonfinite += bad
            chunk = chunk[finite]
        zeros += int(chunk.size - np.count_nonzero(chunk))
        finite_count += int(chunk.size)
        if chunk.size == 0:
            continue
        sq = chunk * chunk
        s1 += float(chunk.sum())
        s2 += float(sq.sum())
        s4 += float((sq * sq).sum())
        absmax = max(absmax, float(np.abs(chunk).max()))
    n = max(finite_count, 1)
    mean = s1 / n
    second = s2 / n
    var = max(second - mean * mean, 0.0)
    kurtosis = (s4 / n) / (second * second) if second > 0 else float("nan")
    return TensorStats(
        name=name,
        shape=tuple(int(d) for d in np.shape(array)),
        dtype=str(np.asarray(array).dtype),
        count=count,
        mean=mean,
        std=math.sqrt(var),
        second_moment=second,
        kurtosis=kurtosis,
        absmax=absmax,
        nonfinite=nonfinite,
        zeros=zeros,
    )


# Kurtosis of the standard normal truncated to [-c, c], and its variance factor.
def _truncated_normal(c: float) -> tuple[float, float]:
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))
    m2 = 1 - 2 * c * phi / mass
    m4 = 3 - 2 * (c**3 + 3 * c) * phi / mass
    return m2, m4 / (m2 * m2)


@dataclass(frozen=True)
class Scheme:
    name: str
    std: float
    kurtosis: float


def init_schemes(fan_in: int, fan_out: int | None) -> list[Scheme]:
    """The init schemes people actually use, in order of preference when two coincide."""
    fan_out = fan_out or fan_in
    uniform, normal = 1.8, 3.0
    xavier = math.sqrt(2.0 / (fan_in + fan_out))
    return [
        Scheme("he_normal", math.sqrt(2.0 / fan_in), normal),
        Scheme("he_uniform", math.sqrt(2.0 / fan_in), uniform),
        Scheme("pytorch_default", 1.0 / math.sqrt(3.0 * fan_in), uniform),
        Scheme("xavier_normal", xavier, normal),
        Scheme("xavier_uniform", xavier, uniform),
        Scheme("lecun_normal", 1.0 / math.sqrt(fan_in), normal),
        Scheme("he_fan_out", math.sqrt(2.0 / fan_out), normal),
    ]


def match_scheme(stats: TensorStats, fan_in: int | None, fan_out: int | None = None) -> str:
    """Name the init scheme ``stats`` looks drawn from, or "unrecognized".

    The std must agree within five standard errors of the sample std (at least 3%).
    Kurtosis separates normal from uniform laws only when the tensor is large enough
    for the sample kurtosis to mean something.
    """
    if stats.count == 0:
        return "empty"
    if not stats.finite:
        return "non-finite"
    if stats.all_zero:
        return "zeros"
    if stats.std == 0:
        return "constant"
    kurt = stats.kurtosis
    rel_se = math.sqrt(max(kurt - 1.0, 0.1) / (4 * stats.count))
    tolerance = max(0.03, 5 * rel_se)
    kurt_reliable = stats.count >= 500
    if fan_in:
        for scheme in init_schemes(fan_in, fan_out):
            if abs(stats.std / scheme.std - 1) > tolerance:
                continue
            if kurt_reliable and abs(kurt - scheme.kurtosis) > 0.35:
                continue
            if not kurt_reliable:
                return scheme.name.split("_")[0]
            return scheme.name
    # trunc_normal_ with absolute bounds +-2: visible as a hard edge at 2 and a low kurtosis.
    if kurt_reliable and stats.absmax <= 2.0 + 1e-6 and stats.std > 0.4:
        return f"trunc_normal(std={stats.std / math.sqrt(_truncated_normal(2.0 / stats.std)[0]):.3g})"
    if kurt_reliable and abs(kurt - 3.0) < 0.35:
        return f"normal(std={stats.std:.3g})"
    if kurt_reliable and abs(kurt - 1.8) < 0.2:
        return f"uniform(std={stats.std:.3g})"
    return "unrecognized"
