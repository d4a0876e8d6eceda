"""The theory engine against THEORY.md's closed forms and worked numbers.

Each expected value is computed here independently of the engine (a product formula, an
explicit recursion) or quoted from THEORY.md's Monte Carlo-checked table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from initaudit.synthetic import plain_mlp, residual_mlp
from initaudit.theory.activations import get_activation
from initaudit.theory.propagate import expected_var_hat, predict
from initaudit.theory.special import digamma, log_relu_average, tetragamma, trigamma


def summary(graph):
    return predict(graph).summary


# Section 2: activation moments ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "second", "variance", "excess"),
    [
        ("relu", 0.5, 0.340845, 5.0),
        ("tanh", 0.394294, 0.394294, 0.627),
        ("gelu", 0.425221, 0.345644, 6.216),
        ("silu", 0.355776, 0.313083, 6.262),
        ("sigmoid", 0.293379, 0.043379, 0.529),
    ],
)
def test_activation_moments_match_theory_table(name, second, variance, excess):
    act = get_activation(name)
    m1, m2, _ = act.moments(1.0)
    assert m2 == pytest.approx(second, abs=2e-6)
    assert m2 - m1 * m1 == pytest.approx(variance, abs=2e-6)
    assert act.excess() == pytest.approx(excess, abs=2e-3)


def test_leaky_relu_closed_forms():
    a = 0.2
    act = get_activation("leaky_relu", a)
    assert act.second_moment(1.0) == pytest.approx((1 + a * a) / 2)
    assert act.excess() == pytest.approx(6 * (1 + a**4) / (1 + a * a) ** 2 - 1)


def test_quadrature_agrees_with_homogeneous_closed_form_off_centre():
    # Off-centre inputs go through quadrature; compare ReLU with the Gaussian closed form.
    mean, var = 0.7, 2.0
    sd = math.sqrt(var)
    t = mean / sd
    pdf, cdf = math.exp(-t * t / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(t / math.sqrt(2)))
    exact = (mean * mean + var) * cdf + mean * sd * pdf
    assert get_activation("relu").second_moment(var, mean) == pytest.approx(exact, rel=1e-4)


# Special functions --------------------------------------------------------------------


def test_polygamma_values():
    euler = 0.5772156649015329
    assert digamma(1.0) == pytest.approx(-euler, abs=1e-12)
    assert trigamma(1.0) == pytest.approx(math.pi**2 / 6, abs=1e-12)
    assert tetragamma(1.0) == pytest.approx(-2 * 1.2020569031595942, abs=1e-10)
    assert digamma(0.5) == pytest.approx(-euler - 2 * math.log(2), abs=1e-12)


def test_relu_log_cumulants_against_simulation():
    rng = np.random.default_rng(0)
    n = 16
    g = rng.standard_normal((200_000, n))
    y = (np.maximum(g, 0) ** 2).mean(axis=1)
    logs = np.log(y[y > 0])
    mean, var, _ = log_relu_average(n)
    se_mean = math.sqrt(var / logs.size)
    assert abs(logs.mean() - mean) < 4 * se_mean
    assert logs.var() == pytest.approx(var, rel=0.02)  # SE of a variance ~ sqrt(2/N) * 3 (skewed)


# Section 2: mean length (FM1) -----------------------------------------------------------


def test_he_preserves_mean_length_at_any_depth():
    assert summary(plain_mlp(64, [64] * 40)).mean_ratio == pytest.approx(1.0, rel=1e-12)


def test_xavier_halves_the_signal_per_layer():
    assert summary(plain_mlp(128, [128] * 20, init="xavier")).mean_ratio == pytest.approx(2.0**-20, rel=1e-9)


def test_pytorch_default_divides_by_six_until_the_bias_floor():
    n, depth = 128, 12
    vb = 1 / (3 * n)
    expected = 1.0
    for _ in range(depth):
        expected = expected / 6 + vb / 2  # E[M_j] = (sigma^2/2) E[M_{j-1}] + v_b/2
    got = summary(plain_mlp(n, [n] * depth, init="pytorch", bias_std=math.sqrt(vb))).mean_ratio
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(1 / (5 * n), rel=0.01)  # THEORY's floor 1/(5n)
    no_bias = summary(plain_mlp(n, [n] * depth, init="pytorch")).mean_ratio
    assert no_bias == pytest.approx(6.0**-depth, rel=1e-9)


def test_tanh_mean_length_follows_the_mean_field_map():
    # q_j = sigma^2 E[tanh(z)^2] with z ~ N(0, q_{j-1}): the length map of THEORY.md.
    act = get_activation("tanh")
    n, depth = 128, 10
    sigma2 = 2 * n / (n + n)
    q, m = sigma2 * 1.0, 1.0
    for _ in range(depth):
        m = act.second_moment(q)
        q = sigma2 * m
    got = summary(plain_mlp(n, [n] * depth, activation="tanh", init="xavier")).mean_ratio
    assert got == pytest.approx(m, rel=1e-9)


# Section 3: second moments and log-moments (FM2) ----------------------------------------


def test_worked_example_depth_20_width_32():
    s = summary(plain_mlp(32, [32] * 20))
    assert s.second_ratio == pytest.approx(18.2404, abs=1e-4)  # prod (1 + 5/n)
    assert s.log_mean == pytest.approx(-1.6508, abs=1e-4)
    assert s.log_var == pytest.approx(3.550, abs=1e-3)
    assert s.median == pytest.approx(0.1998, abs=1e-3)
    assert s.var_hat == pytest.approx(2.7175, abs=1e-4)
    assert s.beta == pytest.approx(20 / 32)


def test_second_moment_is_the_product_formula_for_varying_widths():
    widths = [10, 40, 25, 100, 7, 64]
    expected = math.prod(1 + 5 / n for n in widths)
    assert summary(plain_mlp(30, widths)).second_ratio == pytest.approx(expected, rel=1e-12)


def test_weight_kurtosis_enters_through_the_A_B_recursion():
    # THEORY.md section 3: exact linear recursion on A = E||act||^4, B = E sum act^4.
    n0, widths, kappa = 20, [12, 12, 12, 12], 1.8  # uniform weights
    a, b = float(n0 * n0), 3.0 * n0  # a fixed input with ||x||^2 = n0, sum x^4 = 3 n0
    prev = n0
    for n in widths:
        v = 2.0 / prev
        a, b = (
            v * v * ((n * n / 4 + 5 * n / 4) * a + n * (kappa - 3) / 2 * b),
            v * v * n * (1.5 * a + (kappa - 3) / 2 * b),
        )
        prev = n
    expected = a / widths[-1] ** 2
    got = summary(plain_mlp(n0, widths, init="he_uniform")).second_ratio
    assert got == pytest.approx(expected, rel=1e-12)
    gaussian = summary(plain_mlp(n0, widths)).second_ratio
    assert got < gaussian  # kurtosis below 3 lowers the variance, at order 1/n^2


def test_gaussian_bias_second_moment_recursion():
    # E[M_j^2] = 1/4 (1 + 5/n)(sigma^4 E[M^2] + 2 sigma^2 v_b E[M] + v_b^2)  (ReLU, Gaussian bias)
    n, depth, vb = 50, 6, 0.3
    m, p = 1.0, 1.0
    for _ in range(depth):
        m, p = (2 * m + vb) / 2, (1 + 5 / n) / 4 * (4 * p + 4 * vb * m + vb * vb)
    graph = plain_mlp(n, [n] * depth, bias_std=math.sqrt(vb))
    for layer in graph.layers:  # the engine reads the bias law's kurtosis: make it Gaussian
        if layer.bias is not None:
            object.__setattr__(layer.bias, "kurtosis", 3.0)
    s = summary(graph)
    assert s.mean_ratio == pytest.approx(m, rel=1e-12)
    assert s.second_ratio * s.mean_ratio**2 == pytest.approx(p, rel=0.02)  # input is fixed, not random


def test_var_hat_formula_for_he():
    widths = [16, 32, 8, 64, 24]
    seconds = list(np.cumprod([1 + 5 / n for n in widths]))
    big_l = len(widths)
    closed = sum(p * (2 * j - big_l - 1) for j, p in enumerate(seconds, start=1)) / big_l**2
    assert expected_var_hat([1.0] * big_l, seconds) == pytest.approx(closed, rel=1e-12)
    assert summary(plain_mlp(16, widths)).var_hat == pytest.approx(closed, rel=1e-12)


def test_median_falls_below_half_near_depth_0277_n():
    n = 64
    depth = round(0.277 * n)
    assert summary(plain_mlp(n, [n] * depth)).median == pytest.approx(0.5, abs=0.03)


# Section 4: residual networks -----------------------------------------------------------


def test_linear_terminated_residual_stream():
    blocks, eta = 50, 1 / math.sqrt(50)
    s = summary(residual_mlp(64, blocks, eta=eta))
    assert s.mean_ratio == pytest.approx((1 + eta * eta) ** blocks, rel=1e-9)  # 2.6916, g = 1
    assert s.mean_ratio == pytest.approx(2.69, abs=0.01)
    assert s.log_var < blocks * 4 * eta * eta / 64 * 1.5  # below about sum 4 g eta^2 / n
    assert summary(residual_mlp(64, 20, eta=1.0)).mean_ratio == pytest.approx(2.0**20, rel=1e-9)


def test_relu_terminated_residual_follows_the_mean_recursion():
    blocks, eta = 50, 1 / math.sqrt(50)
    m, q = 0.0, 1.0
    for _ in range(blocks):
        m, q = m + eta * math.sqrt(q / math.pi), q * (1 + eta * eta) + 2 * eta * m * math.sqrt(q / math.pi)
    s = summary(residual_mlp(64, blocks, eta=eta, terminal="relu"))
    assert s.mean_ratio == pytest.approx(q, rel=1e-6)


def test_branch_gain_and_eta_are_reported():
    pred = predict(residual_mlp(32, 8, eta=0.25))
    assert len(pred.blocks) == 8
    for block in pred.blocks:
        assert block.eta == pytest.approx(0.25)
        assert block.gain == pytest.approx(1.0, rel=1e-9)
        assert block.factor == pytest.approx(1 + 0.25**2, rel=1e-9)
