"""The distributional shortcut for dense chains: closed forms from THEORY.md, and agreement in
distribution with a brute-force simulation that draws every weight matrix."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from initaudit.graph import Kind, Layer, LayerGraph  # noqa: E402
from initaudit.montecarlo.shortcut import shortcut_chain  # noqa: E402
from initaudit.stats import TensorStats  # noqa: E402
from initaudit.synthetic import law_stats, plain_mlp, residual_mlp  # noqa: E402

Z = 4.0  # tolerance in standard errors


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def var_se(values: np.ndarray) -> tuple[float, float]:
    """Sample variance and its standard error sqrt((mu4 - sigma^4) / n)."""
    centred = values - values.mean()
    var = float(np.mean(centred**2))
    return var, math.sqrt(max(float(np.mean(centred**4)) - var * var, 0.0) / values.size)


def median_band(values: np.ndarray, z: float = Z) -> tuple[float, float]:
    """Distribution-free band for the median: the order statistics n/2 -+ z sqrt(n)/2."""
    ordered = np.sort(values)
    n = ordered.size
    half = z * math.sqrt(n) / 2
    return float(ordered[max(int(n / 2 - half), 0)]), float(ordered[min(int(n / 2 + half), n - 1)])


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def log_lengths(values: np.ndarray) -> np.ndarray:
    """ln M; a network whose ReLUs are all off in some layer (probability 2^-width per layer)
    has M = 0 and ln M = -inf, which the KS statistic ranks lowest, as it should."""
    with np.errstate(divide="ignore"):
        return np.log(values)


def ks_critical(alpha: float, n: int, m: int) -> float:
    """Asymptotic critical value: c(alpha) sqrt((n + m) / (n m)), c = sqrt(-ln(alpha / 2) / 2)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


ACTS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
    "sigmoid": torch.sigmoid,
}


def brute_force(
    graph: LayerGraph, samples: int, generator: torch.Generator, x: np.ndarray, std_factor: float = 1.0
) -> dict[str, np.ndarray]:
    """The full simulation: per sample, every weight matrix drawn from N(mean, std^2) (the
    layer's TensorStats), applied with torch.bmm. Returns M_j / M_0 at every layer."""
    a = torch.as_tensor(x, dtype=torch.float64).expand(samples, -1)
    m0 = float(np.mean(x**2))
    out = {}
    for layer in graph.layers[1:]:
        if layer.kind is Kind.DENSE:
            w, b = layer.weight, layer.bias
            shape = (samples, layer.width, a.shape[1])
            weights = w.mean + std_factor * w.std * torch.randn(
                shape, generator=generator, dtype=torch.float64
            )
            a = torch.bmm(weights, a.unsqueeze(-1)).squeeze(-1)
            if b is not None:
                noise = torch.randn((samples, layer.width), generator=generator, dtype=torch.float64)
                a = a + b.mean + b.std * noise
        elif layer.kind is Kind.ACTIVATION:
            a = ACTS[layer.activation](a)
        elif layer.kind is Kind.SCALE:
            a = a * layer.attrs["value"]
        out[layer.name] = (a.pow(2).mean(1) / m0).numpy()
    return out


def test_he_relu_depth20_width32_matches_theory() -> None:
    """THEORY section 3 worked check: E[M_L]/M_0 = 1 exactly, median 0.1998, E ln -1.6508,
    Var ln 3.550 (exact values of the product of chi^2 factors)."""
    values = shortcut_chain(plain_mlp(32, [32] * 20), 200_000, gen(1), "cpu")
    assert values is not None and set(values) == {f"act{j}" for j in range(1, 21)}
    m = values["act20"]
    assert m.shape == (200_000,) and m.dtype == np.float64
    mean, se = mean_se(m)
    assert abs(mean - 1.0) < Z * se, (mean, se)
    low, high = median_band(m)
    assert low < 0.1998 < high, (low, high)
    assert high - low < 0.01  # the band is informative: +-2.5% of the median
    log_mean, log_se = mean_se(np.log(m))
    assert abs(log_mean - (-1.6508)) < Z * log_se, (log_mean, log_se)
    log_var, log_var_se = var_se(np.log(m))
    assert abs(log_var - 3.550) < Z * log_var_se, (log_var, log_var_se)
    # Intermediate taps keep the mean too, and the spread grows with depth (FM2).
    mean5, se5 = mean_se(values["act5"])
    assert abs(mean5 - 1.0) < Z * se5
    assert np.log(values["act5"]).var() < 0.3 * log_var


def test_xavier_halves_the_length_per_layer() -> None:
    """Xavier on square ReLU layers: variance 1/fan_in, factor 1/2 per layer."""
    values = shortcut_chain(plain_mlp(32, [32] * 20, init="xavier"), 50_000, gen(2), "cpu")
    assert values is not None
    mean, se = mean_se(values["act20"] * 2.0**20)
    assert abs(mean - 1.0) < Z * se, (mean, se)


def test_pytorch_default_six_per_layer_and_bias_floor() -> None:
    """PyTorch default: variance 1/(3 fan_in), factor 1/6 per layer (any symmetric law, so the
    Gaussian resampling of the uniform init keeps it). With its bias, variance 1/(3 fan_in),
    E[M_j] = E[M_{j-1}]/6 + v_b/2 exactly, with fixed point 1/(5n)."""
    depth, n = 20, 32
    values = shortcut_chain(plain_mlp(n, [n] * depth, init="pytorch"), 50_000, gen(3), "cpu")
    assert values is not None
    mean, se = mean_se(values[f"act{depth}"] * 6.0**depth)
    assert abs(mean - 1.0) < Z * se, (mean, se)

    vb = 1.0 / (3 * n)
    graph = plain_mlp(n, [n] * depth, init="pytorch", bias_std=math.sqrt(vb))
    values = shortcut_chain(graph, 50_000, gen(4), "cpu")
    assert values is not None
    expected = 1.0
    for j in range(1, depth + 1):
        expected = expected / 6 + vb / 2
        mean, se = mean_se(values[f"act{j}"])
        assert abs(mean - expected) < Z * se, (j, mean, expected, se)
    assert abs(expected - 1 / (5 * n)) < 1e-12  # depth 20 sits on the floor


def test_float64_reaches_below_float32_range() -> None:
    """A 64-layer PyTorch-default chain ends near 6^-64 ~ 1e-50: no underflow to zero."""
    # Width 64: a layer with every ReLU off (probability 2^-64) does not happen here.
    values = shortcut_chain(plain_mlp(64, [64] * 64, init="pytorch"), 2000, gen(5), "cpu")
    assert values is not None
    last = values["act64"]
    assert np.all(last > 0)
    mean, se = mean_se(last * 6.0**64)
    assert abs(mean - 1.0) < Z * se


def test_agrees_in_distribution_with_full_simulation() -> None:
    """Two-sample KS on log M_L (and at a middle tap) against drawing every weight matrix;
    the same test rejects a law whose weight std is 10% off."""
    graph = plain_mlp(16, [16] * 6)
    n = 4000
    x = np.random.default_rng(0).standard_normal(16)  # any direction: only ||x|| matters
    short = shortcut_chain(graph, n, gen(10), "cpu", x=x)
    full = brute_force(graph, n, gen(11), x)
    wrong = brute_force(graph, n, gen(12), x, std_factor=1.1)
    assert short is not None
    critical = ks_critical(0.001, n, n)
    for tap in ("act3", "act6"):
        stat = ks_statistic(log_lengths(short[tap]), log_lengths(full[tap]))
        assert stat < critical, (tap, stat, critical)
    rejected = ks_statistic(log_lengths(short["act6"]), log_lengths(wrong["act6"]))
    assert rejected > 2 * critical, (rejected, critical)


def _chain(layers: list[Layer]) -> LayerGraph:
    return LayerGraph(layers, inputs=[layers[0].name], outputs=[layers[-1].name], source="test")


def with_mean(stats: TensorStats, mean: float) -> TensorStats:
    """The same law shifted by ``mean`` (std kept, second moment std^2 + mean^2)."""
    return dataclasses.replace(stats, mean=mean, second_moment=stats.std**2 + mean**2)


def _dense(
    name: str, source: str, fan_in: int, width: int, std: float, mean: float = 0.0, bias=None
) -> Layer:
    weight = with_mean(law_stats(f"{name}.weight", (width, fan_in), std), mean)
    return Layer(name, Kind.DENSE, "MatMul", [source], width=width, fan_in=fan_in, fan_out=width,
                 weight=weight, bias=bias)  # fmt: skip


def _act(name: str, source: str, width: int, activation: str) -> Layer:
    return Layer(name, Kind.ACTIVATION, activation, [source], width=width, attrs={"activation": activation})


def test_means_scales_and_smooth_activations_agree_with_full_simulation() -> None:
    """Weight and bias means that are real (kept by means="auto": 0.3 > 4 * 0.5 / sqrt(96)),
    a constant bias (std 0), a scalar SCALE, a reshape, and tanh/GELU/sigmoid: still the full
    simulation's law."""
    bias = with_mean(law_stats("fc2.bias", (12,), 0.3), 0.5)
    constant_bias = with_mean(law_stats("fc3.bias", (10,), 0.0), -0.2)
    graph = _chain([
        Layer("input", Kind.INPUT, "Input", width=8),
        _dense("fc1", "input", 8, 12, std=0.5, mean=0.3),
        _act("tanh", "fc1", 12, "tanh"),
        Layer("eta", Kind.SCALE, "Mul", ["tanh"], width=12, attrs={"value": 1.7}),
        _dense("fc2", "eta", 12, 12, std=0.4, bias=bias),
        _act("gelu", "fc2", 12, "gelu"),
        Layer("flat", Kind.RESHAPE, "Flatten", ["gelu"], width=12),
        _dense("fc3", "flat", 12, 10, std=0.3, bias=constant_bias),
        _act("sig", "fc3", 10, "sigmoid"),
    ])  # fmt: skip
    n = 4000
    x = np.linspace(-1.0, 2.0, 8)  # sum x != 0: the weight mean's term is exercised
    short = shortcut_chain(graph, n, gen(20), "cpu", x=x, taps=["input", "fc1", "eta", "flat", "sig"])
    full = brute_force(graph, n, gen(21), x)
    assert short is not None
    assert np.all(short["input"] == 1.0)
    critical = ks_critical(0.001, n, n)
    for tap in ("fc1", "eta", "flat", "sig"):
        stat = ks_statistic(log_lengths(short[tap]), log_lengths(full[tap]))
        assert stat < critical, (tap, stat, critical)
    # Dropping the real means is a different law, and the test sees it.
    zero = shortcut_chain(graph, n, gen(22), "cpu", x=x, means="zero", taps=["sig"])
    assert zero is not None
    assert ks_statistic(log_lengths(zero["sig"]), log_lengths(full["sig"])) > 2 * critical


def test_noise_means_are_dropped_by_default() -> None:
    """An empirical mean within sampling noise of zero is not a property of the init law:
    "auto" drops it (drawing with the second moment, as resample's gaussian scheme does),
    a real one it keeps; and the threshold is the one resample uses."""
    from initaudit.montecarlo import resample, shortcut

    assert shortcut._SIGNIFICANT == resample.MEAN_SIGMAS
    noisy = plain_mlp(64, [64] * 3)
    for layer in noisy.linear_layers():
        layer.weight = with_mean(layer.weight, 0.5 * layer.weight.std / 64)  # 0.5 standard errors
    auto = shortcut_chain(noisy, 500, gen(30), "cpu")
    zero = shortcut_chain(noisy, 500, gen(30), "cpu", means="zero")
    kept = shortcut_chain(noisy, 500, gen(30), "cpu", means="keep")
    assert auto is not None and zero is not None and kept is not None
    np.testing.assert_array_equal(auto["act3"], zero["act3"])
    assert not np.array_equal(kept["act3"], zero["act3"])
    # A dropped mean's square goes into the variance: He with mean 3 std is 10x the gain.
    shifted = plain_mlp(64, [64])
    shifted.layers[1].weight = with_mean(shifted.layers[1].weight, 3 * shifted.layers[1].weight.std)
    values = shortcut_chain(shifted, 20_000, gen(31), "cpu", means="zero")
    assert values is not None
    mean, se = mean_se(values["act1"])
    assert abs(mean - 10.0) < Z * se, (mean, se)


def test_same_seed_same_networks() -> None:
    graph = plain_mlp(16, [16] * 4)
    one = shortcut_chain(graph, 300, gen(7), "cpu", chunk=64)
    two = shortcut_chain(graph, 300, gen(7), "cpu", chunk=64)
    other = shortcut_chain(graph, 300, gen(8), "cpu", chunk=64)
    assert one is not None and two is not None and other is not None
    np.testing.assert_array_equal(one["act4"], two["act4"])
    assert not np.array_equal(one["act4"], other["act4"])


def test_not_a_chain_returns_none() -> None:
    assert shortcut_chain(residual_mlp(16, 3), 10, gen(0), "cpu") is None
    # A dense layer applied per token ([1, 8, 16] input, fan-in 16): outputs share W.
    tokens = _chain([
        Layer("input", Kind.INPUT, "Input", width=16, shape=(1, 8, 16)),
        _dense("fc1", "input", 16, 16, std=0.35),
        _act("act1", "fc1", 16, "relu"),
    ])  # fmt: skip
    assert shortcut_chain(tokens, 10, gen(0), "cpu") is None
    norm = plain_mlp(16, [16] * 2)
    norm.layers[2] = Layer("act1", Kind.NORM, "LayerNorm", ["fc1"], width=16, attrs={"norm": "layer"})
    assert shortcut_chain(LayerGraph(norm.layers, ["input"], norm.outputs), 10, gen(0), "cpu") is None


def test_flattened_image_input_is_a_chain() -> None:
    """Input [1, 1, 4, 4] flattened into a dense layer of fan-in 16: a chain, M_0 = 1."""
    graph = _chain([
        Layer("input", Kind.INPUT, "Input", width=1, shape=(1, 1, 4, 4)),
        Layer("flat", Kind.RESHAPE, "Flatten", ["input"], width=16),
        _dense("fc1", "flat", 16, 32, std=math.sqrt(2 / 16)),
        _act("act1", "fc1", 32, "relu"),
    ])  # fmt: skip
    values = shortcut_chain(graph, 20_000, gen(9), "cpu")
    assert values is not None
    mean, se = mean_se(values["act1"])
    assert abs(mean - 1.0) < Z * se


def test_chain_traced_from_a_torch_module() -> None:
    """The LayerGraph of an nn.Sequential (Flatten, Linear, ReLU, Dropout) is a chain; its
    taps are named by module path and the measured weights set the law (He: mean 1)."""
    from torch import nn

    from initaudit.frontends.torch_graph import graph_from_module

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in in (48, 64, 64):
        linear = nn.Linear(fan_in, 64)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU(), nn.Dropout(0.1)]
    graph = graph_from_module(nn.Sequential(*layers), (torch.randn(1, 3, 4, 4),), source="t", fmt="module")
    values = shortcut_chain(graph, 20_000, gen(40), "cpu")
    assert values is not None and set(values) == {"2", "5", "8"}
    # E[M_L]/M_0 = prod sigma_j^2 / 2 with sigma^2 = E[w^2] fan-in: the drawn weights' own
    # second moments (a few % from He's 2 / fan-in), exactly, under Gaussian resampling.
    gain = math.prod(layer.weight.second_moment * layer.fan_in / 2 for layer in graph.linear_layers())
    mean, se = mean_se(values["8"])
    assert abs(mean - gain) < Z * se, (mean, gain, se)
    assert abs(gain - 1) < 0.15
