"""ONNX attention: ``MatMul(softmax(q k^T / s), v)`` passes its values through, as the torch
frontend reads scaled_dot_product_attention; the query-key path ends in that one layer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from initaudit.audit import audit_file
from initaudit.frontends.onnx_model import load_onnx
from initaudit.graph import Kind

RNG = np.random.default_rng(7)
D, T = 16, 8


def _w(name: str, *shape: int, std: float) -> TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * std).astype(np.float32), name)


def _c(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _block(tmp_path: Path, name: str, *, attention: bool, einsum: bool = False) -> Path:
    """x -> q, k, v -> [softmax(q k^T * scale + mask) v | v] -> o -> + x.

    The twin (``attention=False``) replaces the attention by identity on v; weights are the
    same draws (the generator is reseeded) with deliberately unequal q, k, v scales."""
    rng_state = RNG.bit_generator.state
    inits = [
        _w("wq", D, D, std=3.0 / math.sqrt(D)),  # q and k far larger than v: a q-path reading shows
        _w("wk", D, D, std=2.0 / math.sqrt(D)),
        _w("wv", D, D, std=0.5 / math.sqrt(D)),
        _w("wo", D, D, std=1.0 / math.sqrt(D)),
        _c("scale", 1.0 / math.sqrt(D)),
        numpy_helper.from_array(np.triu(np.full((T, T), -1e4, np.float32), 1), "mask"),
    ]
    RNG.bit_generator.state = rng_state
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
    ]
    if attention:
        if einsum:
            nodes.append(helper.make_node("Einsum", ["q", "k"], ["s"], name="qk", equation="btd,bsd->bts"))
        else:
            nodes += [
                helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
                helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
            ]
        nodes += [
            helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale_scores"),
            helper.make_node("Add", ["ss", "mask"], ["sm"], name="mask_add"),
            helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
            helper.make_node("Cast", ["p"], ["pc"], name="probs_cast", to=TensorProto.FLOAT),
        ]
        if einsum:
            nodes.append(helper.make_node("Einsum", ["v", "pc"], ["a"], name="attn", equation="bsd,bts->btd"))
        else:
            nodes.append(helper.make_node("MatMul", ["pc", "v"], ["a"], name="attn"))
    else:
        nodes.append(helper.make_node("Identity", ["v"], ["a"], name="attn"))
    nodes += [
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    shape = [1, T, D]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("einsum", [False, True], ids=["matmul", "einsum"])
def test_attention_passes_its_values_through(tmp_path: Path, einsum: bool) -> None:
    path = _block(tmp_path, "attn", attention=True, einsum=einsum)
    graph = load_onnx(path)
    attn = graph["attn"]
    assert attn.kind is Kind.UNMODELED and attn.inputs == ["v_proj"]
    assert "values" in attn.attrs["reason"]
    # The scores' nodes are folded into the attention layer: nothing else is unmodeled, and the
    # query-key path leads nowhere.
    assert [layer.name for layer in graph if layer.kind is Kind.UNMODELED] == ["attn"]
    assert {"qk", "softmax", "mask_add", "scale_scores"}.isdisjoint(layer.name for layer in graph)
    assert graph["o_proj"].inputs == ["attn"]

    result, twin = audit_file(path), audit_file(_block(tmp_path, "twin", attention=False))
    # Same weights: an identity on v gives the same prediction at every layer both graphs share.
    shared = {p.name: p for p in twin.prediction.layers}
    for name in ("v_proj", "o_proj", "residual"):
        a, b = next(p for p in result.prediction.layers if p.name == name), shared[name]
        for key in ("mean", "log_mean", "log_var", "spread"):
            assert math.isclose(getattr(a, key), getattr(b, key), rel_tol=1e-12, abs_tol=1e-12), (name, key)
    res = next(p for p in result.prediction.layers if p.name == "residual")
    # Without the values pass-through the branch would follow q: x's unit length plus
    # |v W_o|^2 = D E[w_v^2] * D E[w_o^2] (the drawn weights' second moments; about 0.25).
    wv, wo = graph["v_proj"].weight, graph["o_proj"].weight
    assert wv is not None and wo is not None
    assert res.mean == pytest.approx(1.0 + D * wv.second_moment * D * wo.second_moment, rel=1e-9)
    ia901 = [f for f in result.findings if f.code == "IA901"]
    assert len(ia901) == 1 and ia901[0].location == "attn"


def test_matmul_of_two_signals_without_softmax_stays_a_two_input_passthrough(tmp_path: Path) -> None:
    """A dynamic weight (no Softmax on either side) is not attention: the old reading stands."""
    inits = [_w("wa", D, D, std=1.0), _w("wb", D, D, std=1.0)]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
        helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
        helper.make_node("Transpose", ["b"], ["bt"], name="bt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "bt"], ["y"], name="gram"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, T])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "gram.onnx"))
    layer = load_onnx(tmp_path / "gram.onnx")["gram"]
    assert layer.kind is Kind.UNMODELED and layer.inputs == ["a", "bt"]
    assert "values" not in layer.attrs["reason"]
