"""Rules on synthetic layer graphs: each finding fires where the theory says, and only there."""

from __future__ import annotations

import dataclasses
import math
import os
import random

import pytest

from initaudit.audit import Selection, audit_graph, display_path
from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.residual import find_residual_blocks
from initaudit.rules import RULES, Severity
from initaudit.synthetic import law_stats, plain_mlp, residual_mlp
from initaudit.theory.special import log_relu_average


def codes(result) -> set[str]:
    return {f.code for f in result.findings}


def replace_weight(graph, layer_name: str, **changes) -> None:
    layer = graph[layer_name]
    layer.weight = dataclasses.replace(layer.weight, **changes)


def test_he_mlp_is_clean():
    result = audit_graph(plain_mlp(256, [256] * 10, output=10))
    assert [f for f in result.findings if f.severity > Severity.INFO] == []
    assert result.verdict("fm1") == result.verdict("fm2") == "pass"


@pytest.mark.parametrize(("depth", "severity"), [(1, None), (2, "warning"), (4, "error")])
def test_fm1_thresholds_follow_the_design_defaults(depth, severity):
    # Xavier halves E[M] per layer: 1/2 passes, 1/4 is outside [1/3, 3], 1/16 outside [0.1, 10].
    result = audit_graph(plain_mlp(512, [512] * depth, init="xavier"))
    assert result.verdict("fm1") == (severity or "pass")


def test_fm1_fix_names_a_common_factor():
    result = audit_graph(plain_mlp(128, [128] * 20, init="xavier"))
    (finding,) = [f for f in result.findings if f.code == "IA101"]
    assert "multiply each of the 20 weights `fc1.weight`" in finding.fix
    assert "by ~1.41" in finding.fix  # sqrt(2): Xavier's variance is half of He's


def test_exploding_mean_length():
    graph = plain_mlp(256, [256] * 6)
    for j in range(1, 7):
        replace_weight(graph, f"fc{j}", std=math.sqrt(4 / 256), second_moment=4 / 256)
    result = audit_graph(graph)
    assert "IA102" in codes(result) and result.verdict("fm1") == "error"  # 2^6 = 64


def test_zero_signal_is_an_error_not_a_pass():
    graph = plain_mlp(64, [64] * 4)
    replace_weight(graph, "fc2", std=0.0, second_moment=0.0, zeros=64 * 64)
    result = audit_graph(graph)
    assert result.verdict("fm1") == "error"
    assert {"IA101", "IA502"} <= codes(result)


def test_nonfinite_weights_get_no_verdict():
    graph = plain_mlp(64, [64] * 4)
    replace_weight(graph, "fc3", nonfinite=3)
    result = audit_graph(graph)
    assert not result.computable
    assert result.verdict("fm1") == result.verdict("fm2") == "not computed"
    assert codes(result) == {"IA501"}


def test_fm2_thresholds_and_advice():
    assert audit_graph(plain_mlp(256, [256] * 20)).verdict("fm2") == "pass"  # beta = 0.078
    assert audit_graph(plain_mlp(64, [64] * 30)).verdict("fm2") == "warning"  # beta = 0.47
    result = audit_graph(plain_mlp(32, [32] * 40))  # beta = 1.25
    (finding,) = [f for f in result.findings if f.code == "IA201"]
    assert finding.severity is Severity.ERROR

    # A bias-free ReLU chain of width n: Var ln M_L = L Var ln R(n) exactly (Hanin & Rolnick's
    # binomial mixture of log-chi^2 laws), judged as max(L/n, Var ln M_L / 5) <= bound.
    def passes(n: int, depth: int, bound: float) -> bool:
        return max(depth / n, depth * log_relu_average(n)[1] / 5) <= bound

    for key, bound in (("width_needed", 0.3), ("width_needed_error", 1.0)):
        width = next(n for n in range(1, 1000) if passes(n, 40, bound))
        assert finding.evidence[key] == width > math.ceil(40 / bound)  # beta alone undercounts
    # Var ln M = depth * Var ln R(32) must stay below 5 * 0.3; Var ln R = 5/n + O(1/n^2).
    per_layer = log_relu_average(32)[1]
    assert finding.evidence["depth_allowed"] == math.floor(5 * 0.3 / per_layer)
    assert finding.evidence["depth_allowed_error"] == math.floor(5 * 1.0 / per_layer)
    e = finding.evidence
    assert (
        f"at least {e['width_needed_error']} (no error) / {e['width_needed']} (no warning) at depth 40"
        in finding.fix
    )
    assert (
        f"cut depth to {e['depth_allowed_error']} (no error) / {e['depth_allowed']} (no warning)"
        in finding.fix
    )
    # A warning names the width and depth that remove it, and no error level.
    (warning,) = [f for f in audit_graph(plain_mlp(64, [64] * 30)).findings if f.code == "IA201"]
    assert f"at least {warning.evidence['width_needed']} at depth 30" in warning.fix
    assert "no error" not in warning.fix and "for no warning" in warning.fix


def test_residual_rules():
    result = audit_graph(residual_mlp(64, 30, eta=1.0))
    (finding,) = [f for f in result.findings if f.code == "IA301"]
    assert finding.evidence["target_eta"] == pytest.approx(1 / math.sqrt(30))
    assert "IA102" not in codes(result)  # IA301 owns the residual case, with the right fix
    assert audit_graph(residual_mlp(64, 30, eta=1 / math.sqrt(30))).verdict("fm1") == "pass"
    relu = audit_graph(residual_mlp(64, 10, eta=0.1, terminal="relu"))
    assert "IA303" in codes(relu)


def test_dead_branch_needs_both_zero():
    graph = residual_mlp(16, 2, eta=0.0)
    replace_weight(graph, "b0.fc1", std=0.0, second_moment=0.0, zeros=256)
    result = audit_graph(graph)
    dead = [f for f in result.findings if f.code == "IA302"]
    assert [f.location for f in dead] == ["b0.fc1.weight"]  # block 1 keeps a live last weight
    assert "IA502" not in codes(result)  # a branch's last layer may be zero on purpose


def test_bias_dominated():
    result = audit_graph(plain_mlp(128, [128] * 12, init="pytorch", bias_std=math.sqrt(1 / 384)))
    assert {"IA101", "IA104"} <= codes(result)


def test_selection_precedence_is_ruff_like():
    assert Selection(["IA1"], []).allows("IA101")
    assert not Selection(["IA1"], []).allows("IA201")
    assert not Selection([], ["IA1"]).allows("IA103")
    assert Selection(["IA103"], ["IA1"]).allows("IA103")  # the more specific code wins
    assert not Selection(["IA103"], ["IA103"]).allows("IA103")  # ignore wins a tie
    with pytest.raises(ValueError, match="unknown rule"):
        Selection(["XX"], [])


def test_fingerprints_do_not_depend_on_how_the_path_is_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    relative, absolute = "models/m.onnx", str(tmp_path / "models" / "m.onnx")
    assert display_path(relative) == display_path(absolute) == display_path(f".{os.sep}{relative}")
    graph = plain_mlp(64, [64] * 12, init="xavier")
    a = audit_graph(graph, relative).findings[0].fingerprint(display_path(relative))
    b = audit_graph(graph, absolute).findings[0].fingerprint(display_path(absolute))
    assert a == b


def test_every_rule_is_documented():
    for code, rule in RULES.items():
        assert code.startswith("IA") and len(code) == 5
        assert rule.summary and len(rule.explanation) > 80


def test_law_stats_kurtosis_reaches_the_rules():
    stats = law_stats("w", (10, 10), 0.5, kurtosis=1.8)
    assert stats.second_moment == pytest.approx(0.25) and stats.kurtosis == 1.8


def _blocks_by_ancestor_sets(graph) -> list:
    """The definition of a residual join, by whole ancestor sets (quadratic in depth)."""
    from initaudit.residual import _block

    order = {layer.name: i for i, layer in enumerate(graph)}
    blocks = []
    for layer in graph:
        if layer.kind is not Kind.ADD or len(layer.inputs) != 2:
            continue
        reach = [graph.ancestors(name) | {name} for name in layer.inputs]
        common = reach[0] & reach[1]
        if not common:
            continue
        fork = max(common, key=order.__getitem__)
        paths = [sorted((r - graph.ancestors(fork)) - {fork}, key=order.__getitem__) for r in reach]
        weights = [sum(graph[n].is_linear for n in path) for path in paths]
        b = 0 if (weights[0], len(paths[0])) > (weights[1], len(paths[1])) else 1
        blocks.append(_block(graph, layer, fork, layer.inputs[1 - b], paths[b]))
    return blocks


def test_residual_blocks_match_the_ancestor_set_definition():
    rng = random.Random(11)
    kinds = [Kind.DENSE, Kind.ACTIVATION, Kind.ADD, Kind.ADD, Kind.SCALE, Kind.NORM]
    for trial in range(600):
        layers = [Layer("in0", Kind.INPUT, "Input", width=4), Layer("in1", Kind.INPUT, "Input", width=4)]
        for i in range(rng.randint(2, 30)):
            kind = rng.choice(kinds)
            names = [layer.name for layer in layers]
            near = names[-rng.randint(1, len(names)) :]
            inputs = [rng.choice(near) for _ in range(2 if kind is Kind.ADD else rng.choice([1, 1, 2]))]
            if kind is not Kind.ADD and rng.random() < 0.1:
                inputs.append("not-a-layer")  # ancestors() skips names the graph does not hold
            layers.append(Layer(f"l{i}", kind, "Op", inputs, width=4, fan_in=4))
        if trial % 5 == 0:
            rng.shuffle(layers)  # not topological: the ancestor-set fallback
        graph = LayerGraph(layers, inputs=["in0"], outputs=[layers[-1].name])
        assert find_residual_blocks(graph) == _blocks_by_ancestor_sets(graph)
    graph = residual_mlp(32, 20, eta=0.5, stem=[16, 16])
    assert find_residual_blocks(graph) == _blocks_by_ancestor_sets(graph)


def test_residual_blocks_cost_is_linear_in_depth(monkeypatch):
    # The walk back from each join visits its branch and stops at the fork: the layers it
    # visits per block do not grow with the number of blocks before it.
    import initaudit.residual as residual

    visits = 0
    pop = residual.heapq.heappop

    def counting(heap: list) -> object:
        nonlocal visits
        visits += 1
        return pop(heap)

    monkeypatch.setattr(residual.heapq, "heappop", counting)
    per_block = []
    for blocks in (25, 400):
        visits = 0
        assert len(find_residual_blocks(residual_mlp(8, blocks))) == blocks
        per_block.append(visits / blocks)
    assert per_block[1] <= per_block[0] + 1e-9


def test_folded_batchnorm_caps_length_errors_at_warning():
    """A graph whose BatchNorm looks folded (IA902) is the inference graph: the same unscaled
    residual stream that is an IA301 error elsewhere is a warning there, saying why, and the
    verdict and the default gate follow."""
    graph = residual_mlp(64, 50, eta=1.0)
    plain = audit_graph(graph)
    (error,) = [f for f in plain.findings if f.code == "IA301"]
    assert error.severity is Severity.ERROR and plain.fails(Severity.ERROR)
    graph.meta["bn_folded"] = True
    folded = audit_graph(graph)
    (capped,) = [f for f in folded.findings if f.code == "IA301"]
    assert capped.severity is Severity.WARNING and "IA902" in capped.message
    assert capped.evidence == {**error.evidence, "capped_by": "IA902"}
    assert "IA902" in codes(folded) and folded.verdict("fm1") == "warning"
    assert not folded.fails(Severity.ERROR) and folded.fails(Severity.WARNING)
