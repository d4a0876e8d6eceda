"""The analytic path's fast implementations against their straightforward forms, and its cost
per layer against depth.

Each fast function is compared with the unoptimized formula it replaces: the per-window
noncentral chi-square log-moments (``log_noncentral_reference``, the first
implementation), a full copy of the states per branch re-run, and the O(L^2) pair sum of
E[Var^[M]] evaluated in exact rational arithmetic. Agreement is to float rounding: a few ulps
of the magnitudes each result is summed from, and 1e-12 relative on every predicted number.
"""

from __future__ import annotations

import dataclasses
import math
import time
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from initaudit.predict import build_graph
from initaudit.synthetic import residual_mlp
from initaudit.theory import propagate, transfer
from initaudit.theory.propagate import Propagator, expected_var_hat, predict

EPS = np.finfo(float).eps


def log_noncentral_reference(n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``transfer._log_noncentral`` one node at a time, as first written."""
    means, variances, thirds = np.zeros_like(t), np.zeros_like(t), np.zeros_like(t)
    for i, value in enumerate(t):
        if value <= 0:
            continue
        half = n / (2 * value)
        if half > transfer._POISSON_MAX:  # D = ln(1 + T) + ln(1 + eps), eps of variance ve
            ve = 2 * value * (2 + value) / (n * (1 + value) ** 2)
            means[i], variances[i] = math.log1p(value) - ve / 2, ve
            continue
        spread = 12 * math.sqrt(half) + 12
        first = max(0, math.floor(half - spread))
        j = np.arange(first, math.ceil(half + spread) + 1, dtype=float)
        # ln J! by a running sum from the first term: one lgamma per T
        log_factorial = math.lgamma(first + 1) + np.concatenate(([0.0], np.cumsum(np.log(j[1:]))))
        log_pmf = j * math.log(max(half, 1e-300)) - log_factorial
        pmf = np.exp(log_pmf - log_pmf.max())
        pmf /= pmf.sum()
        psi0, psi1, psi2 = transfer._polygamma(n / 2 + j)
        mean = float(pmf @ psi0)
        dev = psi0 - mean
        means[i] = math.log(value / n) + math.log(2) + mean
        variances[i] = float(pmf @ psi1 + pmf @ dev**2)
        thirds[i] = float(pmf @ psi2 + 3 * pmf @ (dev * psi1) + pmf @ dev**3)
    return means, variances, thirds


# The noncentral chi-square log-moments ------------------------------------------------------


def _nodes(center: float, spread: float) -> np.ndarray:
    """T at the stream join's 15 Gauss-Hermite nodes of ln T ~ N(ln center, spread^2)."""
    return center * np.exp(spread * transfer._GH_NODES)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 64, 100, 1000, 50_000])
@pytest.mark.parametrize(
    ("center", "spread"),
    [
        (1.0, 0.0),  # short Poisson windows
        (1.0, 1.0),
        (0.0025, 0.05),  # eta = 1/sqrt(400): windows of thousands of terms
        (0.003, 0.3),  # nodes on both sides of the 1/lambda expansion's threshold
        (1e-6, 2.0),
        (30.0, 3.0),  # T >> 1: Poisson means near 0
    ],
)
def test_log_noncentral_matches_the_reference_to_rounding(n: int, center: float, spread: float) -> None:
    t = _nodes(center, spread)
    t[3] = 0.0  # a dead node is skipped by both
    got = transfer._log_noncentral(n, t)
    want = log_noncentral_reference(n, t)
    # D = ln(T/n) + ln 2 + E psi(n/2 + J): rounding is relative to the terms summed, not to D,
    # which is small where T is; the third cumulant inherits an ulp of E psi times Var.
    log_t = np.abs(np.log(np.where(t > 0, t, 1.0) / n))
    psi_mean = np.abs(want[0]) + log_t + 1.0
    scales = (log_t + psi_mean, want[1], np.abs(want[2]) + psi_mean * want[1])
    for label, a, b, scale in zip(("mean", "variance", "third"), got, want, scales, strict=True):
        error = np.abs(a - b)
        assert np.all(error <= 64 * EPS * scale + 1e-300), (label, n, center, spread, error / scale)


def test_polygamma_grid_is_the_direct_evaluation() -> None:
    for n in (1, 7, 64, 4096):
        grid = transfer._polygamma_grid(n)
        j = np.array([0.0, 1.0, 5.0, 11.0, 12.0, 1000.0, transfer._J_END - 1.0])
        direct = transfer._polygamma(n / 2 + j)
        for values, expected in zip(grid, direct, strict=True):
            np.testing.assert_array_equal(values[j.astype(int)], expected)
    # the last J any window reads lies on the grid
    half = transfer._POISSON_MAX
    assert math.ceil(half + 12 * math.sqrt(half) + 12) < transfer._J_END


# Predictions: fast path against the reference path ------------------------------------------


def _pair_sum_loop(means: list[float], seconds: list[float]) -> float:
    """E[Var^[M]] by the explicit double sum over tap pairs (the first implementation)."""
    count = len(means)
    if count == 0:
        return 0.0
    pairs = sum(seconds)
    for j in range(count):
        if means[j] <= 0:
            continue
        for k in range(j + 1, count):
            pairs += 2 * seconds[j] * means[k] / means[j]
    return sum(seconds) / count - pairs / count**2


def _floats(value: Any) -> list[float]:
    """Every float in a (nested) dataclass or tuple, in field order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _floats(dataclasses.astuple(value))
    if isinstance(value, tuple | list):
        return [x for item in value for x in _floats(item)]
    if isinstance(value, dict):
        return [x for key in value for x in _floats(value[key])]
    return [value] if isinstance(value, float) else []


def _everything(graph: Any) -> list[float]:
    pred = predict(graph)
    return _floats((pred.layers, pred.blocks, pred.summary, pred.states))


GRAPHS = {
    "residual eta=1": lambda: build_graph([64], residual=30),
    "residual eta=1/sqrt(L)": lambda: build_graph([64], residual=60, eta="1/sqrt(L)"),
    "residual eta=0.05": lambda: build_graph([64], residual=40, eta=0.05),
    "narrow stream": lambda: build_graph([4], residual=40, eta=0.2),
    "wide stream with stem": lambda: build_graph([32, 1000], residual=20, eta=0.1),
    "gelu branches": lambda: build_graph([64], residual=20, eta=0.2, activation="gelu"),
    "pre-norm": lambda: build_graph([64], residual=30, norm="layer"),
    "relu-terminated": lambda: residual_mlp(64, 30, eta=0.14, terminal="relu"),
    "plain": lambda: build_graph([48] * 40),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_predictions_match_the_reference_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _everything(GRAPHS[name]())
    with monkeypatch.context() as patch:
        patch.setattr(transfer, "_log_noncentral", log_noncentral_reference)
        patch.setattr(Propagator, "_overlay", lambda self, changed: {**self.env, **changed})
        patch.setattr(propagate, "expected_var_hat", _pair_sum_loop)
        slow = _everything(GRAPHS[name]())
    assert len(fast) == len(slow) > 0
    for a, b in zip(fast, slow, strict=True):
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        assert abs(a - b) <= 1e-12 * max(abs(a), abs(b)), (name, a, b)


def _exact_var_hat(means: list[float], seconds: list[float]) -> float:
    m, s = [Fraction(x) for x in means], [Fraction(x) for x in seconds]
    count = len(m)
    pairs = sum(s)
    for j in range(count):
        if m[j] > 0:
            pairs += sum(2 * s[j] * m[k] / m[j] for k in range(j + 1, count))
    return float(sum(s) / count - pairs / count**2)


@pytest.mark.parametrize("seed", range(6))
def test_expected_var_hat_is_the_pair_sum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 120))
    means = list(np.exp(np.cumsum(rng.normal(0, 0.3, count))))  # a length's random walk
    seconds = [m * m * (1 + s) for m, s in zip(means, rng.uniform(0, 2, count), strict=True)]
    if seed % 2:
        means[count // 2] = 0.0  # a dead tap: left out as the first of a pair
    exact = _exact_var_hat(means, seconds)
    assert expected_var_hat(means, seconds) == pytest.approx(exact, rel=1e-12, abs=1e-12 * max(seconds))


def test_expected_var_hat_for_constant_lengths_is_the_he_closed_form() -> None:
    # E[M_j] = 1: E[Var^] = sum_j E[M_j^2] (2j - L - 1) / L^2 (THEORY, He initialization)
    seconds = [1.0 + 0.1 * j for j in range(200)]
    closed = math.fsum(p * (2 * j - 201) for j, p in enumerate(seconds, start=1)) / 200**2
    assert expected_var_hat([1.0] * 200, seconds) == pytest.approx(closed, rel=1e-12)
    assert expected_var_hat([], []) == 0.0


# Work per block against depth ---------------------------------------------------------------


class _CountingStates(dict):  # type: ignore[type-arg]
    """The propagator's states, counting every state read: lookups, membership tests, and
    each entry a copy (``dict(env)``, ``{**env}``) goes through."""

    reads = 0

    def __getitem__(self, key: str) -> Any:
        _CountingStates.reads += 1
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        _CountingStates.reads += 1
        return super().__contains__(key)

    def __iter__(self) -> Any:  # copies go through keys() and __getitem__ once this is overridden
        return iter(list(super().keys()))

    def keys(self) -> Any:
        return list(super().keys())


def _work(blocks: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """(state reads, layer rule runs, log-moment evaluations) for one residual propagation."""
    runs = {"layer": 0, "log": 0}
    run_layer, log_noncentral = Propagator.run_layer, transfer._log_noncentral

    def counted_run_layer(self: Propagator, layer: Any, env: Any) -> Any:
        runs["layer"] += 1
        return run_layer(self, layer, env)

    def counted_log(n: int, t: np.ndarray) -> Any:
        runs["log"] += 1
        return log_noncentral(n, t)

    with monkeypatch.context() as patch:
        patch.setattr(Propagator, "run_layer", counted_run_layer)
        patch.setattr(transfer, "_log_noncentral", counted_log)
        propagator = Propagator(build_graph([16], residual=blocks, eta=0.3))
        propagator.env = _CountingStates()
        _CountingStates.reads = 0
        propagator.run()
    return _CountingStates.reads, runs["layer"], runs["log"]


def test_work_per_block_does_not_grow_with_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counts, not times: affine in the number of blocks means a fixed amount of work per block
    # (a copy of all states per branch re-run made the reads grow with depth, quadratically).
    w10, w20, w40 = (_work(blocks, monkeypatch) for blocks in (10, 20, 40))
    for small, middle, large in zip(w10, w20, w40, strict=True):
        assert middle - small > 0
        assert large - middle == 2 * (middle - small), (w10, w20, w40)
    assert w40[2] == 40  # one log-moment evaluation per residual join


def _best_seconds(graph: Any, repeat: int = 3) -> float:
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        predict(graph)
        best = min(best, time.perf_counter() - start)
    return best


def test_plain_predict_time_per_layer_is_flat_in_depth() -> None:
    # The summary's pair sum over taps was O(L^2) in Python: at 6000 layers it took 7.5 times
    # the time per layer of 300 layers; now about 1.1. The bound leaves room for a loaded machine.
    short, deep = build_graph([32] * 300), build_graph([32] * 6000)
    predict(short)
    per_layer_short = _best_seconds(short) / len(short.layers)
    per_layer_deep = _best_seconds(deep) / len(deep.layers)
    assert per_layer_deep < 3 * per_layer_short, (per_layer_short, per_layer_deep)
