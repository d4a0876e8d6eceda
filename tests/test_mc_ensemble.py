"""The ensemble engine, the resampling schemes and the estimators, against closed forms.

Fixed torch.Generator / numpy seeds, CPU, tolerances from the estimators' own standard
errors (4 se), so the tests are deterministic and never flaky.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from initaudit.montecarlo.ensemble import (  # noqa: E402
    CHUNK_BUDGET,
    MAX_CHUNK,
    activation_bytes,
    default_chunk,
    program_parameters,
    program_state,
    run_ensemble,
)
from initaudit.montecarlo.estimates import estimate, median_with_se, var_hat, variance_with_se  # noqa: E402
from initaudit.montecarlo.resample import resample, resample_laws  # noqa: E402


def _graph(module: nn.Module, x: torch.Tensor) -> tuple[Any, Any, dict[str, str]]:
    from initaudit.frontends.torch_graph import graph_from_module

    graph = graph_from_module(module, (x,), source="m", fmt="t")
    return graph, graph.meta["_program"], graph.meta["_nodes"]


def _mlp(
    depth: int, width: int, second_moment: float, seed: int, bias: bool = False, uniform: bool = False
) -> nn.Sequential:
    """A ReLU MLP whose weights (normal or uniform) have exactly the given second moment E[w^2],
    so the closed forms hold for the resampled networks exactly, not up to this one draw."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=bias)
        with torch.no_grad():
            w = torch.randn(linear.weight.shape, generator=gen)
            if uniform:
                w = torch.rand(linear.weight.shape, generator=gen) - 0.5
            linear.weight.copy_(w * math.sqrt(second_moment / w.pow(2).mean()))
            if bias:
                bound = 1 / math.sqrt(width)
                linear.bias.copy_(torch.rand(width, generator=gen) * 2 * bound - bound)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


def _ensemble(
    program: Any,
    taps: dict[str, str],
    x: torch.Tensor,
    scheme: str,
    samples: int,
    seed: int,
    chunk: int = 500,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Resample chunk by chunk (bounded memory), run, and return {layer: (samples,) numpy}."""
    gen = torch.Generator().manual_seed(seed)
    params = program_parameters(program)
    laws = resample_laws(params, scheme)
    parts, chunk = [], 500
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        parts.append(
            run_ensemble(program, taps, x, resample(params, scheme, size, gen, laws=laws), chunk=size)
        )
    return {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}, laws


def _within(measured: float, se: float, expected: float, k: float = 4.0) -> bool:
    return abs(measured - expected) <= k * se


# --------------------------------------------------------------------------- closed forms


def test_he_mlp_matches_theory() -> None:
    """He ReLU MLP, depth 10, width 64: E[M_L]/M_0 = 1 exactly; median and log-moments as
    predicted (Var ln M_L ~ 5 sum 1/n); the FM2 quantity Var^[M] as predicted."""
    from initaudit.theory.propagate import predict

    depth, width, samples = 10, 64, 2000
    x = torch.randn(1, width, generator=torch.Generator().manual_seed(1))
    graph, program, taps = _graph(_mlp(depth, width, 2.0 / width, seed=0), x)
    prediction = predict(graph)
    rows = [row for row in prediction.layers if row.tap]
    assert len(rows) == depth
    values, laws = _ensemble(program, taps, x, "gaussian", samples, seed=2)
    assert {law.kind for law in laws.values()} == {"normal"}
    m0 = float(x.pow(2).mean())
    assert values["input"] == pytest.approx(m0, rel=1e-6)  # the input tap is M_0 itself, every sample
    for row in rows:
        est = estimate(values[row.name], m0, name=row.name)
        assert est.samples == samples and est.zeros == 0
        assert _within(est.mean, est.mean_se, row.mean), (row.name, est.mean, est.mean_se, row.mean)
        assert _within(est.median, est.median_se, row.median), (row.name, est.median, row.median)
        assert _within(est.log_mean, est.log_mean_se, row.log_mean), (row.name, est.log_mean, row.log_mean)
        assert _within(est.log_var, est.log_var_se, row.log_var), (row.name, est.log_var, row.log_var)
    last = estimate(values[rows[-1].name], m0)
    assert rows[-1].mean == pytest.approx(1.0, rel=1e-6)
    assert _within(last.mean, last.mean_se, 1.0)
    # THEORY: Var ln M_L ~ 5 sum 1/n + 18.5 sum 1/n^2; the typical network shrinks, the mean holds.
    assert _within(last.log_var, last.log_var_se, 5 * depth / width + 18.5 * depth / width**2)
    assert last.median < 0.8 and last.mean_se < 0.05 and last.log_var_se < 0.05
    # Second moments are trustworthy here (L/n = 0.16 <~ 0.2): E[M_L^2] = prod (1 + 5/n).
    assert _within(last.second, last.second_se, (1 + 5 / width) ** depth)
    value, se = var_hat(np.stack([values[row.name] for row in rows], axis=1), m0)
    assert _within(value, se, prediction.summary.var_hat), (value, se, prediction.summary.var_hat)


def test_pytorch_default_mlp_shrinks_like_six_to_the_depth() -> None:
    """PyTorch's default Linear init (variance 1/(3 fan_in)): E[M_L]/M_0 = 6^-L, under gaussian
    resampling and under the recognized scheme (uniform, pytorch_default)."""
    depth, width, samples = 6, 64, 1000
    x = torch.randn(1, width, generator=torch.Generator().manual_seed(3))
    module = _mlp(depth, width, 1.0 / (3 * width), seed=4, uniform=True)
    _, program, taps = _graph(module, x)
    m0 = float(x.pow(2).mean())
    last = str(2 * depth - 1)
    for scheme in ("gaussian", "scheme"):
        values, laws = _ensemble(program, taps, x, scheme, samples, seed=5)
        est = estimate(values[last], m0)
        assert _within(est.mean, est.mean_se, 6.0**-depth), (
            scheme,
            est.mean * 6**depth,
            est.mean_se * 6**depth,
        )
        assert est.mean_se < 0.1 * 6.0**-depth
        if scheme == "scheme":
            assert {law.label for law in laws.values()} == {"pytorch_default"}
            assert {law.kind for law in laws.values()} == {"uniform"}


def test_pytorch_default_with_bias_follows_the_exact_recursion() -> None:
    """With PyTorch's default bias the bias floor stops the decay. THEORY (symmetric bias):
    E[M_j] = (n v_j E[M_{j-1}] + v_b,j) / 2 exactly, with each layer's own second moments."""
    depth, width = 6, 64
    x = torch.randn(1, width, generator=torch.Generator().manual_seed(6))
    x = x / x.pow(2).mean().sqrt()  # with biases M_j depends on |x|, not only on M_j / M_0: take M_0 = 1
    _, program, taps = _graph(_mlp(depth, width, 1.0 / (3 * width), seed=7, bias=True, uniform=True), x)
    params = program_parameters(program)
    values, _ = _ensemble(program, taps, x, "gaussian", 1000, seed=8)
    expected = 1.0
    for j in range(depth):
        v = float(params[f"{2 * j}.weight"].double().pow(2).mean())
        v_b = float(params[f"{2 * j}.bias"].double().pow(2).mean())
        expected = (width * v * expected + v_b) / 2
        est = estimate(values[str(2 * j + 1)], 1.0)
        assert _within(est.mean, est.mean_se, expected), (j, est.mean, est.mean_se, expected)
    assert expected > 2 * 6.0**-depth  # the floor is real: well above the bias-free decay


# --------------------------------------------------------------------------- resampling


def _named_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10)
    return {
        "w.weight": torch.randn(32, 16, generator=gen) * 0.3,
        "w.bias": torch.zeros(32),
        "norm.weight": torch.ones(16),  # constant: kept
        "gain.weight": 1.0 + 0.1 * torch.randn(200, generator=gen),  # a real mean: kept in the law
        "bn.running_var": torch.rand(16, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_bootstrap_keeps_each_tensors_entries() -> None:
    params = _named_tensors()
    gen = torch.Generator().manual_seed(11)
    out = resample(params, "bootstrap", 50, gen)
    w = params["w.weight"]
    drawn = out["w.weight"]
    assert drawn.shape == (50, 32, 16) and drawn.dtype == w.dtype
    expected = w.abs().flatten().sort().values
    for s in range(50):
        assert torch.equal(drawn[s].abs().flatten().sort().values, expected)
    # Permuted and sign-flipped: about half the signs differ and positions move.
    flipped = (torch.sign(drawn) != torch.sign(w)).double().mean().item()
    assert 0.45 < flipped < 0.55
    assert not torch.equal(drawn[0].abs(), w.abs())
    # A tensor with a real mean is permuted without sign flips: its multiset is kept exactly.
    gain = out["gain.weight"]
    for s in range(50):
        assert torch.equal(gain[s].sort().values, params["gain.weight"].sort().values)
    for key in ("w.bias", "norm.weight", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(out[key], params[key].expand(50, *params[key].shape)), key
        assert out[key].stride(0) == 0 if params[key].dim() else True  # an expanded view, no copy


def test_gaussian_matches_each_tensors_moments() -> None:
    params = _named_tensors()
    gen = torch.Generator().manual_seed(12)
    samples = 200
    out = resample(params, "gaussian", samples, gen)
    w = params["w.weight"].double()
    drawn = out["w.weight"].double()
    count = drawn.numel()
    # E[w^2] of the law is the tensor's second moment; sample std of a Gaussian has se s/sqrt(2N).
    target = math.sqrt(w.pow(2).mean().item())
    assert abs(drawn.std().item() - target) < 4 * target / math.sqrt(2 * count)
    assert abs(drawn.mean().item()) < 4 * target / math.sqrt(count)
    kurtosis = (drawn.pow(4).mean() / drawn.pow(2).mean() ** 2).item()
    assert abs(kurtosis - 3.0) < 0.05
    # Independent draws: samples are uncorrelated with each other and with the original.
    assert abs(torch.corrcoef(torch.stack([drawn[0].flatten(), drawn[1].flatten()]))[0, 1].item()) < 0.15
    gain = params["gain.weight"].double()
    g = out["gain.weight"].double()
    assert abs(g.mean().item() - gain.mean().item()) < 4 * gain.std().item() / math.sqrt(g.numel())
    assert abs(g.std().item() - gain.std().item()) < 4 * gain.std().item() / math.sqrt(2 * g.numel())
    for key in ("w.bias", "norm.weight", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(out[key], params[key].expand(samples, *params[key].shape)), key
    assert out["bn.num_batches_tracked"].dtype == torch.int64


def test_inputs_scheme_leaves_weights_untouched() -> None:
    params = _named_tensors()
    out = resample(params, "inputs", 30, torch.Generator().manual_seed(13))
    for key, tensor in params.items():
        assert out[key].shape == (30, *tensor.shape)
        assert torch.equal(out[key][17], tensor)
        assert out[key].data_ptr() == tensor.data_ptr()  # expanded, not copied


def test_scheme_recognizes_init_laws() -> None:
    gen = torch.Generator().manual_seed(14)
    he = nn.Linear(256, 128)
    nn.init.kaiming_normal_(he.weight, generator=gen)
    xavier = nn.Linear(256, 256)
    nn.init.xavier_uniform_(xavier.weight, generator=gen)
    params = {"he.weight": he.weight.detach(), "xavier.weight": xavier.weight.detach(), "he.bias": he.bias}
    laws = resample_laws(params, "scheme")
    assert (laws["he.weight"].label, laws["he.weight"].kind) == ("he_normal", "normal")
    assert laws["he.weight"].std == pytest.approx(math.sqrt(2 / 256))
    assert (laws["xavier.weight"].label, laws["xavier.weight"].kind) == ("xavier_uniform", "uniform")
    assert laws["he.bias"].label == "pytorch_default"  # U(+-1/sqrt(fan_in)): fan-in from he.weight
    drawn = resample(params, "scheme", 20, gen, laws=laws)["xavier.weight"]
    bound = math.sqrt(6 / 512)
    assert drawn.abs().max().item() <= bound
    assert drawn.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)


# --------------------------------------------------------------------------- the engine


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn(self.conv(x)))


def _cnn() -> nn.Module:
    gen = torch.Generator().manual_seed(20)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        _Block(8),
        _Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():  # BatchNorm far from identity: non-trivial running stats and affine
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
                module.weight.copy_(1 + 0.3 * torch.randn(module.num_features, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.num_features, generator=gen))
    return model.eval()


def _reference(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, s: int
) -> dict[str, float]:
    """A plain forward pass of sample s (torch.func.functional_call) with module hooks."""
    seen: dict[str, float] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, _ms(out)))
        for name, module in model.named_modules()
        if name
    ]
    state = {key: value[s] for key, value in params.items()}
    state.update({k: v for k, v in model.state_dict().items() if k not in state})
    try:
        with torch.no_grad():
            torch.func.functional_call(model, state, (x,))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _ms(out: torch.Tensor) -> float:
    return float(out.double().pow(2).mean())


def test_vmap_ensemble_equals_a_plain_loop_on_a_residual_cnn() -> None:
    model = _cnn()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(21))
    graph, program, taps = _graph(model, x)
    params = program_parameters(program)
    samples = 6
    sampled = resample(params, "gaussian", samples, torch.Generator().manual_seed(22))
    # The BN affine parameters are resampled, the running statistics are the program's own.
    assert not torch.equal(sampled["1.weight"][0], params["1.weight"])
    assert "1.running_var" not in params and "1.running_var" in program_state(program)
    notes: list[str] = []
    out = run_ensemble(program, taps, x, sampled, chunk=samples, mode="vmap", notes=notes)
    assert notes == []
    assert set(out) == set(taps) and all(
        v.shape == (samples,) and v.dtype == torch.float64 for v in out.values()
    )
    modules = {name for name, _ in model.named_modules()} & set(taps)
    assert {"1", "3.bn", "3.relu", "4.relu", "7"} <= modules
    for s in range(samples):
        ref = _reference(model, sampled, x, s)
        for layer in modules:
            assert out[layer][s].item() == pytest.approx(ref[layer], rel=1e-6, abs=1e-12), (layer, s)
    # The residual join (no module of its own) agrees with the engine's own loop mode.
    looped = run_ensemble(program, taps, x, sampled, chunk=4, mode="loop")
    for layer in taps:
        torch.testing.assert_close(out[layer], looped[layer], rtol=1e-6, atol=1e-12)
    # Chunking does not change results.
    for chunk in (1, 4):
        chunked = run_ensemble(program, taps, x, sampled, chunk=chunk)
        for layer in taps:
            torch.testing.assert_close(out[layer], chunked[layer], rtol=1e-6, atol=1e-12)
    assert graph.meta["extraction"] == "torch.export"


def test_fresh_input_per_sample_with_fixed_weights() -> None:
    """The inputs scheme: weights shared (expanded), x with a leading sample dimension."""
    model = _cnn()
    x = torch.randn(1, 3, 8, 8)
    _, program, taps = _graph(model, x)
    params = program_parameters(program)
    kept = resample(params, "inputs", 5, torch.Generator())
    xs = torch.randn(5, 1, 3, 8, 8, generator=torch.Generator().manual_seed(23))
    out = run_ensemble(program, taps, xs, kept, chunk=2)
    for s in range(5):
        single = run_ensemble(program, taps, xs[s], {k: v[:1] for k, v in kept.items()}, chunk=1)
        ref = _reference(model, {k: v.unsqueeze(0) for k, v in params.items()}, xs[s], 0)
        for layer in taps:
            assert out[layer][s].item() == pytest.approx(single[layer][0].item(), rel=1e-6)
        # Taps are reduced in float32 (exact to its rounding in this range), the reference in float64.
        assert out["input"][s].item() == pytest.approx(_ms(xs[s]), rel=1e-6)
        assert out["7"][s].item() == pytest.approx(ref["7"], rel=1e-6)


def test_vmap_failure_falls_back_to_a_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _cnn()
    x = torch.randn(1, 3, 8, 8)
    _, program, taps = _graph(model, x)
    sampled = resample(program_parameters(program), "gaussian", 3, torch.Generator().manual_seed(24))
    expected = run_ensemble(program, taps, x, sampled, chunk=3)

    def broken(*_args: object, **_kwargs: object) -> object:
        def fail(*_a: object) -> None:
            raise RuntimeError("vmap: no batching rule for aten::example")

        return fail

    monkeypatch.setattr(torch.func, "vmap", broken)
    notes: list[str] = []
    done: list[tuple[int, int]] = []
    out = run_ensemble(
        program, taps, x, sampled, chunk=2, notes=notes, progress=lambda d, t: done.append((d, t))
    )
    assert len(notes) == 1 and "loop" in notes[0] and "RuntimeError" in notes[0]
    assert done == [(2, 3), (3, 3)]
    for layer in taps:
        torch.testing.assert_close(out[layer], expected[layer], rtol=1e-6, atol=1e-12)
    with pytest.raises(RuntimeError):
        run_ensemble(program, taps, x, sampled, chunk=2, mode="vmap")


class _Renormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.renorm(self.linear(x), 2, 0, 1.0))  # aten::renorm: no batching rule


def test_an_op_without_a_batching_rule_is_named_and_still_exact() -> None:
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(25))
    _, program, taps = _graph(_Renormed(), x)
    sampled = resample(program_parameters(program), "gaussian", 5, torch.Generator().manual_seed(26))
    notes: list[str] = []
    out = run_ensemble(program, taps, x, sampled, chunk=2, notes=notes)
    assert notes == ["vmap has no batching rule for aten::renorm: it ran sample by sample"]
    looped = run_ensemble(program, taps, x, sampled, mode="loop")
    for layer in taps:
        torch.testing.assert_close(out[layer], looped[layer], rtol=1e-6, atol=1e-12)
    assert torch._C._functorch._is_vmap_fallback_enabled()  # the global switch is restored


def test_default_chunk_follows_the_parameter_count() -> None:
    tiny = {"w": torch.zeros(8, 8)}
    small = {"w": torch.zeros(256, 256)}
    big = {"w": torch.zeros(1024, 1024)}
    assert default_chunk(tiny, "cpu") == MAX_CHUNK
    assert default_chunk(tiny, "cpu", samples=300) == 300
    assert default_chunk(small, "cpu") == CHUNK_BUDGET["cpu"] // (256 * 256 * 4) < MAX_CHUNK
    assert default_chunk(big, "cpu") == CHUNK_BUDGET["cpu"] // (1024 * 1024 * 4)
    assert default_chunk(big, "cpu", budget=1) == 1
    assert default_chunk(big, "cuda") == CHUNK_BUDGET["cuda"] // (1024 * 1024 * 4)
    # Given the program, activations count too (a conv net's are larger than its weights).
    model = _cnn()
    _, program, _ = _graph(model, torch.randn(1, 3, 8, 8))
    params = program_parameters(program)
    budget = 1 << 20
    with_activations = default_chunk(params, "cpu", program=program, budget=budget)
    assert with_activations < default_chunk(params, "cpu", budget=budget)
    # Activations count at their peak alive at once, not summed over every node.
    total = sum(
        n.meta["val"].numel() * 4 for n in program.graph_module.graph.nodes if n.op == "call_function"
    )
    assert 8 * 8 * 8 * 4 * 2 <= activation_bytes(program) < total


# --------------------------------------------------------------------------- estimators


def test_standard_errors_match_the_spread_over_repeated_draws() -> None:
    """Each se, averaged over 400 synthetic ensembles, matches the actual spread of its
    estimator across them (within 15%; the spread itself is known to about 3.5%). Mean,
    median and log-moments on a heavy-tailed log-normal (Var ln = 1, like a deep net);
    second moments only on a light-tailed one, as THEORY's testing caution says."""
    rng = np.random.default_rng(30)
    repeats, n = 400, 500
    for sigma, stats in ((1.0, ("mean", "median", "log_mean", "log_var")), (0.3, ("second", "spread"))):
        rows = [estimate(2.0 * np.exp(rng.normal(-0.4, sigma, size=n)), 2.0) for _ in range(repeats)]
        for stat in stats:
            spread = np.std([getattr(r, stat) for r in rows], ddof=1)
            mean_se = np.mean([getattr(r, f"{stat}_se") for r in rows])
            assert mean_se == pytest.approx(spread, rel=0.15), (sigma, stat)
        # And the estimators are centred where they should be.
        assert np.mean([r.log_mean for r in rows]) == pytest.approx(-0.4, abs=0.01)
        assert np.mean([r.log_var for r in rows]) == pytest.approx(sigma**2, rel=0.02)
        assert np.mean([r.median for r in rows]) == pytest.approx(math.exp(-0.4), rel=0.01)
        assert np.mean([r.mean for r in rows]) == pytest.approx(math.exp(-0.4 + sigma**2 / 2), rel=0.01)
    assert np.mean([r.spread for r in rows]) == pytest.approx(math.exp(0.09) - 1, rel=0.05)


def test_var_hat_and_its_se() -> None:
    """Var^[M] per network, averaged: exact on a known array; se matches repeated draws."""
    taps = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    value, se = var_hat(taps)
    assert value == pytest.approx((2 / 3 + 0) / 2)
    assert se == pytest.approx(np.std([2 / 3, 0.0], ddof=1) / math.sqrt(2))
    assert var_hat(taps * 2, m0=2.0)[0] == pytest.approx(value)
    rng = np.random.default_rng(31)
    results = []
    for _ in range(300):
        # A multiplicative chain: M_j = prod of independent factors, like the He net.
        factors = rng.gamma(shape=20.0, scale=1 / 20.0, size=(400, 8))
        results.append(var_hat(np.cumprod(factors, axis=1)))
    values = np.array(results)
    assert values[:, 1].mean() == pytest.approx(values[:, 0].std(ddof=1), rel=0.15)


def test_estimate_handles_dead_and_overflowing_networks() -> None:
    values = np.array([0.0, 0.0, 1.0, 2.0, 4.0, np.inf, np.nan, 8.0])
    est = estimate(values, 2.0)
    assert (est.samples, est.zeros, est.nonfinite) == (6, 2, 2)
    assert est.mean == pytest.approx(15 / 6 / 2)
    assert est.median == pytest.approx(0.75)
    assert est.log_mean == pytest.approx(np.mean(np.log([0.5, 1, 2, 4])))
    med, se = median_with_se(np.arange(101.0))
    assert med == 50.0 and se == pytest.approx(100 / (2 * math.sqrt(101)), rel=0.02)  # 1/(2 f sqrt n)
    var, var_se = variance_with_se(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert var == pytest.approx(2.5) and var_se > 0


# --------------------------------------------------------------------------- BatchNorm as in training


def _train_reference(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, s: int
) -> dict[str, float]:
    """Sample s through the module in training mode (batch statistics), on copies of the buffers."""
    model.train()
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state.update({key: value[s] for key, value in params.items()})
        seen: dict[str, float] = {}
        handles = [
            module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, _ms(out)))
            for name, module in model.named_modules()
            if name
        ]
        try:
            with torch.no_grad():
                torch.func.functional_call(model, state, (x,))
        finally:
            for handle in handles:
                handle.remove()
    finally:
        model.eval()
    return seen


def test_batchnorm_in_training_mode_resets_the_length_per_network() -> None:
    """batchnorm="train": right after each BatchNorm, M = mean_c(gamma_c^2 v_c / (v_c + eps) +
    beta_c^2) for each sample network's own gamma, beta (v_c: the channel's batch variance), so
    M = mean(gamma^2 + beta^2) up to eps, whatever came in; and every tap equals the module run
    in training mode on that sample."""
    model = _cnn()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(40))
    _, program, taps = _graph(model, x)
    params = program_parameters(program)
    samples = 8
    sampled = resample(params, "gaussian", samples, torch.Generator().manual_seed(41))
    notes: list[str] = []
    out = run_ensemble(program, taps, x, sampled, chunk=5, batchnorm="train", notes=notes)
    assert notes == []
    for bn in ("1", "3.bn", "4.bn"):
        gamma, beta = sampled[f"{bn}.weight"].double(), sampled[f"{bn}.bias"].double()
        expected = (gamma.pow(2) + beta.pow(2)).mean(dim=1)
        # |M - expected| = mean(gamma^2 eps / (v + eps)) <= eps / v_min mean(gamma^2); v >~ 1e-2 here.
        bound = 1e-5 / 1e-2 * gamma.pow(2).mean(dim=1) + 1e-6 * expected
        assert bool(((out[bn] - expected).abs() <= bound).all()), (bn, out[bn], expected)
    evaluated = run_ensemble(program, taps, x, sampled, chunk=5)
    assert not torch.allclose(evaluated["1"], out["1"], rtol=0.01)  # running statistics differ
    for s in range(samples):
        ref = _train_reference(model, sampled, x, s)
        for layer in ("1", "2", "3.bn", "3.relu", "4.relu", "7"):
            assert out[layer][s].item() == pytest.approx(ref[layer], rel=1e-5), (layer, s)
    looped = run_ensemble(program, taps, x, sampled, mode="loop", batchnorm="train")
    for layer in taps:
        torch.testing.assert_close(out[layer], looped[layer], rtol=1e-5, atol=0)
    # At init gamma = 1 and beta = 0 are constants, kept and shared: the BatchNorms then run
    # without their (identity) affine, and M right after each is var / (var + eps) ~ 1.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
    _, program, taps = _graph(model, x)
    sampled = resample(program_parameters(program), "gaussian", 4, torch.Generator().manual_seed(43))
    assert sampled["1.weight"].stride(0) == 0 and sampled["1.bias"].stride(0) == 0
    out = run_ensemble(program, taps, x, sampled, batchnorm="train")
    for bn in ("1", "3.bn", "4.bn"):
        assert bool(((out[bn] - 1).abs() < 1e-3).all()) and bool((out[bn] < 1).all()), (bn, out[bn])
    for s in range(4):
        ref = _train_reference(model, sampled, x, s)
        for layer in ("1", "3.relu", "7"):
            assert out[layer][s].item() == pytest.approx(ref[layer], rel=1e-5), (layer, s)


def test_batchnorm1d_normalizes_rows_and_falls_back_on_a_single_vector() -> None:
    gen = torch.Generator().manual_seed(42)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(4.0)
    for rows in (4, 1):
        x = torch.randn(rows, 6, generator=gen)
        _, program, taps = _graph(model, x)
        sampled = resample(program_parameters(program), "gaussian", 6, gen)
        notes: list[str] = []
        out = run_ensemble(program, taps, x, sampled, batchnorm="train", notes=notes)
        if rows > 1:  # statistics over the example's 4 rows
            assert notes == []
            gamma, beta = sampled["1.weight"].double(), sampled["1.bias"].double()
            expected = (gamma.pow(2) + beta.pow(2)).mean(dim=1)
            torch.testing.assert_close(out["1"], expected, rtol=1e-3, atol=0)
        else:  # one vector: no batch statistics; the running ones, with a note
            assert len(notes) == 1 and "running statistics" in notes[0]
            torch.testing.assert_close(out["1"], run_ensemble(program, taps, x, sampled)["1"])
    with pytest.raises(ValueError, match="batchnorm"):
        run_ensemble(program, taps, x, sampled, batchnorm="training")


def test_a_zero_bias_is_dropped_and_nothing_changes() -> None:
    """Kept zero biases (He init's) are dropped from conv/linear calls: vmap would add them as an
    extra pass. The values equal a plain forward pass with the biases in place."""
    from initaudit.montecarlo.ensemble import _constants, _identity_args, _lifted

    gen = torch.Generator().manual_seed(50)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5), nn.ReLU())
    with torch.no_grad():
        model[0].bias.zero_()
        model[3].bias.zero_()
    x = torch.randn(1, 3, 8, 8, generator=gen)
    _, program, taps = _graph(model, x)
    params = program_parameters(program)
    sampled = resample(params, "gaussian", 4, gen)
    assert sampled["0.bias"].stride(0) == 0  # constant: kept, shared
    lifted, _ = _lifted(program, sampled, torch.device("cpu"))
    assert len(_identity_args(program, *_constants(program, lifted), set())) == 2
    out = run_ensemble(program, taps, x, sampled, mode="vmap")
    for s in range(4):
        ref = _reference(model, sampled, x, s)
        for layer in ("0", "1", "3", "4"):
            assert out[layer][s].item() == pytest.approx(ref[layer], rel=1e-6), (layer, s)


def test_taps_below_float32_range_are_reduced_in_float64() -> None:
    """Activations of ~1e-24 are fine in float32 but their squares underflow: the float32 tap
    reads 0, so the chunk is rerun with float64 reductions (a note says so), and the values
    match a float64 reference."""
    gen = torch.Generator().manual_seed(60)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16, bias=False), nn.ReLU()) for _ in range(6)])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(1e-4)  # each layer shrinks the signal by ~1e-4
    x = torch.randn(1, 16, generator=gen)
    _, program, taps = _graph(model, x)
    sampled = resample(program_parameters(program), "gaussian", 6, gen)
    notes: list[str] = []
    out = run_ensemble(program, taps, x, sampled, chunk=3, notes=notes)
    assert any("float64" in line for line in notes)
    for s in range(6):
        ref = _reference(model, sampled, x, s)
        assert 0 < ref["5.1"] < 1e-40  # float32 squares of these activations are 0
        for layer in ("0.1", "3.1", "5.1"):
            assert out[layer][s].item() == pytest.approx(ref[layer], rel=1e-5), (layer, s)
