"""Exact Gaussian projection in the ensemble engine: the algebra against the full product, the
law against full draws (two-sample KS on ln M_L), and which weights qualify."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from initaudit.montecarlo.ensemble import (  # noqa: E402
    draw_noise,
    program_parameters,
    projection_plan,
    run_ensemble,
    sample_ensemble,
)
from initaudit.montecarlo.resample import Law, resample, resample_laws  # noqa: E402

ALPHA = 0.001


def _program(module: nn.Module, x: torch.Tensor) -> tuple[Any, dict[str, str]]:
    from initaudit.frontends.torch_graph import graph_from_module

    graph = graph_from_module(module, (x,), source="m", fmt="t")
    return graph.meta["_program"], graph.meta["_nodes"]


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def ks_critical(alpha: float, n: int, m: int) -> float:
    """Asymptotic critical value c(alpha) sqrt((n + m) / (n m)), c = sqrt(-ln(alpha / 2) / 2)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _log(values: torch.Tensor) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(values.numpy())


def _compare(
    module: nn.Module, x: torch.Tensor, taps: dict[str, str], samples: int, seeds: tuple[int, int, int]
) -> tuple[dict[str, Any], list[tuple[str, float, float, float]]]:
    """Full draws, projection, and projection with every projected std x 1.1 (the control):
    per tap, the KS statistics (projection vs full, control vs full) and the critical value."""
    program, _ = _program(module, x)
    laws = resample_laws(program_parameters(program), "gaussian")
    plan = projection_plan(program, laws)
    full = sample_ensemble(program, taps, x, samples, torch.Generator().manual_seed(seeds[0]), project=False)
    notes: list[str] = []
    fast = sample_ensemble(program, taps, x, samples, torch.Generator().manual_seed(seeds[1]), notes=notes)
    assert any("Gaussian projection" in line for line in notes)
    wider = {k: dataclasses.replace(law, std=1.1 * law.std) if k in plan else law for k, law in laws.items()}
    control = sample_ensemble(program, taps, x, samples, torch.Generator().manual_seed(seeds[2]), laws=wider)
    critical = ks_critical(ALPHA, samples, samples)
    rows = []
    for name in taps:
        reference = _log(full[name])
        rows.append(
            (
                name,
                ks_statistic(_log(fast[name]), reference),
                ks_statistic(_log(control[name]), reference),
                critical,
            )
        )
    return plan, rows


def _check(rows: list[tuple[str, float, float, float]]) -> None:
    for name, same, control, critical in rows:
        assert same < critical, (name, same, critical)
        assert control > critical, (name, control, critical)


# --------------------------------------------------------------------------- models


def _mlp(depth: int, width: int, seed: int) -> nn.Sequential:
    """He weights and PyTorch-default biases: the weights are projected, the biases drawn."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, width: int, blocks: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inner = nn.ModuleList(nn.Linear(width, 2 * width, bias=False) for _ in range(blocks))
        self.outer = nn.ModuleList(nn.Linear(2 * width, width, bias=False) for _ in range(blocks))
        for linear in self.inner:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        for inner, outer in zip(self.inner, self.outer, strict=True):
            y = y + outer(torch.relu(inner(y)))
        return y


class _TokenMLP(nn.Module):
    """Dense layers applied per token of a (1, T, n) input, then a mix across tokens: the
    projection has P = T rows per network and the rows' joint law matters downstream."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, 2 * width, bias=False)
        self.w = nn.Parameter(torch.randn(2 * width, width) / math.sqrt(width))  # used as x @ w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        h = h @ self.w
        return h - h.mean(dim=1, keepdim=True)  # centred across tokens: depends on the rows jointly


def _output(program: Any) -> str:
    return next(n for n in program.graph_module.graph.nodes if n.op == "output").args[0][0].name


def _adds(program: Any) -> list[str]:
    return [n.name for n in program.graph_module.graph.nodes if n.target is torch.ops.aten.add.Tensor]


# --------------------------------------------------------------------------- the law


def test_projection_matches_full_draws_on_an_mlp() -> None:
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    module = _mlp(6, 16, seed=2)
    _, nodes = _program(module, x)
    taps = {"mid": nodes["5"], "last": nodes["11"]}
    plan, rows = _compare(module, x, taps, 3000, (3, 4, 5))
    assert len(plan) == 6 and all(p.rows == 1 and p.rank == 1 for p in plan.values())
    _check(rows)


def test_projection_matches_full_draws_on_a_residual_mlp() -> None:
    x = torch.randn(1, 12, generator=torch.Generator().manual_seed(6))
    module = _Residual(12, 3, seed=7)
    program, _ = _program(module, x)
    adds = _adds(program)
    assert len(adds) == 3
    plan, rows = _compare(module, x, {"first": adds[0], "last": adds[-1]}, 3000, (8, 9, 10))
    assert len(plan) == 6
    _check(rows)


def test_projection_matches_full_draws_with_several_rows_per_network() -> None:
    """(1, T, n) tokens: P = 4 rows per network, R from a QR of the rows."""
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(11))
    module = _TokenMLP(16, seed=12)
    program, _ = _program(module, x)
    out = _output(program)
    matmul = next(
        n.name for n in program.graph_module.graph.nodes if n.target is torch.ops.aten.matmul.default
    )
    taps = {"matmul": matmul, "out": out}
    plan, rows = _compare(module, x, taps, 2500, (13, 14, 15))
    assert {p.key for p in plan.values()} == {"a.weight", "b.weight", "w"}
    assert {(p.rows, p.rank) for p in plan.values()} == {(4, 4)}
    _check(rows)
    # A second control: rows drawn as if independent (each row's own norm, R = diag ||a_p||)
    # keeps every row's marginal law but not their joint one; the centred output rejects it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("initaudit.montecarlo.ensemble._project", _independent_rows)
        _, wrong = _compare(module, x, {"out": out}, 2500, (13, 14, 15))
    assert wrong[0][1] > 4 * wrong[0][3], wrong


def _independent_rows(proj: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a_index, w_index, b_index = {torch.ops.aten.linear.default: (0, 1, 2)}.get(target, (0, 1, None))
    a, noise = args[a_index], args[w_index]
    rows = a.reshape(-1, a.shape[-1])
    out = proj.std * torch.linalg.vector_norm(rows, dim=-1, keepdim=True) * noise
    if b_index is not None and len(args) > b_index and args[b_index] is not None:
        out = out + args[b_index]
    return out.reshape(*a.shape[:-1], out.shape[-1])


def test_projection_through_a_transformer_encoder_layer() -> None:
    """nn.TransformerEncoderLayer on (1, T, n): attention in/out projections and the
    feed-forward layers are projected (P = T = 5 < n); ln M before the last norm agrees."""
    torch.manual_seed(16)
    module = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(17))
    program, _ = _program(module, x)
    plan, rows = _compare(module, x, {"add": _adds(program)[-1]}, 1500, (18, 19, 20))
    assert {p.key for p in plan.values()} == {
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    }
    _check(rows)


# --------------------------------------------------------------------------- the algebra


class _Products(nn.Module):
    """One product per form torch.export produces; ``form`` picks it."""

    def __init__(self, form: str, n: int = 16, m: int = 8) -> None:
        super().__init__()
        self.form = form
        shape = (n, m) if form == "matmul" else (m, n)
        self.w = nn.Parameter(torch.randn(shape))
        self.bias = nn.Parameter(torch.randn(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "linear":
            return nn.functional.linear(x, self.w, self.bias)
        if self.form == "mm":
            return torch.mm(x, self.w.t())
        if self.form == "addmm":
            return torch.addmm(self.bias, x, self.w.T)
        if self.form == "transpose":
            return torch.matmul(x, self.w.transpose(0, 1))
        return x @ self.w  # a weight stored (n, m)


@pytest.mark.parametrize("form", ["linear", "mm", "addmm", "transpose", "matmul"])
@pytest.mark.parametrize("rows", [1, 3])
def test_projection_is_the_product_for_the_matching_noise(form: str, rows: int) -> None:
    """With H = (Z Q)^T built from the weight's own Z (A^T = Q R), the projection reproduces
    the full product A (mu + sigma Z)^T exactly: the identity the law rests on."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(rows, 16, generator=gen, dtype=torch.float64)
    module = _Products(form).double()
    program, _ = _program(module, x)
    out = _output(program)
    law = Law("normal", mean=0.3, std=0.5)
    plan = projection_plan(program, {"w": law, "bias": Law("keep")})
    assert list(plan) == ["w"] and plan["w"].rank == rows
    samples = 4
    z = torch.randn(samples, *module.w.shape, generator=gen, dtype=torch.float64)
    z_v = z.mT if form == "matmul" else z  # the (m, n) orientation V of the product A V^T
    q, r = torch.linalg.qr(x.mT, mode="reduced")  # (n, r), (r, P)
    if rows == 1:
        q = q * torch.sign(r[0, 0])  # one row: the engine takes R = +||a||
    noise = {"w": (z_v @ q).mT.contiguous()}  # H = (Z Q)^T, (samples, r, m)
    bias = torch.randn(samples, 8, generator=gen, dtype=torch.float64)
    params = {"w": law.mean + law.std * z, "bias": bias}
    taps = {"out": out}
    full = run_ensemble(program, taps, x, params, mode="vmap")
    projected = run_ensemble(program, taps, x, {"bias": bias}, projection=plan, noise=noise, mode="vmap")
    torch.testing.assert_close(projected["out"], full["out"], rtol=1e-10, atol=0)
    looped = run_ensemble(program, taps, x, {"bias": bias}, projection=plan, noise=noise, mode="loop")
    torch.testing.assert_close(looped["out"], full["out"], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- which weights


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.own = nn.Linear(16, 16)
        self.peeked = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(torch.relu(self.shared(x)))  # one weight, two products: tied
        y = self.peeked(y) * self.peeked.weight.mean()  # its weight has a second user
        return self.own(torch.relu(y))


def test_a_tied_weight_takes_the_full_path() -> None:
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(30))
    program, nodes = _program(_Tied(), x)
    params = program_parameters(program)
    laws = resample_laws(params, "gaussian")
    plan = projection_plan(program, laws)
    assert list(plan) == ["own.weight"]
    # The run draws the tied weight once per network and projects the other.
    gen = torch.Generator().manual_seed(31)
    rest = {k: v for k, v in params.items() if k not in plan}
    sampled = resample(rest, "gaussian", 5, gen, laws=laws)
    noise = draw_noise(plan, 5, gen)
    out = run_ensemble(program, {"out": nodes["own"]}, x, sampled, projection=plan, noise=noise)
    assert out["out"].shape == (5,) and bool(torch.isfinite(out["out"]).all())


def test_only_normal_laws_and_only_when_cheaper() -> None:
    x = torch.randn(1, 16)
    program, _ = _program(_mlp(3, 16, seed=32), x)
    params = program_parameters(program)
    assert len(projection_plan(program, resample_laws(params, "gaussian"))) == 3
    for scheme in ("bootstrap", "inputs"):
        assert projection_plan(program, resample_laws(params, scheme)) == {}
    # PyTorch's default init is recognized as uniform: its law is not Gaussian, no projection.
    default, _ = _program(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), torch.randn(1, 64))
    laws = resample_laws(program_parameters(default), "scheme")
    assert {law.kind for law in laws.values()} == {"uniform"}
    assert projection_plan(default, laws) == {}
    # P = 12 rows: a and b have n = 8 <= P (rank n, nothing saved); w has n = 16 > P, but
    # 12 x 16 noise plus a QR cost more than its 16 x 8 entries and their product.
    tokens, _ = _program(_TokenMLP(8, seed=33), torch.randn(1, 12, 8))
    assert projection_plan(tokens, resample_laws(program_parameters(tokens), "gaussian")) == {}
    tokens, _ = _program(_TokenMLP(8, seed=33), torch.randn(1, 2, 8))
    assert set(projection_plan(tokens, resample_laws(program_parameters(tokens), "gaussian"))) == {
        "a.weight",
        "b.weight",
        "w",
    }
