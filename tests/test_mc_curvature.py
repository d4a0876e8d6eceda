"""Curvature at init: exact Hessians where they are known, and the vanishing gradients of deep ReLU nets."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from initaudit.errors import UsageError  # noqa: E402
from initaudit.montecarlo.curvature import curvature, gaussian_redraw, power_iteration  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny double-backward graphs: with intra-op threads on a busy machine they ran 15x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _linear_case(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """f(x) = W x + b on a batch: the Hessian is I_m kron C, C = [x 1]^T [x 1] / N, N = m B."""
    d, m, b = 6, 3, 5
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, m, dtype=F64)
    x = torch.randn(b, d, generator=g, dtype=F64)
    xa = torch.cat([x, torch.ones(b, 1, dtype=F64)], dim=1)
    return lin, x, xa.T @ xa / (m * b)


def test_linear_model_top_eigenvalue_and_trace_match_the_closed_form() -> None:
    lin, x, c = _linear_case()
    m = lin.out_features
    eig = torch.linalg.eigvalsh(c)
    top_exact, trace_exact = float(eig[-1]), m * float(eig.sum())
    # Rademacher variance of z^T H z: 2 (||H||_F^2 - sum_i H_ii^2); H = I_m kron C
    var_exact = 2 * m * (float((c**2).sum()) - float((torch.diagonal(c) ** 2).sum()))
    probes = 64
    res = curvature(
        lin, x, inits=3, generator=torch.Generator().manual_seed(1), iters=500, probes=probes, tol=1e-12
    )

    assert res.parameters == lin.weight.numel() + lin.bias.numel()
    assert res.output_entries == x.shape[0] * m
    # a linear model's Hessian does not depend on its weights or targets: every init sees the same one
    for r in res.per_init:
        assert r.converged and r.method == "autograd"
        assert r.top_eigenvalue == pytest.approx(top_exact, rel=1e-4)
        assert abs(r.trace - trace_exact) < 4 * r.trace_se
        # the standard error is the estimator's: about sqrt(var / probes)
        assert 0.6 < r.trace_se / math.sqrt(var_exact / probes) < 1.5
    assert res.top_eigenvalue == pytest.approx(top_exact, rel=1e-4)
    assert res.iterations == [r.iterations for r in res.per_init]
    assert max(res.iterations) < 500
    # probes batched through one vmapped backward give the same numbers as one at a time
    batched = curvature(
        lin,
        x,
        inits=3,
        generator=torch.Generator().manual_seed(1),
        iters=500,
        probes=probes,
        tol=1e-12,
        probe_batch=8,
    )
    assert batched.traces == pytest.approx(res.traces, rel=1e-12)
    assert batched.trace_ses == pytest.approx(res.trace_ses, rel=1e-9)


def test_linear_model_gradient_norms_match_the_closed_form() -> None:
    lin, x, _ = _linear_case()
    y = torch.randn(x.shape[0], lin.out_features, generator=torch.Generator().manual_seed(3), dtype=F64)
    res = curvature(lin, x, inits=1, generator=torch.Generator().manual_seed(1), iters=5, probes=2, y=y)
    r = (x @ lin.weight.detach().T + lin.bias.detach() - y) / y.numel()  # dL/df
    assert res.grad_norms["weight"] == pytest.approx(float((r.T @ x).norm()), rel=1e-12)
    assert res.grad_norms["bias"] == pytest.approx(float(r.sum(0).norm()), rel=1e-12)
    assert res.per_init[0].loss == pytest.approx(0.5 * float((r * y.numel()).pow(2).mean()), rel=1e-12)


def _tiny_mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5, dtype=F64), torch.nn.Tanh(), torch.nn.Linear(5, 2, dtype=F64)
    )


def _exact_hessian(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = {k: t.reshape(s) for k, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        buffers = {k: b.clone() for k, b in net.named_buffers()}  # leave batch norm's running stats alone
        out = torch.func.functional_call(net, (parts, buffers), (x,))
        return 0.5 * (out - y).pow(2).sum() / out.numel()

    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("target_scale", [1.0, 30.0])
def test_tiny_mlp_matches_the_exact_hessian(target_scale: float) -> None:
    # large targets make the residual term dominate: eigenvalues of both signs, the shifted second pass
    net = _tiny_mlp(0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    y = target_scale * torch.randn(4, 2, generator=g, dtype=F64)
    eig = torch.linalg.eigvalsh(_exact_hessian(net, x, y))
    res = curvature(net, x, inits=1, generator=g, iters=2000, probes=200, tol=1e-13, y=y)
    r = res.per_init[0]
    assert r.converged
    assert r.top_eigenvalue == pytest.approx(float(eig[-1]), rel=1e-4)
    assert abs(r.trace - float(eig.sum())) < 4 * r.trace_se
    if target_scale > 1:
        assert -float(eig[0]) > float(eig[-1]) > 0  # the case the shift is for: dominant eigenvalue negative
        # with no shift power iteration would report eig[0]


def test_train_mode_batch_norm_matches_the_exact_hessian() -> None:
    # batch statistics couple the examples and make the loss scale-invariant in the conv weights:
    # eigenvalues of both signs, and a conv bias before BN with no gradient at all
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3, dtype=F64),
        torch.nn.BatchNorm2d(2, dtype=F64),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 2, dtype=F64),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 5, 5, generator=g, dtype=F64)
    y = torch.randn(4, 2, generator=g, dtype=F64)
    eig = torch.linalg.eigvalsh(_exact_hessian(net, x, y))
    assert eig[0] < -1.0
    res = curvature(net, x, inits=1, generator=g, iters=3000, probes=60, tol=1e-11, y=y)
    r = res.per_init[0]
    assert r.converged
    assert r.top_eigenvalue == pytest.approx(float(eig[-1]), rel=1e-4)
    assert abs(r.trace - float(eig.sum())) < 4 * r.trace_se
    assert r.grad_norms["0.bias"] < 1e-12 < r.grad_norms["0.weight"]
    assert int(net[1].num_batches_tracked) == 0  # the module's own buffers untouched


def test_power_iteration_finds_the_top_eigenvalue_not_the_dominant_one() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))
    spectrum = torch.tensor([-5.0, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.5], dtype=F64)
    a = q @ torch.diag(spectrum) @ q.T
    top, _, converged = power_iteration(lambda v: a @ v, torch.randn(8, generator=g, dtype=F64), iters=2000)
    assert converged and top == pytest.approx(2.0, rel=1e-4)
    # a PSD operator takes one pass; a zero operator stops at once
    top, _, _ = power_iteration(lambda v: a @ a @ v, torch.ones(8, dtype=F64), iters=2000, tol=1e-12)
    assert top == pytest.approx(25.0, rel=1e-6)
    assert power_iteration(lambda v: 0 * v, torch.ones(8, dtype=F64), iters=10) == (0.0, 1, True)


def test_exported_program_and_finite_differences_agree_with_the_module() -> None:
    net = _tiny_mlp(1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    program = torch.export.export(net, (x,))

    def run(obj: object, method: str = "auto"):
        gen = torch.Generator().manual_seed(7)
        return curvature(obj, x, inits=3, generator=gen, iters=300, probes=16, tol=1e-12, method=method)

    a, b, c = run(net), run(program), run(net, "finite-difference")
    assert set(a.grad_norms) == set(b.grad_norms) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert b.top_eigenvalues == pytest.approx(a.top_eigenvalues, rel=1e-9)
    assert b.traces == pytest.approx(a.traces, rel=1e-9)
    assert b.grad_norms == pytest.approx(a.grad_norms, rel=1e-9)
    assert {r.method for r in c.per_init} == {"finite-difference"}
    assert c.top_eigenvalues == pytest.approx(a.top_eigenvalues, rel=1e-5)
    assert c.traces == pytest.approx(a.traces, rel=1e-5)
    # three different inits: the medians are medians of different numbers
    assert len(set(a.top_eigenvalues)) == 3
    assert a.top_eigenvalue == sorted(a.top_eigenvalues)[1]
    assert a.as_dict()["per_init"][0]["grad_norms"]["0.weight"] == a.per_init[0].grad_norms["0.weight"]


class _DistanceNet(torch.nn.Module):
    """Distances to learned centres: torch.cdist has no double backward (like fused attention on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.centres = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=F64))
        self.head = torch.nn.Linear(5, 2, dtype=F64)
        self.drop = torch.nn.Dropout(0.3)  # train mode: finite differences must replay the same mask

    def forward(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        if fused:
            d = torch.cdist(x, self.centres)
        else:
            d = (x[:, None, :] - self.centres[None]).pow(2).sum(-1).sqrt()
        return self.head(self.drop(torch.tanh(d)))


def test_ops_without_double_backward_fall_back_to_finite_differences() -> None:
    net = _DistanceNet()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=F64)

    def run(inputs: tuple, method: str = "auto"):
        gen = torch.Generator().manual_seed(9)
        return curvature(net, inputs, inits=2, generator=gen, iters=300, probes=16, tol=1e-12, method=method)

    exact, fallback = run((x, False)), run((x, True))
    assert {r.method for r in exact.per_init} == {"autograd"}
    assert {r.method for r in fallback.per_init} == {"finite-difference"}
    assert fallback.top_eigenvalues == pytest.approx(exact.top_eigenvalues, rel=1e-5)
    assert fallback.traces == pytest.approx(exact.traces, rel=1e-5)
    assert fallback.grad_norms == pytest.approx(exact.grad_norms, rel=1e-9)
    with pytest.raises(UsageError, match="double backward"):
        run((x, True), "autograd")


def test_the_module_is_left_as_it_was_and_resample_is_called_per_init() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls: list[int] = []

    def double(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls.append(1)
        return {k: 2 * v for k, v in params.items()}

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    res = curvature(
        net, x, inits=3, generator=torch.Generator().manual_seed(0), resample=double, iters=20, probes=4
    )
    assert len(calls) == 2  # init 0 is the module's own parameters
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    curvature(
        net, x, inits=2, generator=torch.Generator(), resample=double, iters=2, probes=2, keep_own=False
    )
    assert len(calls) == 4
    assert res.per_init[1].grad_norms != res.per_init[0].grad_norms


def test_gaussian_redraw_keeps_constants_and_the_spread() -> None:
    g = torch.Generator().manual_seed(0)
    params = {
        "w": 0.3 * torch.randn(200, 100, generator=g),
        "gamma": torch.ones(50),
        "bias": torch.zeros(50),
        "scalar": torch.tensor([2.0]),
    }
    out = gaussian_redraw(params, g)
    assert (
        out["gamma"] is params["gamma"]
        and out["bias"] is params["bias"]
        and out["scalar"] is params["scalar"]
    )
    assert out["w"].shape == params["w"].shape and out["w"].dtype == torch.float32
    assert not torch.equal(out["w"], params["w"])
    # std of 20,000 draws: relative se about 1/sqrt(2 n) = 0.005
    assert float(out["w"].std()) == pytest.approx(float(params["w"].std()), rel=0.02)
    assert abs(float(out["w"].mean())) < 4 * 0.3 / math.sqrt(20_000)


def _relu_mlp(depth: int, width: int, he: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        if he:
            torch.nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def test_pytorch_default_init_starves_the_first_layers_of_gradient() -> None:
    # Hanin (2018), Orvieto et al. (2022): with weight variance 1/(3 fan_in) each ReLU layer shrinks the
    # backward signal by 1/6 in squared norm, so the first layer's gradient is ~6^(-(L-1)/2) of He's
    depth, width = 10, 64
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1))
    first, last = "0.weight", f"{2 * depth - 2}.weight"
    res = {}
    for he in (False, True):
        gen = torch.Generator().manual_seed(1)
        res[he] = curvature(
            _relu_mlp(depth, width, he), x, inits=3, generator=gen, iters=30, probes=4, tol=1e-3
        )
    default, he = res[False].grad_norms, res[True].grad_norms
    assert default[first] < 1e-2 * he[first]  # predicted ratio 6^-4.5 = 3e-4
    # and within the network: the default init's first layer is starved relative to its last
    assert default[first] / default[last] < 0.05 * he[first] / he[last]
    # He keeps the gradient norms of all layers within a small factor of each other
    he_norms = [he[f"{2 * j}.weight"] for j in range(depth)]
    assert max(he_norms) < 10 * min(he_norms)


def _graph_and_prediction(net: torch.nn.Module, width: int):
    from initaudit.frontends.torch_graph import graph_from_module
    from initaudit.theory.propagate import predict

    graph = graph_from_module(net, (torch.randn(1, width),), source="mlp", fmt="torch")
    return graph, predict(graph)


def _with_head(depth: int, width: int, he: bool) -> torch.nn.Sequential:
    net = _relu_mlp(depth, width, he)
    return torch.nn.Sequential(*net, torch.nn.ReLU(), torch.nn.Linear(width, 10))


@pytest.mark.parametrize(
    ("depth", "width", "he", "severity"),
    [(64, 16, True, "info"), (3, 256, True, None), (10, 64, False, "warning"), (10, 64, True, None)],
    ids=["deep-narrow-he", "shallow-wide-he", "pytorch-default", "he-10x64"],
)
def test_gradient_spread_rule(depth: int, width: int, he: bool, severity: str | None) -> None:
    """IA402 through `check --mc --curvature`'s path: deep narrow He (ln of a layer's gradient is a
    random walk in depth, variance ~ 5/n per layer: spread ~ 20x) and PyTorch's default init
    (a drift: ~250x) fire; a shallow wide He net (spread ~ 1.1) and a moderate He net (~ 2) do not."""
    from initaudit.montecarlo.measure import MCOptions, measure
    from initaudit.rules import evaluate

    graph, pred = _graph_and_prediction(_with_head(depth, width, he), width)
    pred.measured = measure(graph, pred, MCOptions(samples=20, seed=0, curvature=True))
    curv = pred.measured.curvature
    assert len(curv.per_init) == 5 and set(curv.relative_gradients()) == {
        k for k, shape in curv.shapes.items() if len(shape) == 2
    }
    found = [f for f in evaluate(graph, pred) if f.code == "IA402"]
    if severity is None:
        assert not found
        return
    (finding,) = found
    assert str(finding.severity) == severity
    spread = finding.evidence["spread"]
    assert spread > (100 if severity == "warning" else 10)
    # the spread is recomputed from the per-init numbers, hidden layers only (the head is excluded)
    hidden = [f"{2 * j}.weight" for j in range(depth)]
    per_init = sorted(
        max(r.grad_norms[k] / r.param_norms[k] for k in hidden)
        / min(r.grad_norms[k] / r.param_norms[k] for k in hidden)
        for r in curv.per_init
    )
    assert spread == pytest.approx(per_init[2], rel=1e-12)
    if not he:  # the drift starves the first layers and feeds the last
        assert finding.location in ("0.weight", "2.weight")
        assert finding.evidence["fastest"] == f"{2 * depth - 2}.weight"


def test_curvature_alone_measures_no_taps() -> None:
    """`--curvature` without `--mc`: the curvature is measured, no network is sampled for lengths."""
    from initaudit.montecarlo.measure import MCOptions, measure

    graph, pred = _graph_and_prediction(_with_head(4, 32, True), 32)
    result = measure(graph, pred, MCOptions(samples=0, seed=0, curvature=True))
    assert result.taps == {} and result.engine == "none" and math.isnan(result.var_hat[0])
    assert len(result.curvature.per_init) == 5 and result.curvature.top_eigenvalue > 0
