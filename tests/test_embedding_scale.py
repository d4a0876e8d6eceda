"""Embeddings start the signal at their tables' absolute scale.

LayerNorm outputs have mean square gamma^2 + beta^2 = 1 whatever comes in, so a pre-norm
branch adds a fixed absolute amount per block: next to a std-0.02 table (mean square 4e-4)
the stream grows many-fold, next to a std-1 table hardly at all. The prediction propagates
in absolute units (each lookup at its table's mean square) and reports in Monte Carlo's
(M_0 = the mean lookup length over the embedding sources), so the two must agree tap by tap.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from initaudit.audit import AuditResult, audit_graph  # noqa: E402
from initaudit.frontends.torch_graph import graph_from_module  # noqa: E402
from initaudit.graph import Kind  # noqa: E402
from initaudit.montecarlo.measure import MCOptions  # noqa: E402
from initaudit.rules import Severity  # noqa: E402
from initaudit.theory.propagate import predict  # noqa: E402
from initaudit.theory.state import SignalState  # noqa: E402

WIDTH, BLOCKS, VOCAB, POSITIONS = 32, 3, 100, 32
Z = 4.0


class _Block(nn.Module):
    """Pre-norm MLP block: x + proj(gelu(fc(ln(x)))), GPT-2's std-0.02 weights."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * width, width)
        for linear in (self.fc, self.proj):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.act(self.fc(self.ln(x))))


class _PreNorm(nn.Module):
    """Token + position embeddings of std ``table_std``, then pre-norm blocks."""

    def __init__(self, table_std: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(POSITIONS, WIDTH)
        for table in (self.tok, self.pos):
            nn.init.normal_(table.weight, std=table_std)
        self.blocks = nn.ModuleList(_Block(WIDTH) for _ in range(BLOCKS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return x


def _graph(module: nn.Module, tokens: int):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    return graph_from_module(module, (ids,), source="prenorm", fmt="torch")


def _agree(result: AuditResult, names: list[str]) -> None:
    taps = result.prediction.measured.taps
    rows = {row.name: row for row in result.prediction.layers}
    for name in names:
        row, est = rows[name], taps[name]
        for quantity, predicted, value, se in (
            ("E ln M", row.log_mean, est.log_mean, est.log_mean_se),
            ("median", row.median, est.median, est.median_se),
        ):
            assert abs(value - predicted) <= Z * se, (name, quantity, predicted, value, se)


def test_input_state_at_a_mean_square_scales_every_field() -> None:
    """SignalState.input(n, q) is q times the unit input: m2 by q, m4 and c22 by q^2, ln M by
    ln q, the law's variance by q; the coordinate modes (in RMS units) stay zero."""
    q, n = 4e-4, 64
    unit, small = SignalState.input(n), SignalState.input(n, q)
    assert small.m2 == pytest.approx(q * unit.m2, rel=1e-12)
    assert small.m4 == pytest.approx(q * q * unit.m4, rel=1e-12)
    assert small.c22 == pytest.approx(q * q * unit.c22, rel=1e-12)
    assert small.spread == pytest.approx(unit.spread, abs=1e-12)
    assert small.log[0] == pytest.approx(math.log(q), rel=1e-12) and small.log[1:] == unit.log[1:]
    assert small.law.variance == pytest.approx(q) and small.law.mean == 0.0
    assert small.modes == unit.modes and small.modes.mean1 == 0.0 and small.modes.mean3 == 0.0
    assert SignalState.input(n, 1.0) == unit


def test_both_frontends_record_the_table() -> None:
    graph = _graph(_PreNorm(0.02), tokens=1)
    sources = [layer for layer in graph if layer.kind is Kind.INPUT]
    assert len(sources) == 2
    for layer in sources:
        table = layer.attrs["table"]
        assert table is not None and 0.5 * 4e-4 < table.second_moment < 2 * 4e-4


def test_small_tables_prenorm_stream_agrees_with_monte_carlo() -> None:
    """One token (the prediction's width is the token's feature count, which Monte Carlo then
    measures exactly): every stream join agrees within 4 se, the stream grows by far more than
    a unit-scale table's would, and the growth is an additive (pre-norm) warning, not an error."""
    result = audit_graph(_graph(_PreNorm(0.02), tokens=1), mc=MCOptions(samples=300, seed=0))
    pred = result.prediction
    joins = [row.name for row in pred.layers if row.tap]
    assert len(joins) == BLOCKS + 1  # the embedding sum, then each block's join
    _agree(result, joins)
    codes = {f.code: f for f in result.findings}
    assert "IA401" not in codes
    assert "IA101" not in codes and "IA102" not in codes
    (ia301,) = [f for f in result.findings if f.code == "IA301"]
    assert ia301.severity is Severity.WARNING and "additively" in ia301.message
    # Token + position sum to 2 M_0 whatever the tables' scale (E[M_0] is their mean).
    rows = {row.name: row for row in pred.layers}
    assert rows[joins[0]].mean == pytest.approx(2.0, rel=0.05)
    assert rows[joins[-1]].mean > 1.5 * rows[joins[0]].mean


def test_table_scale_matters() -> None:
    """The same module with std-1 tables: the blocks add the same *absolute* amount (the
    LayerNorm output does not see the table's scale), so in units of M_0 the growth is
    ~2500x smaller, and the std-1 stream stays at ~2 M_0."""
    small = predict(_graph(_PreNorm(0.02), tokens=1))
    unit = predict(_graph(_PreNorm(1.0), tokens=1))

    def added(pred) -> float:  # absolute growth from the embedding sum to the last join
        taps = [row for row in pred.layers if row.tap]
        return (taps[-1].mean - taps[0].mean) * pred.unit

    final_unit = [row for row in unit.layers if row.tap][-1].mean
    final_small = [row for row in small.layers if row.tap][-1].mean
    assert final_unit == pytest.approx(2.0, rel=0.01) and final_small > 1.5 * final_unit
    assert added(small) == pytest.approx(added(unit), rel=0.1)
    assert small.unit == pytest.approx(4e-4, rel=0.5) and unit.unit == pytest.approx(1.0, rel=0.5)


def test_homogeneous_network_reports_the_same_ratios_at_any_table_scale() -> None:
    """Without norms, biases or non-homogeneous activations (bias-free linear + ReLU), the
    ratios to M_0 do not depend on the table's scale: float-like behaviour is kept."""

    class Linear(nn.Module):
        def __init__(self, std: float) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, WIDTH)
            nn.init.normal_(self.tok.weight, std=std)
            self.fc = nn.Linear(WIDTH, WIDTH, bias=False)
            self.relu = nn.ReLU()
            self.out = nn.Linear(WIDTH, WIDTH, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.relu(self.fc(self.tok(ids))))

    torch.manual_seed(1)
    a = Linear(0.02)
    torch.manual_seed(1)
    b = Linear(1.0)
    pa, pb = predict(_graph(a, tokens=1)), predict(_graph(b, tokens=1))
    for ra, rb in zip(pa.layers, pb.layers, strict=True):
        assert ra.mean == pytest.approx(rb.mean, rel=1e-9) and ra.log_var == pytest.approx(rb.log_var)


def test_tiny_gpt2_embedding_sum_and_first_join_agree() -> None:
    """Tiny GPT-2 (2 layers, width 64), one token. Attention is a pass-through in the theory,
    but with one token softmax is exactly 1, so attention *is* value -> c_proj: the embedding
    sum and every join can honestly be expected to agree. (With many tokens, causal attention
    averages the values and shrinks its branch: the theory does not model that, and IA401
    then rightly reports the attention joins.)"""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    result = audit_graph(_graph(model, tokens=1), mc=MCOptions(samples=200, seed=0))
    joins = [row.name for row in result.prediction.layers if row.tap and row.kind == "add"]
    assert len(joins) == 5  # the embedding sum, then attention's and the MLP's join per layer
    _agree(result, joins)
    assert "IA401" not in {f.code for f in result.findings}
