"""initaudit.design: the searches, the constant-width chain judged by IA201's own test, and
the one set of FM2 numbers that the rule, the fix plan and ``predict`` all print."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from initaudit import design
from initaudit.audit import audit_file, audit_graph
from initaudit.design import (
    Chain,
    bisect_geometric,
    fm2_design,
    fm2_design_for,
    fm2_equivalent,
    largest_float,
    smallest_int,
)
from initaudit.fix.plan import build_plan, fm2_remedy
from initaudit.predict import design_answers, make_spec
from initaudit.rules import Thresholds
from initaudit.synthetic import plain_mlp
from initaudit.theory.propagate import predict
from initaudit.theory.special import log_relu_average

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
TH = Thresholds()


# Searches ------------------------------------------------------------------------------------


def test_smallest_int_finds_the_boundary_from_any_guess():
    rng = random.Random(3)
    for _ in range(300):
        boundary = rng.randint(1, 5000)
        guess = rng.randint(1, 20_000)
        calls: list[int] = []

        def ok(x: int, b: int = boundary, calls: list[int] = calls) -> bool:
            calls.append(x)
            return x >= b

        assert smallest_int(ok, guess, hi=10_000) == boundary
        # Galloping: about 2 log2 |guess - boundary| + 2 evaluations, never a scan.
        assert len(calls) <= 2 * math.log2(abs(guess - boundary) + 2) + 4
    assert smallest_int(lambda x: x >= 50, 7, hi=40) is None
    assert smallest_int(lambda x: True, 100, lo=3) == 3
    # A guess at the boundary costs two evaluations: it passes and one less fails.
    calls = []
    assert smallest_int(lambda x: calls.append(x) or x >= 171, 171) == 171 and calls == [171, 170]


def test_largest_float_rounds_to_three_figures_and_bisect_geometric_converges():
    root2 = math.sqrt(2)
    assert largest_float(lambda x: x <= root2, 1.0) == 1.41
    assert largest_float(lambda x: x <= root2, 0.001) == 1.41  # far guess: bisection
    assert largest_float(lambda x: x * x <= 2e-6, 3.0) == 0.00141
    assert largest_float(lambda x: True, 1.0) == math.inf
    assert largest_float(lambda x: False, 1.0) is None
    lo = bisect_geometric(lambda x: x**3 <= 10, 1e-4, 1.0e3, rel=1e-8)
    assert lo <= 10 ** (1 / 3) <= lo * (1 + 1e-8)


# The chain and the rule's test -----------------------------------------------------------------

CHAINS = [
    Chain(),  # He ReLU
    Chain(gain=1.0),  # Xavier on square ReLU layers
    Chain("tanh", gain=1.0),
    Chain("leaky_relu", (("alpha", 0.2),), gain=1.9, kurtosis=1.8),
    Chain(bias_var=0.05, bias_kurtosis=1.8),
]


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: c.activation + ("+bias" if c.bias_var else ""))
def test_chain_equivalent_is_what_predict_and_ia201_see(chain):
    # One propagation judges every shorter depth: a chain's prefix is the shorter chain,
    # bit for bit (beta summed as propagate sums it).
    for width, depth in ((16, 5), (64, 50), (171, 50), (37, 70)):
        summary = predict(chain.graph(width, depth)).summary
        assert chain.equivalent(width, depth) == fm2_equivalent(summary.beta, summary.log_var)
        verdict = audit_graph(chain.graph(width, depth)).verdict("fm2")
        value = chain.equivalent(width, depth)
        expected = "pass" if value <= TH.beta_warning else "warning" if value <= TH.beta_error else "error"
        assert verdict == expected


def test_relu_answers_match_the_exact_log_chi_square_mixture():
    # A bias-free ReLU chain: Var ln M_L = L Var ln R(n) (Hanin & Rolnick's binomial mixture),
    # so width and depth follow from special functions alone, with no propagation.
    def passes(n: int, depth: int, bound: float) -> bool:
        return max(depth / n, depth * log_relu_average(n)[1] / 5) <= bound

    for depth, width in ((50, 64), (50, 16), (120, 256)):
        answers = fm2_design(Chain(), depth, width, TH)
        for level, bound in (("error", 1.0), ("warning", 0.3)):
            n = answers.min_width[level]
            assert passes(n, depth, bound) and not passes(n - 1, depth, bound)
            d = answers.max_depth[level]
            assert passes(width, d, bound) and not passes(width, d + 1, bound)
            assert answers.width_checked(level)
    # The THEORY.md closed form beta = L/n <= bound undercounts ReLU's Var ln M / 5 = L (1/n + 3.7/n^2).
    answers = fm2_design(Chain(), 50, 64, TH)
    assert answers.closed_width == {"error": 50, "warning": 167}
    assert answers.min_width == {"error": 54, "warning": 171}
    assert answers.max_depth == {"error": 60, "warning": 18}


def test_chain_of_reads_the_activation_and_weight_law():
    he = Chain.of(plain_mlp(64, [64] * 5))
    assert (he.activation, he.kurtosis, he.bias_var) == ("relu", 3.0, 0.0)
    assert he.gain == pytest.approx(2.0, rel=1e-12)
    xavier = Chain.of(plain_mlp(64, [64] * 5, activation="tanh", init="xavier_uniform", bias_std=0.1))
    assert xavier.activation == "tanh" and xavier.gain == pytest.approx(1.0, rel=1e-12)
    assert xavier.kurtosis == 1.8 and xavier.bias_var == pytest.approx(0.01)
    # The chain built from a graph is that graph when the graph is a constant-width chain.
    assert predict(he.graph(64, 5)).summary.log_var == pytest.approx(
        predict(plain_mlp(64, [64] * 5)).summary.log_var, rel=1e-12
    )


def test_the_search_stays_cheap():
    # Two widths searched from a refined closed-form guess, and one long chain for both
    # depth answers: a handful of propagations, each linear in depth.
    design._profile.cache_clear()
    fm2_design.cache_clear()
    fm2_design(Chain(bias_var=1e-4), 300, 64, TH)
    assert design._profile.cache_info().misses <= 10


# One set of numbers ---------------------------------------------------------------------------


def _rule(result) -> dict[str, int | None]:
    (finding,) = [f for f in result.findings if f.code == "IA201"]
    e = finding.evidence
    return {
        "width_warning": e["width_needed"],
        "width_error": e["width_needed_error"],
        "depth_warning": e["depth_allowed"],
        "depth_error": e["depth_allowed_error"],
    }


def _predict(answers) -> dict[str, int | None]:
    return {
        "width_warning": answers["min_width"].value,
        "width_error": answers["min_width_error"].value,
        "depth_warning": answers["max_depth"].value,
        "depth_error": answers["max_depth_error"].value,
    }


def _plan(result) -> dict[str, int | None]:
    remedy = build_plan(result).fm2
    assert remedy == fm2_remedy(result)
    return {key: remedy[key] for key in ("width_warning", "width_error", "depth_warning", "depth_error")}


@pytest.mark.parametrize(
    ("activation", "init"), [("relu", "he"), ("relu", "xavier"), ("tanh", "xavier"), ("tanh", "he")]
)
def test_rule_fix_plan_and_predict_agree_on_a_spec(activation, init):
    spec = make_spec([64] * 50, activation=activation, init=init)
    graph = spec.graph()
    result = audit_graph(graph)
    rule = _rule(result)
    assert rule == _predict(design_answers(graph, result.prediction)) == _predict(design_answers(spec))
    if init == "he":  # the plan has nothing to change, so it judges this very graph
        assert _plan(result) == rule
    else:  # the plan fixes FM1 first; the remedy is that of the fixed net, and IA201 says the same
        plan = build_plan(result)
        assert _plan(result) == _rule(plan.predicted)
    if activation == "relu":
        assert rule == {"width_warning": 171, "width_error": 54, "depth_warning": 18, "depth_error": 60}
        (finding,) = [f for f in result.findings if f.code == "IA201"]
        assert (
            "at least 171 at depth 50" in finding.fix and "cut depth to 18 layers at width 64" in finding.fix
        )
    # The widths are right for the spec itself: re-predicting it passes, one narrower does not.
    for level, good in (("warning", {"pass"}), ("error", {"pass", "warning"})):
        n = rule[f"width_{level}"]
        assert audit_graph(spec.but(widths=(n,) * 50).graph()).verdict("fm2") in good
        assert audit_graph(spec.but(widths=(n - 1,) * 50).graph()).verdict("fm2") not in good


def test_rule_fix_plan_and_predict_agree_on_a_model_file():
    result = audit_file(SAMPLES / "deep_narrow_he_mlp.onnx")  # 50 ReLU layers of width 16
    rule = _rule(result)
    assert rule == _plan(result) == _predict(design_answers(result.graph, result.prediction))
    assert rule == {"width_warning": 171, "width_error": 54, "depth_warning": 3, "depth_error": 11}
    (finding,) = [f for f in result.findings if f.code == "IA201"]
    # An error names the width and depth for its own level first, then for no warning.
    assert "at least 54 (no error) / 171 (no warning) at depth 50" in finding.fix
    assert "cut depth to 11 (no error) / 3 (no warning) layers at width 16" in finding.fix
    note = next(n for n in build_plan(result).notes if "IA201" in n)
    assert ">= 54 (no warning: >= 171)" in note and "at most 11 layers pass (no warning: 3)" in note
    design_ = fm2_design_for(result.graph, result.prediction, TH)
    assert (design_.depth, design_.width) == (50, 16)
