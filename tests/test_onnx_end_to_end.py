"""Small ONNX graphs built with onnx.helper, audited end to end.

The expected mean length is an independent mean-field recursion, q_j = sigma_j^2 E[phi(z)^2]
with z ~ N(0, q_{j-1}), integrated here on a fine trapezoid grid (error ~1e-9, kinks included)
rather than with the engine's Gauss–Legendre panels.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from initaudit.audit import audit_file
from initaudit.graph import Kind

WIDTH, DEPTH = 64, 4
GRID = np.linspace(-14.0, 14.0, 280_001)
DENSITY = np.exp(-GRID * GRID / 2) / math.sqrt(2 * math.pi) * (GRID[1] - GRID[0])


def gauss_mean(values: np.ndarray) -> float:
    return float(np.sum(DENSITY * values))


def _erf(x):
    return np.vectorize(math.erf)(x)


SELU_A, SELU_G = 1.6732632423543772, 1.0507009873554805
PHI = {
    "Relu": (lambda x: np.maximum(x, 0), {}),
    "LeakyRelu": (lambda x: np.where(x > 0, x, 0.2 * x), {"alpha": 0.2}),
    "Elu": (lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))), {}),
    "Selu": (lambda x: SELU_G * np.where(x > 0, x, SELU_A * np.expm1(np.minimum(x, 0))), {}),
    "Tanh": (np.tanh, {}),
    "Sigmoid": (lambda x: 1 / (1 + np.exp(-x)), {}),
    "Softplus": (lambda x: np.logaddexp(0, x), {}),
    "Gelu": (lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))), {}),
}


def build(
    path, op: str, gains: list[float], opset: int = 20, scale_branch: float | None = None
) -> list[float]:
    rng = np.random.default_rng(1)
    nodes, inits, actual = [], [], []
    x = "x"
    for j, gain in enumerate(gains):
        w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * math.sqrt(gain / WIDTH)
        actual.append(float(np.mean(w.astype(np.float64) ** 2)) * WIDTH)
        inits += [
            numpy_helper.from_array(w, f"fc{j}.weight"),
            numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"fc{j}.bias"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"fc{j}.weight"], [f"mm{j}"], name=f"fc{j}"),
            helper.make_node("Add", [f"mm{j}", f"fc{j}.bias"], [f"z{j}"], name=f"fc{j}.add"),
        ]
        if op == "PRelu":
            inits.append(numpy_helper.from_array(np.full(WIDTH, 0.2, np.float32), f"slope{j}"))
            nodes.append(helper.make_node("PRelu", [f"z{j}", f"slope{j}"], [f"a{j}"], name=f"act{j}"))
        else:
            nodes.append(helper.make_node(op, [f"z{j}"], [f"a{j}"], name=f"act{j}", **PHI[op][1]))
        x = f"a{j}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return actual


def mean_field(phi, gains: list[float]) -> float:
    m = 1.0
    for gain in gains:
        q = gain * m
        m = gauss_mean(phi(math.sqrt(q) * GRID) ** 2)
    return m


@pytest.mark.parametrize("op", sorted(PHI))
def test_activation_stack_matches_mean_field(tmp_path, op):
    path = tmp_path / f"{op}.onnx"
    actual = build(path, op, [2.0] * DEPTH)
    result = audit_file(path)
    acts = [layer for layer in result.graph if layer.kind is Kind.ACTIVATION]
    assert len(acts) == DEPTH
    assert result.prediction.summary.mean_ratio == pytest.approx(mean_field(PHI[op][0], actual), rel=1e-5)


def test_prelu_reads_its_slope(tmp_path):
    path = tmp_path / "prelu.onnx"
    actual = build(path, "PRelu", [2.0] * DEPTH)
    expected = mean_field(PHI["LeakyRelu"][0], actual)
    assert audit_file(path).prediction.summary.mean_ratio == pytest.approx(expected, rel=1e-5)


def test_right_init_for_tanh_is_the_quadrature_gain(tmp_path):
    # Weights at 2.536/fan-in are right for tanh (1/E[tanh(z)^2]): no IA103; at 1/fan-in they are 2.5x off.
    right = 1 / gauss_mean(np.tanh(GRID) ** 2)
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    build(good, "Tanh", [right] * DEPTH)
    build(bad, "Tanh", [1.0] * DEPTH)
    assert "IA103" not in {f.code for f in audit_file(good).findings}
    assert len([f for f in audit_file(bad).findings if f.code == "IA103"]) == DEPTH
