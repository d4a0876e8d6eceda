"""The fix plan: factors from the theory, checked against independent computations."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from initaudit.audit import audit_file, audit_graph
from initaudit.errors import UsageError
from initaudit.fix.plan import REDRAW, ZERO, apply_to_graph, build_plan, fm2_remedy
from initaudit.rules import Severity
from initaudit.synthetic import plain_mlp

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def _build_module():
    spec = importlib.util.spec_from_file_location("sample_build", SAMPLES / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xavier_relu_weights_get_he_variance():
    path = SAMPLES / "deep_xavier_mlp.onnx"
    plan = build_plan(audit_file(path))
    weights = _initializers(path)
    assert [c.tensor for c in plan.changes] == [f"fc{j}.weight" for j in range(1, 21)]
    for change in plan.changes:
        w = weights[change.tensor]
        # He: E[w^2] x fan-in = 2 after the multiplication (fan-in 128: W is stored (in, out)).
        expected = math.sqrt(2.0 / (w.shape[0] * np.mean(w * w)))
        assert change.factor == pytest.approx(expected, rel=1e-6)
        assert change.code == "IA103"
        assert change.new_std == pytest.approx(w.std() * expected, rel=1e-6)
    s = plan.predicted.prediction.summary
    assert s.mean_ratio == pytest.approx(1.0, rel=1e-6)  # (sigma^2/2)^L with sigma^2 = 2 exactly
    assert plan.predicted.verdict("fm1") == "pass"
    assert "head.weight" not in plan.by_tensor()  # feeds the output, not an activation


def test_tanh_weights_get_the_quadrature_gain():
    path = SAMPLES / "deep_tanh_xavier_mlp.onnx"
    plan = build_plan(audit_file(path))
    weights = _initializers(path)
    # E[tanh(z)^2], z ~ N(0, 1), by probabilists' Gauss-Hermite (independent of the package's rule).
    z, wq = np.polynomial.hermite_e.hermegauss(120)
    e_tanh2 = float(np.sum(wq * np.tanh(z) ** 2) / np.sqrt(2 * np.pi))
    assert e_tanh2 == pytest.approx(0.394294, abs=1e-6)  # THEORY.md section 2
    assert len(plan.changes) == 30
    for change in plan.changes:
        w = weights[change.tensor] * change.factor
        assert np.mean(w * w) * w.shape[0] == pytest.approx(1 / e_tanh2, rel=1e-6)
    assert plan.predicted.verdict("fm1") == "pass"


def test_pytorch_default_rescales_weights_and_zeroes_dominating_biases():
    result = audit_file(SAMPLES / "deep_pytorch_default_mlp.onnx")
    plan = build_plan(result)
    weights = [c for c in plan.changes if c.tensor.endswith(".weight")]
    biases = [c for c in plan.changes if c.tensor.endswith(".bias")]
    assert len(weights) == 12
    # Uniform(-1/sqrt(n), 1/sqrt(n)) has variance 1/(3n): 6x below He, a factor ~sqrt(6) in std.
    assert np.median([c.factor for c in weights]) == pytest.approx(math.sqrt(6), rel=0.02)
    ia104 = next(f for f in result.findings if f.code == "IA104")
    assert len(biases) == ia104.evidence["layers"]
    assert all(c.action == ZERO and c.factor == 0 and c.code == "IA104" for c in biases)
    assert any("zeroed" in note for note in plan.notes)
    assert plan.predicted.verdict("fm1") == "pass"
    assert not plan.predicted.fails(Severity.ERROR)


def test_residual_branches_scaled_to_one_over_l():
    result = audit_file(SAMPLES / "residual_mlp_unscaled.onnx")
    plan = build_plan(result)
    blocks = len(result.prediction.blocks)
    assert blocks == 50
    assert all(c.code == "IA301" and c.tensor.endswith("fc2.weight") for c in plan.changes)
    # Each linear-terminated He branch now adds exactly 1/L: factor 1 + g eta^2 = 1 + 1/50.
    for block in plan.predicted.prediction.blocks:
        assert block.factor == pytest.approx(1 + 1 / blocks, rel=1e-6)
    # The stream is measured from its entry (the stem's output): (1 + 1/L)^L < e.
    assert plan.predicted.prediction.summary.mean_ratio == pytest.approx((1 + 1 / blocks) ** blocks, rel=1e-6)
    assert plan.predicted.verdict("fm1") == "pass"


def test_relu_terminated_branches_bound_the_drift():
    from initaudit.synthetic import residual_mlp

    result = audit_graph(residual_mlp(64, 50, terminal="relu"))
    assert {"IA301", "IA303"} <= {f.code for f in result.findings}
    plan = build_plan(result)
    assert len(plan.changes) == 50
    # Each branch's eta shrinks to ~1/L (contribution 1/L^2): THEORY.md's drift exp(Theta(sum eta))
    # then stays bounded, and the stream ends well below e.
    for pred in result.prediction.blocks:
        change = plan.by_tensor()[pred.last_weight]
        assert change.factor == pytest.approx(math.sqrt(1 / 50**2 / (pred.factor - 1)), rel=1e-9)
    assert plan.predicted.verdict("fm1") == "pass"
    assert plan.predicted.prediction.summary.mean_ratio < math.e


def test_residual_zero_mode_zeroes_last_weights_not_gates(tmp_path):
    build = _build_module()
    path = tmp_path / "gated.onnx"
    path.write_bytes(build._residual_mlp("gated", 11, 1.0, "doc", "x").SerializeToString())
    result = audit_file(path)
    assert any(f.code == "IA301" for f in result.findings)
    zero = build_plan(result, residual_scale="zero")
    assert {c.tensor for c in zero.changes} == {f"blocks.{i}.fc2.weight" for i in range(50)}
    assert all(c.action == ZERO for c in zero.changes)
    codes = {f.code for f in zero.predicted.findings}
    assert "IA302" not in codes and "IA502" not in codes and "IA301" not in codes
    # sqrt mode on a gated model scales each block's own gate, not its weights.
    sqrt = build_plan(result)
    assert {c.tensor for c in sqrt.changes} == {f"blocks.{i}.eta" for i in range(50)}
    for change in sqrt.changes:
        assert change.old_std == pytest.approx(1.0)
        assert change.new_std == pytest.approx(change.factor)
    assert sqrt.predicted.verdict("fm1") == "pass"


def test_fm2_cannot_be_fixed_and_names_the_width_and_depth():
    result = audit_file(SAMPLES / "deep_narrow_he_mlp.onnx")
    plan = build_plan(result)
    assert plan.changes == []
    assert plan.predicted.fails(Severity.ERROR)
    note = next(n for n in plan.notes if "IA201" in n)
    assert "cannot be fixed by weights" in note
    remedy = plan.fm2
    assert remedy is not None and remedy["depth"] == 50 and remedy["width"] == 16
    # THEORY.md section 3: Var ln M_L ~ L (5/n + 18.5/n^2), judged as Var/5 against beta_error = 1
    # (and 0.3 for a warning): L (1/n + 3.7/n^2) <= t, a quadratic in n.
    for key, t in (("width_error", 1.0), ("width_warning", 0.3)):
        closed = math.ceil((50 + math.sqrt(50**2 + 4 * t * 3.7 * 50)) / (2 * t))
        assert abs(remedy[key] - closed) <= 1, (key, remedy[key], closed)
    for key, t in (("depth_error", 1.0), ("depth_warning", 0.3)):
        closed = math.floor(t / (1 / 16 + 3.7 / 256))
        assert abs(remedy[key] - closed) <= 1, (key, remedy[key], closed)


def test_fm2_remedy_is_the_smallest_passing_width():
    result = audit_file(SAMPLES / "deep_narrow_he_mlp.onnx")
    remedy = fm2_remedy(result)
    n = remedy["width_error"]

    def fails(width: int, depth: int) -> bool:
        audit = audit_graph(plain_mlp(width, [width] * depth))
        return any(f.code == "IA201" and f.severity is Severity.ERROR for f in audit.findings)

    assert not fails(n, 50) and fails(n - 1, 50)
    d = remedy["depth_error"]
    assert not fails(16, d) and fails(16, d + 1)


def test_redraw_plans_fresh_draws_with_the_right_std():
    plan = build_plan(audit_file(SAMPLES / "deep_xavier_mlp.onnx"), redraw=True, seed=5)
    assert all(c.action == REDRAW and math.isnan(c.factor) for c in plan.changes)
    assert all(c.draw_std == pytest.approx(math.sqrt(2 / 128)) for c in plan.changes)
    assert plan.predicted.prediction.summary.mean_ratio == pytest.approx(1.0, rel=1e-9)


def test_weights_only_graph_needs_the_architecture(tmp_path):
    import json
    import struct

    header = {"fc.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + np.ones(16, np.float32).tobytes())
    with pytest.raises(UsageError, match="--model"):
        build_plan(audit_file(path))


def test_unstored_tensors_are_noted_not_changed():
    result = audit_file(SAMPLES / "deep_xavier_mlp.onnx")
    plan = build_plan(result, editable=lambda name: name != "fc3.weight")
    assert "fc3.weight" not in plan.by_tensor() and len(plan.changes) == 19
    assert any("fc3.weight" in note and "not stored" in note for note in plan.notes)


def test_apply_to_graph_leaves_the_original_alone():
    result = audit_file(SAMPLES / "deep_xavier_mlp.onnx")
    before = result.graph["/fc1/MatMul"].weight
    plan = build_plan(result)
    changed = apply_to_graph(result.graph, plan.changes)
    assert result.graph["/fc1/MatMul"].weight is before
    factor = plan.by_tensor()["fc1.weight"].factor
    assert changed["/fc1/MatMul"].weight.second_moment == pytest.approx(before.second_moment * factor**2)
    assert changed["/fc1/MatMul"].weight.kurtosis == before.kurtosis


def test_nothing_to_fix_on_a_passing_model():
    plan = build_plan(audit_file(SAMPLES / "wide_he_mlp.onnx"))
    assert plan.changes == [] and any("nothing to change" in n for n in plan.notes)
