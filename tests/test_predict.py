"""`initaudit predict`'s library: widths and eta parsing, the graphs build_graph makes (checked
against THEORY.md's closed forms), and the design answers (checked by re-predicting)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from initaudit.audit import audit_graph
from initaudit.errors import UsageError
from initaudit.graph import Kind
from initaudit.predict import (
    MAX_LAYERS,
    audit_design,
    build_graph,
    design_answers,
    format_widths,
    make_spec,
    parse_eta,
    parse_widths,
)
from initaudit.report.json_report import report_dict
from initaudit.rules import Thresholds
from initaudit.synthetic import plain_mlp
from initaudit.theory.propagate import predict

# Parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64x50", [64] * 50),
        ("10,20,30,40", [10, 20, 30, 40]),
        ("784,256x10,10", [784, *[256] * 10, 10]),
        (" 128 x 3 , 64 ", [128, 128, 128, 64]),
        ("32", [32]),
    ],
)
def test_parse_widths(text, expected):
    assert parse_widths(text) == expected
    assert parse_widths(format_widths(expected)) == expected


def test_format_widths_writes_runs():
    assert format_widths([784, *[256] * 10, 10]) == "784,256x10,10"


@pytest.mark.parametrize("text", ["", "  ", "64x", "x50", "abc", "64;32", "0x3", "64x0", "64,,32", "-4"])
def test_parse_widths_rejects(text):
    with pytest.raises(UsageError, match="--widths"):
        parse_widths(text)


def test_parse_widths_caps_depth():
    with pytest.raises(UsageError, match=str(MAX_LAYERS)):
        parse_widths(f"8x{MAX_LAYERS + 1}")


@pytest.mark.parametrize(
    ("text", "blocks", "expected"),
    [
        ("1/sqrt(L)", 50, 1 / math.sqrt(50)),
        ("1 / sqrt(L)", 4, 0.5),
        ("1/sqrt(2L)", 8, 0.25),
        ("0.5/sqrt(L)", 25, 0.1),
        ("0.14", 50, 0.14),
        (0.14, 50, 0.14),
        ("0", 3, 0.0),
        (None, 3, 1.0),
    ],
)
def test_parse_eta(text, blocks, expected):
    assert parse_eta(text, blocks) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["-0.1", "fast", "1/sqrt(K)", "nan", "inf"])
def test_parse_eta_rejects(text):
    with pytest.raises(UsageError, match="--eta"):
        parse_eta(text, 10)


# Options --------------------------------------------------------------------------------------


def test_unknown_init_lists_the_known_ones():
    with pytest.raises(UsageError) as info:
        build_graph([64] * 3, init="glorious")
    message = str(info.value)
    assert "glorious" in message
    for name in ("he", "xavier", "xavier_uniform", "lecun", "pytorch", "kaiming_normal", "std=S"):
        assert name in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "sinusoid"}, "unknown activation"),
        ({"norm": "weird"}, "unknown norm"),
        ({"eta": 0.1}, "--residual"),
        ({"bias_std": -1.0}, "--bias-std"),
        ({"residual": 0}, "--residual"),
        ({"input_width": 0}, "--input-width"),
        ({"init": "std=-2"}, "unknown init"),
    ],
)
def test_bad_options_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        build_graph([64] * 3, **kwargs)


def test_init_and_activation_spellings():
    assert make_spec([8], init="Kaiming-Normal", activation="Swish").activation == "silu"
    assert make_spec([8], norm="LayerNorm").norm == "layer"
    assert make_spec([8], norm="batch_norm").norm == "batch"


# The graphs, against THEORY.md's closed forms ------------------------------------------------------


def ratio(graph) -> float:
    return predict(graph).summary.mean_ratio


@pytest.mark.parametrize(
    ("init", "factor"),
    [
        ("he", 1.0),
        ("he_uniform", 1.0),
        ("xavier", 0.5),
        ("xavier_uniform", 0.5),
        ("lecun", 0.5),
        ("pytorch", 1 / 6),
    ],
)
def test_mean_length_per_layer_factor(init, factor):
    # ReLU, square layers: E[M_j] = (sigma^2 / 2) E[M_{j-1}] (THEORY section 2's table).
    assert ratio(build_graph([128] * 12, init=init)) == pytest.approx(factor**12, rel=1e-9)


def test_xavier_on_changing_widths_and_input_width():
    widths, n0 = [10, 20, 30, 40], 784
    # sigma_j^2 = 2 n_{j-1} / (n_{j-1} + n_j): each ReLU layer multiplies E[M] by n_{j-1} / (n_{j-1} + n_j).
    fans = [n0, *widths]
    expected = math.prod(a / (a + b) for a, b in itertools.pairwise(fans))
    graph = build_graph(widths, init="xavier", input_width=n0)
    assert graph.layers[1].fan_in == n0
    assert ratio(graph) == pytest.approx(expected, rel=1e-9)


def test_fixed_std_init():
    # std 0.05 whatever the fan-in: sigma^2 = 0.0025 * 256 = 0.64, factor 0.32 per ReLU layer.
    assert ratio(build_graph([256] * 5, init="std=0.05")) == pytest.approx(0.32**5, rel=1e-9)
    assert ratio(build_graph([256] * 5, init="normal(std=0.05)")) == pytest.approx(0.32**5, rel=1e-9)


def test_theory_worked_check_through_build_graph():
    # THEORY section 3: depth 20, width 32, Gaussian He.
    s = predict(build_graph(parse_widths("32x20"))).summary
    assert s.second_ratio == pytest.approx(math.prod(1 + 5 / 32 for _ in range(20)), rel=1e-6)  # 18.2404
    assert s.log_mean == pytest.approx(-1.6508, abs=2e-4)
    assert s.log_var == pytest.approx(3.550, abs=1e-3)
    assert s.median == pytest.approx(0.1998, abs=2e-4)
    assert s.beta == pytest.approx(20 / 32)


@pytest.mark.parametrize(("eta", "blocks"), [(0.14, 50), ("1/sqrt(L)", 50), (1.0, 10), ("0.5/sqrt(L)", 30)])
def test_residual_stream_grows_as_prod_one_plus_eta_squared(eta, blocks):
    # Linear-terminated He branches have gain g = 1: E[M_L]/M_0 = (1 + eta^2)^L (THEORY section 4).
    value = parse_eta(eta, blocks)
    graph = build_graph([64], residual=blocks, eta=eta)
    assert sum(layer.kind is Kind.ADD for layer in graph) == blocks
    assert ratio(graph) == pytest.approx((1 + value**2) ** blocks, rel=1e-9)


def test_residual_with_a_stem_and_a_projection():
    graph = build_graph([10, 20, 30, 40], residual=50, eta=0.14)
    names = [layer.name for layer in graph]
    assert names[:8] == ["input", "fc1", "act1", "fc2", "act2", "fc3", "act3", "embed"]
    assert graph["embed"].fan_in == 30 and graph["embed"].width == 40
    assert len(graph.residual_blocks()) == 50
    # He stem keeps the mean, the LeCun projection keeps it, the blocks multiply it by (1 + eta^2)^L.
    assert ratio(graph) == pytest.approx(1.0196**50, rel=1e-9)


def test_normalization_resets_the_length():
    xavier = audit_graph(build_graph([64] * 30, init="xavier"))
    normed = audit_graph(build_graph([64] * 30, init="xavier", norm="batch"))
    assert xavier.verdict("fm1") == "error"
    assert normed.verdict("fm1") == "pass" and normed.verdict("fm2") == "pass"


def test_same_report_as_check():
    graph = build_graph(parse_widths("64x50"), init="xavier")
    result = audit_graph(graph)
    assert result.verdict("fm1") == "error" and result.verdict("fm2") == "warning"  # beta = 50/64
    assert {"IA101", "IA103", "IA201"} <= {f.code for f in result.findings}
    report = report_dict(result)
    text = json.dumps(report, allow_nan=False)  # the private spec never reaches the report
    assert "_spec" not in text and "NetSpec" not in text
    assert "64x50" in result.path


# Design answers, verified by re-predicting ------------------------------------------------------


def fm(spec, family: str, thresholds: Thresholds | None = None) -> str:
    return audit_graph(spec.graph(), thresholds=thresholds).verdict(family)


@pytest.mark.parametrize(("depth", "init"), [(50, "he"), (30, "xavier"), (20, "he")])
def test_min_width_passes_and_narrower_fails(depth, init):
    spec = make_spec([64] * depth, init=init)
    answers = design_answers(spec.graph())
    th = Thresholds()
    for key, bound, good in (
        ("min_width", th.beta_warning, {"pass"}),
        ("min_width_error", th.beta_error, {"pass", "warning"}),
    ):
        answer = answers[key]
        n = answer.value
        assert answer.checked
        assert fm(spec.but(widths=(n,) * depth), "fm2") in good
        assert fm(spec.but(widths=(n - 1,) * depth), "fm2") not in good
        assert fm(spec.but(widths=(int(0.9 * n),) * depth), "fm2") not in good
        # THEORY (Orvieto): Var ln R_j ~ 5/n + 18.5/n^2, judged as Var ln M_L / 5 <= bound.
        closed = next(k for k in range(1, 10_000) if depth * (1 / k + 3.7 / k**2) <= bound)
        assert abs(n - closed) <= 1 and n >= math.ceil(depth / bound)


def test_max_depth_passes_and_one_more_fails():
    spec = make_spec([64] * 50)
    answers = design_answers(spec)
    depth = answers["max_depth"].value
    assert fm(spec.but(widths=(64,) * depth), "fm2") == "pass"
    assert fm(spec.but(widths=(64,) * (depth + 1)), "fm2") != "pass"
    assert 0.9 * 0.3 * 64 <= depth <= 0.3 * 64
    worst = answers["max_depth_error"].value
    assert fm(spec.but(widths=(64,) * worst), "fm2") != "error"
    assert fm(spec.but(widths=(64,) * (worst + 1)), "fm2") == "error"


def test_variance_multiplier_fixes_fm1():
    # Xavier on square ReLU layers: variance 1/n where He wants 2/n.
    spec = make_spec([128] * 20, init="xavier")
    answer = design_answers(spec)["variance_multiplier"]
    assert answer.value == pytest.approx(2.0, rel=1e-12) and answer.checked
    assert fm(spec, "fm1") == "error"
    assert fm(spec.but(gain=answer.value), "fm1") == "pass"
    assert ratio(spec.but(gain=answer.value).graph()) == pytest.approx(1.0, rel=1e-9)
    # PyTorch's default: variance 1/(3 fan-in), six times below He.
    assert design_answers(make_spec([64] * 10, init="pytorch"))["variance_multiplier"].value == pytest.approx(
        6.0
    )


def test_variance_multiplier_for_tanh():
    # 1 / E[tanh(z)^2] = 1 / 0.394294 (THEORY's table) over Xavier's 1 on square layers.
    spec = make_spec([128] * 30, activation="tanh", init="xavier")
    answer = design_answers(spec)["variance_multiplier"]
    assert answer.value == pytest.approx(1 / 0.394294, rel=1e-4)
    assert answer.checked and fm(spec.but(gain=answer.value), "fm1") == "pass"


def test_he_needs_no_multiplier_and_normalized_nets_need_no_width():
    assert "already" in design_answers(make_spec([64] * 10))["variance_multiplier"].text
    answers = design_answers(make_spec([64] * 10, norm="layer"))
    assert [a.key for a in answers.answers] == ["normalized"]


def test_fm1_depth_is_where_the_mean_leaves_the_band():
    # Xavier halves E[M] per layer: 1/4 < 1/3 at layer 2, 1/16 < 1/10 at layer 4.
    answer = design_answers(make_spec([64] * 10, init="xavier"))["fm1_depth"]
    assert answer.value == 2 and "layer 4" in answer.text


@pytest.mark.parametrize("blocks", [10, 50])
def test_max_eta_passes_and_ten_percent_more_fails(blocks):
    spec = make_spec([64], residual=blocks, eta=1.0)
    answers = design_answers(spec)
    th = Thresholds()
    for key, bound, good in (
        ("max_eta", th.fm1_warning, {"pass"}),
        ("max_eta_error", th.fm1_error, {"pass", "warning"}),
    ):
        eta = answers[key].value
        assert answers[key].checked
        assert fm(spec.but(eta=eta), "fm1") in good
        assert fm(spec.but(eta=1.1 * eta), "fm1") not in good
        # prod(1 + g eta^2) = bound with g = 1, rounded down to 3 significant figures.
        closed = math.sqrt(bound ** (1 / blocks) - 1)
        assert closed * 0.99 <= eta <= closed


def test_max_eta_follows_the_thresholds():
    th = Thresholds(fm1_warning=2.0, fm1_error=4.0)
    spec = make_spec([32], residual=20, eta="1/sqrt(L)")
    eta = design_answers(spec, thresholds=th)["max_eta"].value
    assert math.sqrt(2 ** (1 / 20) - 1) * 0.99 <= eta <= math.sqrt(2 ** (1 / 20) - 1)
    assert fm(spec.but(eta=eta), "fm1", th) == "pass" and fm(spec.but(eta=1.1 * eta), "fm1", th) != "pass"


def test_eta_recommendation_is_one_over_sqrt_blocks():
    answers = design_answers(make_spec([64], residual=50, eta=1.0))
    rec = answers["eta_recommended"]
    assert rec.value == pytest.approx(1 / math.sqrt(50)) and rec.checked
    assert f"{(1 + 1 / 50) ** 50:.3g}" in rec.text  # E[M_L]/M_0 = (1 + 1/L)^L
    assert "residual_fm2" in answers


def test_xavier_branches_have_a_smaller_gain():
    # Xavier on square layers halves each ReLU->dense step: g = 1/4 for two layers, so the
    # largest eta doubles: prod(1 + eta^2 / 4) = 3.
    spec = make_spec([64], residual=20, eta=1.0, init="xavier")
    eta = design_answers(spec)["max_eta"].value
    closed = math.sqrt((3 ** (1 / 20) - 1) * 4)
    assert closed * 0.99 <= eta <= closed


def test_a_graph_without_spec_gets_the_same_width_and_depth_as_its_spec():
    # A model file's graph has no spec to vary, but the same FM2 answers: both come from the
    # graph's constant-width chain (initaudit.design), as IA201's fix text does.
    spec = make_spec([64] * 50)
    keys = ("min_width", "min_width_error", "max_depth", "max_depth_error")
    from_file = design_answers(plain_mlp(64, [64] * 50))
    from_spec = design_answers(spec)
    assert [from_file[k].value for k in keys] == [from_spec[k].value for k in keys]
    assert from_file["min_width"].value > math.ceil(50 / 0.3)  # Var ln M / 5 > beta for ReLU
    assert all(from_file[k].checked for k in keys)
    assert "variance_multiplier" not in from_file  # no init law to vary


def test_audit_design_and_json():
    result, answers = audit_design(build_graph([64] * 50, init="xavier"))
    assert result.verdict("fm1") == "error"
    doc = answers.to_dict()
    json.dumps(doc, allow_nan=False)
    assert doc["min_width"]["value"] == answers["min_width"].value and doc["min_width"]["checked"]
    assert all(line.startswith(("How", "What", "And")) for line in answers.lines())
