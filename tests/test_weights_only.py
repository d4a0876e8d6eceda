"""Weights-only audits: a state dict with no architecture, checked tensor by tensor (IA105).

Synthetic state dicts as numpy arrays; no torch. Tolerances come from the sampling spread of
a std estimated from n entries: rel. SE of the sample std = sqrt((kurtosis - 1) / (4 n)).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import re
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
from rich.console import Console

from initaudit.audit import audit_graph
from initaudit.frontends.weights_only import WEIGHTS_ONLY, weights_only_graph
from initaudit.graph import Kind
from initaudit.report.console import WEIGHTS_ONLY_LABEL, render_console
from initaudit.report.json_report import render_json
from initaudit.rules import RULES, Severity, scale_rows
from initaudit.synthetic import plain_mlp
from initaudit.theory.propagate import predict

SEED = 1234


def he(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = math.prod(shape[1:])
    return (rng.standard_normal(shape) * math.sqrt(2 / fan_in)).astype(np.float32)


def pytorch_default(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in)."""
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def mlp_state(init, widths: list[int], bias: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    state = {}
    for j, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        state[f"layers.{j}.weight"] = init(rng, n_out, n_in)
        if bias:
            bound = 1 / math.sqrt(n_in)
            state[f"layers.{j}.bias"] = rng.uniform(-bound, bound, n_out).astype(np.float32)
    return state


def audit(state: dict[str, np.ndarray], sort: bool = False):
    items = sorted(state.items()) if sort else list(state.items())
    graph = weights_only_graph(items, source="model.safetensors", fmt="safetensors")
    return graph, audit_graph(graph, "model.safetensors")


def std_tolerance(count: int, kurtosis: float, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt((kurtosis - 1) / (4 * count))


def test_he_mlp_passes_and_gets_no_verdict():
    graph, result = audit(mlp_state(he, [512, 512, 512, 512, 10]))
    assert graph.meta["audit"] == WEIGHTS_ONLY and not graph.inputs and not graph.outputs
    assert all(not layer.inputs for layer in graph)  # unconnected: no architecture
    assert [f for f in result.findings if f.severity > Severity.INFO] == []
    (summary,) = [f for f in result.findings if f.code == "IA105"]
    assert summary.severity is Severity.INFO
    assert summary.evidence["he"] == 4 and summary.evidence["off"] == 0
    assert result.verdict("fm1") == result.verdict("fm2") == "not computed"
    assert "--model" in (result.not_computed_reason or "")
    assert not result.fails(Severity.WARNING)


def test_pytorch_default_is_flagged_with_factor_sqrt6():
    widths = [256, 256, 256, 1024, 256]  # two fan-ins, one common factor
    graph, result = audit(mlp_state(pytorch_default, widths))
    warnings = [f for f in result.findings if f.severity is Severity.WARNING]
    # One finding for the four tensors: they share scheme and factor (see IA105's explanation).
    (finding,) = warnings
    assert finding.code == "IA105"
    assert finding.evidence["tensors"] == [f"layers.{j}.weight" for j in range(4)]
    assert finding.evidence["scheme"] == "pytorch_default"
    assert "weights-only audit (no architecture)" in finding.message
    assert "fan-in 256..1024" in finding.message
    # Every tensor's own factor to He is sqrt(6) within its sampling spread.
    for row in scale_rows(graph):
        tol = std_tolerance(row.weight.count, 1.8)
        assert row.status == "off"
        assert row.to_he == pytest.approx(math.sqrt(6), rel=tol)
        assert row.vs_he == pytest.approx(1 / 6, rel=2 * tol)
    tol = std_tolerance(min(row.weight.count for row in scale_rows(graph)), 1.8)
    assert finding.evidence["multiplier"] == pytest.approx(math.sqrt(6), rel=tol)
    assert finding.evidence["multiplier_lecun"] == pytest.approx(math.sqrt(3), rel=tol)
    assert "by ~2.45 for He" in finding.fix
    assert result.fails(Severity.WARNING) and not result.fails(Severity.ERROR)


def test_single_tensor_message_names_std_and_fan_in():
    rng = np.random.default_rng(SEED)
    state = {"head.weight": pytorch_default(rng, 64, 300), "proj.weight": he(rng, 300, 300)}
    _, result = audit(state)
    (finding,) = [f for f in result.findings if f.severity is Severity.WARNING]
    assert finding.location == "head.weight" and finding.evidence["fan_in"] == 300
    std = finding.evidence["std"]
    assert std == pytest.approx(1 / math.sqrt(900), rel=std_tolerance(64 * 300, 1.8))
    assert "fan-in 300" in finding.message and "`head.weight`" in finding.message
    below = re.search(r"variance ([\d.]+)/fan-in, ([\d.]+)x below He", finding.message)
    assert below is not None
    assert float(below[1]) == pytest.approx(1 / 3, rel=2 * std_tolerance(64 * 300, 1.8) + 0.005)  # 3 digits
    assert float(below[2]) == pytest.approx(6, rel=2 * std_tolerance(64 * 300, 1.8) + 0.005)


def test_other_rules_stay_silent_and_prediction_is_empty():
    graph, result = audit(mlp_state(pytorch_default, [128] * 12))
    assert {f.code for f in result.findings} <= {"IA105", "IA903"}  # no FM1/FM2/bias verdicts
    prediction = predict(graph)
    assert prediction.layers == [] and prediction.blocks == [] and prediction.states == {}
    assert math.isnan(prediction.summary.mean_ratio) and prediction.summary.depth == 0
    # The same init in a graph with an architecture is judged by FM1, not by IA105.
    full = audit_graph(plain_mlp(128, [128] * 12, init="pytorch"))
    assert "IA105" not in {f.code for f in full.findings} and full.verdict("fm1") == "error"


def test_lecun_and_xavier_square_pass_but_wide_xavier_does_not():
    rng = np.random.default_rng(SEED)
    square = (rng.standard_normal((400, 400)) / math.sqrt(400)).astype(np.float32)  # LeCun = Xavier
    lecun = (rng.standard_normal((200, 400)) / math.sqrt(400)).astype(np.float32)
    # Xavier for 512 -> 2048: variance 2/(512 + 2048) = 0.4/fan-in, 2.5x below LeCun.
    wide = (rng.standard_normal((2048, 512)) * math.sqrt(2 / 2560)).astype(np.float32)
    graph, result = audit({"a.weight": lecun, "b.weight": wide, "c.weight": square})
    status = {row.weight.name: (row.status, row.scheme) for row in scale_rows(graph)}
    assert status == {
        "a.weight": ("lecun", "lecun_normal"),
        "b.weight": ("off", "xavier_normal"),
        "c.weight": ("lecun", "xavier_normal"),
    }
    (finding,) = [f for f in result.findings if f.severity is Severity.WARNING]
    assert finding.location == "b.weight"


def test_conv_fan_in_layout():
    rng = np.random.default_rng(SEED)
    state = {
        "conv2d.weight": he(rng, 64, 8, 3, 3),  # (out, in, kh, kw): fan-in 8 * 9
        "conv1d.weight": he(rng, 16, 4, 5),
        "depthwise.weight": he(rng, 32, 1, 3, 3),  # groups = 32: in/groups = 1
        "conv3d.weight": he(rng, 8, 2, 3, 3, 3),
        "fc.weight": he(rng, 10, 70),
    }
    graph, result = audit(state)
    layers = {layer.weight.name: layer for layer in graph}
    assert {name: layer.fan_in for name, layer in layers.items()} == {
        "conv2d.weight": 72,
        "conv1d.weight": 20,
        "depthwise.weight": 9,
        "conv3d.weight": 54,
        "fc.weight": 70,
    }
    assert layers["conv2d.weight"].kind is Kind.CONV and layers["conv2d.weight"].op == "conv2d"
    assert layers["conv2d.weight"].fan_out == 64 * 9 and layers["conv2d.weight"].width == 64
    assert layers["fc.weight"].kind is Kind.DENSE and graph["fc"].weight is layers["fc.weight"].weight
    assert all(row.status == "he" for row in scale_rows(graph))
    assert not [f for f in result.findings if f.severity > Severity.INFO]


def test_gpt2_conv1d_weights_are_read_in_out():
    rng = np.random.default_rng(SEED)
    state = {
        "h.0.attn.c_attn.weight": he(rng, 384, 128).T.copy(),  # Conv1D: (in, out)
        "h.0.attn.c_attn.bias": np.zeros(384, np.float32),
        "lm_head.weight": he(rng, 1000, 128),  # nn.Linear: (out, in)
    }
    graph, result = audit(state)
    conv1d, head = graph.layers
    assert [f for f in result.findings if f.severity > Severity.INFO] == []
    assert (conv1d.fan_in, conv1d.width, conv1d.bias is not None) == (128, 384, True)
    assert (head.fan_in, head.width) == (128, 1000)
    assert any("Conv1D" in note for note in graph.notes)
    assert all(row.status == "he" for row in scale_rows(graph))


def test_bias_attaches_even_when_it_comes_first():
    rng = np.random.default_rng(SEED)
    state = {"fc.weight": he(rng, 32, 64), "fc.bias": np.full(32, 0.5, np.float32)}
    for sort in (False, True):  # safetensors sorts keys: "fc.bias" before "fc.weight"
        graph, _ = audit(state, sort=sort)
        (layer,) = graph.layers
        assert layer.bias is not None and layer.bias.name == "fc.bias"
        assert layer.bias.mean == pytest.approx(0.5) and layer.bias.std == pytest.approx(0.0, abs=1e-7)
        assert graph.meta["skipped"] == []


def test_non_weights_are_skipped_with_reasons():
    rng = np.random.default_rng(SEED)
    state = {
        "tok_embeddings.weight": rng.standard_normal((1000, 64)).astype(np.float32),
        "transformer.wte.weight": rng.standard_normal((500, 64)).astype(np.float32),
        "transformer.wpe.weight": rng.standard_normal((128, 64)).astype(np.float32),
        "vit.position_ids": np.arange(128)[None, :],
        "ln.weight": np.ones(64, np.float32),
        "ln.bias": np.zeros(64, np.float32),
        "bn.running_mean": np.zeros(64, np.float32),
        "bn.running_var": np.ones(64, np.float32),
        "bn.num_batches_tracked": np.array(7),
        "cls_token": rng.standard_normal((1, 1, 64)).astype(np.float32),
        "mlp.fc.weight": he(rng, 64, 64),
    }
    graph, result = audit(state)
    assert [layer.weight.name for layer in graph] == ["mlp.fc.weight"]
    reasons = {row["name"]: row["reason"] for row in graph.meta["skipped"]}
    assert set(reasons) == set(state) - {"mlp.fc.weight"}
    for name in ("tok_embeddings.weight", "transformer.wte.weight", "transformer.wpe.weight"):
        assert reasons[name].startswith("embedding")
    assert reasons["vit.position_ids"].startswith("integer")
    assert reasons["bn.num_batches_tracked"].startswith("integer")
    assert reasons["ln.weight"] == reasons["ln.bias"] and "normalization" in reasons["ln.weight"]
    assert reasons["bn.running_mean"] == "normalization running statistic"
    assert "not named like a layer weight" in reasons["cls_token"]
    assert any("10 tensors not checked" in note for note in graph.notes)
    assert [f for f in result.findings if f.severity > Severity.INFO] == []


def test_nan_is_ia501_in_weights_and_in_skipped_tensors():
    rng = np.random.default_rng(SEED)
    bad = he(rng, 64, 64)
    bad[3, 5] = np.nan
    embedding = rng.standard_normal((100, 64)).astype(np.float32)
    embedding[0, 0] = np.inf
    state = {"embed.weight": embedding, "fc1.weight": bad, "fc2.weight": pytorch_default(rng, 64, 64)}
    _, result = audit(state)
    errors = [f for f in result.findings if f.code == "IA501"]
    assert {f.location for f in errors} == {"embed.weight", "fc1.weight"}
    assert all(f.severity is Severity.ERROR for f in errors)
    assert result.verdict("fm1") == "not computed" and result.fails(Severity.ERROR)
    # IA105 judges the finite tensors only.
    (scale,) = [f for f in result.findings if f.code == "IA105" and f.severity is Severity.WARNING]
    assert scale.evidence["tensors"] == ["fc2.weight"]


def test_all_zero_weight_is_reported_but_not_as_an_error():
    rng = np.random.default_rng(SEED)
    _, result = audit({"fc1.weight": he(rng, 32, 32), "head.weight": np.zeros((10, 32), np.float32)})
    (zero,) = [f for f in result.findings if f.code == "IA502"]
    # Without the architecture a deliberately zeroed head (Fixup, SkipInit) cannot be told apart.
    assert zero.location == "head.weight" and zero.severity is Severity.WARNING
    assert "IA105" not in {f.code for f in result.findings if f.severity > Severity.INFO}


def test_tensors_are_read_one_at_a_time():
    rng = np.random.default_rng(SEED)
    refs: list[weakref.ref] = []
    alive_when_reading: list[int] = []

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for j in range(5):
            gc.collect()
            alive_when_reading.append(sum(ref() is not None for ref in refs))
            array = he(rng, 128, 128)
            refs.append(weakref.ref(array))
            yield f"l{j}.weight", array
            del array

    graph = weights_only_graph(tensors(), source="x", fmt="safetensors")
    gc.collect()
    assert len(graph) == 5
    assert alive_when_reading == [0] * 5  # the previous tensor is gone before the next is read
    assert all(ref() is None for ref in refs)  # the graph keeps statistics, not arrays


def test_half_precision_tensors():
    rng = np.random.default_rng(SEED)
    graph, _ = audit({"fc.weight": pytorch_default(rng, 256, 256).astype(np.float16)})
    (row,) = scale_rows(graph)
    assert row.weight.dtype == "float16" and row.status == "off"
    assert row.to_he == pytest.approx(math.sqrt(6), rel=std_tolerance(256 * 256, 1.8) + 1e-3)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    graph, _ = audit({"fc.weight": he(rng, 256, 256).astype(ml_dtypes.bfloat16)})
    (row,) = scale_rows(graph)
    assert row.status == "he" and row.gain == pytest.approx(2.0, rel=0.05)


def test_console_report_is_labelled_and_shows_the_tensor_table():
    _, result = audit(mlp_state(pytorch_default, [256, 256, 256]))
    console = Console(width=200, record=True, color_system=None)
    render_console(result, console)
    text = console.export_text()
    assert WEIGHTS_ONLY_LABEL in text
    assert "weights-only audit: no architecture (pass --model" in text
    assert "Weights (weights-only audit)" in text and "var / He" in text
    assert "layers.0.weight" in text and "pytorch_default" in text and "256x256" in text
    assert "FM1/FM2 NOT COMPUTED" in text
    assert "E[M]/M0" not in text  # no layer table: nothing was propagated
    quiet = Console(width=200, record=True, color_system=None)
    render_console(result, quiet, quiet=True)
    assert WEIGHTS_ONLY_LABEL in quiet.export_text().splitlines()[0]


def test_json_marks_the_audit_kind():
    _, result = audit(mlp_state(pytorch_default, [256, 256, 256]))
    full = audit_graph(plain_mlp(64, [64] * 3))
    document = json.loads(render_json([result, full]))
    weights, complete = document["reports"]
    assert weights["audit"] == "weights-only" and complete["audit"] == "full"
    assert weights["verdicts"] == {"fm1": "not computed", "fm2": "not computed"}
    assert "--model" in weights["verdict_reason"] and complete["verdict_reason"] is None
    assert weights["layers"] == [] and complete["tensors"] == [] and complete["skipped"] == []
    row = weights["tensors"][0]
    assert row["name"] == "layers.0.weight" and row["fan_in"] == 256 and row["status"] == "off"
    assert row["bias"] == "layers.0.bias"
    assert row["variance_vs_he"] == pytest.approx(1 / 6, rel=2 * std_tolerance(256 * 256, 1.8))
    assert row["multiplier_he"] == pytest.approx(math.sqrt(6), rel=std_tolerance(256 * 256, 1.8))
    assert weights["summary"]["mean_ratio"] == "nan"  # nothing propagated
    assert "audit" not in weights["meta"] and "skipped" not in weights["meta"]


def test_rule_is_registered_for_weights_only_graphs():
    assert RULES["IA105"].weights_only and RULES["IA105"].severity is Severity.WARNING
    applicable = {code for code, r in RULES.items() if r.weights_only}
    assert applicable == {"IA105", "IA501", "IA502", "IA903"}


def test_empty_file_gets_a_note_not_a_crash():
    graph, result = audit({"ln.weight": np.ones(8, np.float32)})
    assert len(graph) == 0
    assert any("no weight matrix" in note for note in graph.notes)
    assert result.verdict("fm1") == "not computed"
    assert not result.fails(Severity.WARNING)
