"""Each shipped sample model's verdicts and key numbers.

Key numbers are recomputed here from the file's own initializers with numpy (the product
of each layer's actual gain sigma_j^2 / 2), or from THEORY.md's closed forms where they do
not depend on the sampled weights (beta, Var ln M_L).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from initaudit.audit import audit_file
from initaudit.theory.special import log_relu_average

EXPECTED = {
    "wide_he_mlp.onnx": ("pass", "pass"),
    "deep_xavier_mlp.onnx": ("error", "pass"),
    "deep_pytorch_default_mlp.onnx": ("error", "pass"),
    "deep_narrow_he_mlp.onnx": ("pass", "error"),
    "residual_mlp_unscaled.onnx": ("error", "pass"),
    "residual_mlp_scaled.onnx": ("pass", "pass"),
    "small_he_cnn_bn.onnx": ("pass", "pass"),
    "deep_tanh_xavier_mlp.onnx": ("error", "pass"),
}


@pytest.mark.parametrize(("name", "verdicts"), sorted(EXPECTED.items()))
def test_verdicts(samples, name, verdicts):
    result = audit_file(samples / name)
    assert (result.verdict("fm1"), result.verdict("fm2")) == verdicts


def hidden_gains(path) -> list[float]:
    """sigma_j^2 = fan_in * E[w^2] for each MatMul weight feeding a ReLU, in file order."""
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gains = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            w = weights[node.input[1]].astype(np.float64)
            gains.append(w.shape[0] * float(np.mean(w * w)))
    return gains[:-1]  # the last MatMul is the linear head


def test_xavier_mean_ratio_is_the_product_of_actual_gains(samples):
    path = samples / "deep_xavier_mlp.onnx"
    expected = math.prod(g / 2 for g in hidden_gains(path))
    s = audit_file(path).prediction.summary
    assert s.mean_ratio == pytest.approx(expected, rel=1e-6)
    assert s.mean_ratio == pytest.approx(2.0**-20, rel=0.5)  # and near the law's value
    assert s.beta == pytest.approx(20 / 128)


def test_he_mean_ratio_is_the_product_of_actual_gains(samples):
    for name in ("wide_he_mlp.onnx", "deep_narrow_he_mlp.onnx"):
        path = samples / name
        expected = math.prod(g / 2 for g in hidden_gains(path))
        assert audit_file(path).prediction.summary.mean_ratio == pytest.approx(expected, rel=1e-6)


def test_narrow_net_fm2_numbers(samples):
    s = audit_file(samples / "deep_narrow_he_mlp.onnx").prediction.summary
    assert s.beta == pytest.approx(50 / 16)
    _, var, _ = log_relu_average(16)
    assert s.log_var == pytest.approx(50 * var, rel=1e-6)  # independent of the weights' scale
    assert s.median < 0.01 < s.mean_ratio


def test_fm2_finding_gives_width_and_depth(samples):
    (finding,) = [f for f in audit_file(samples / "deep_narrow_he_mlp.onnx").findings if f.code == "IA201"]
    assert finding.evidence["width_needed"] >= 50 / 0.3
    assert finding.evidence["depth_allowed"] <= 0.3 * 16 + 1
    assert "widen the hidden layers to at least" in finding.fix


def test_residual_samples(samples):
    unscaled = audit_file(samples / "residual_mlp_unscaled.onnx")
    scaled = audit_file(samples / "residual_mlp_scaled.onnx")
    assert len(unscaled.prediction.blocks) == len(scaled.prediction.blocks) == 50
    (finding,) = [f for f in unscaled.findings if f.code == "IA301"]
    assert "scale each of the 50 residual branches by" in finding.fix
    assert finding.evidence["target_eta"] == pytest.approx(50**-0.5, rel=0.05)
    gains = [b.gain for b in scaled.prediction.blocks]
    expected = math.prod(1 + g / 50 for g in gains)  # prod(1 + g eta^2) with the actual gains
    stem = scaled.prediction.layers[1].mean  # the stem layer's actual gain
    assert scaled.prediction.summary.mean_ratio == pytest.approx(stem * expected, rel=1e-6)


def test_pytorch_default_flags_bias_and_scale(samples):
    result = audit_file(samples / "deep_pytorch_default_mlp.onnx")
    codes = {f.code for f in result.findings}
    assert {"IA101", "IA103", "IA104"} <= codes
    factors = [f.evidence["multiplier"] for f in result.findings if f.code == "IA103"]
    assert np.median(factors) == pytest.approx(math.sqrt(6), rel=0.1)  # variance 1/(3 fan_in) vs 2/fan_in
    assert result.prediction.summary.mean_ratio == pytest.approx(1 / (5 * 128), rel=0.3)  # the bias floor


def test_cnn_with_batchnorm_resets(samples):
    result = audit_file(samples / "small_he_cnn_bn.onnx")
    assert result.prediction.summary.normalized
    assert not [f for f in result.findings if f.severity >= 1]
