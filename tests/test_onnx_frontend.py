"""ONNX frontend: graphs built with onnx.helper in tmp_path, read back as LayerGraphs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from initaudit.errors import LoadError, UsageError
from initaudit.frontends import load_graph, sniff
from initaudit.frontends.onnx_model import load_onnx
from initaudit.graph import Kind

RNG = np.random.default_rng(0)
FLOAT = TensorProto.FLOAT


def _w(name: str, *shape: int, std: float = 1.0) -> TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * std).astype(np.float32), name)


def _c(name: str, value: float | list[float]) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _save(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
    in_shape: list,
    out_shape: list,
    out: str = "y",
    opset: int = 17,
    name: str = "model.onnx",
    ir_version: int | None = None,
) -> Path:
    inputs = [helper.make_tensor_value_info("x", FLOAT, in_shape)]
    if ir_version is not None and ir_version < 4:  # old IR: initializers are graph inputs too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(out, FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    if ir_version is not None:
        model.ir_version = ir_version
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _own(attrs: dict) -> dict:
    """A layer's attributes less the ONNX value it stands for (checked on its own)."""
    return {key: value for key, value in attrs.items() if key != "onnx_value"}


def _mlp(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    w1 = (RNG.standard_normal((64, 32)) * 0.2).astype(np.float32)
    w2 = (RNG.standard_normal((32, 10)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["b2", "h2"], ["y"], name="fc2_bias"),
    ]
    inits = [
        numpy_helper.from_array(w1, "W1"),
        _c("b1", [0.1] * 32),
        numpy_helper.from_array(w2, "W2"),
        _c("b2", [0.0] * 10),
    ]
    return _save(tmp_path, nodes, inits, ["N", 64], ["N", 10]), [w1, w2]


def test_matmul_add_stack_gives_dense_layers(tmp_path: Path) -> None:
    path, (w1, w2) = _mlp(tmp_path)
    graph = load_graph(path)
    assert [layer.kind for layer in graph] == [Kind.INPUT, Kind.DENSE, Kind.ACTIVATION, Kind.DENSE]
    fc1, relu, fc2 = graph["fc1"], graph["relu1"], graph["fc2"]
    assert (fc1.fan_in, fc1.width, fc1.fan_out) == (64, 32, 32)
    assert (fc2.fan_in, fc2.width) == (32, 10)
    assert fc1.weight.name == "W1" and fc1.weight.std == pytest.approx(float(w1.std()), rel=1e-6)
    assert fc2.weight.std == pytest.approx(float(w2.std()), rel=1e-6)
    assert fc1.bias.name == "b1" and fc1.bias.mean == pytest.approx(0.1)
    assert fc2.bias.name == "b2" and fc2.bias.all_zero
    assert fc1.attrs["transposed"] is False and fc1.attrs["fused"] == ["fc1", "fc1_bias"]
    assert fc1.inputs == ["x"] and relu.inputs == ["fc1"] and fc2.inputs == ["relu1"]
    assert relu.activation == "relu" and relu.width == 32
    assert graph.inputs == ["x"] and graph.outputs == ["fc2"]
    assert graph["x"].width == 64 and graph["x"].shape == (1, 64)  # symbolic batch -> 1
    assert fc2.shape == (1, 10)
    assert graph.following_activation("fc1") == "relu"
    # The value each layer stands for: a fused bias Add's output, not the MatMul's.
    assert [layer.attrs["onnx_value"] for layer in graph] == ["x", "a1", "r1", "y"]
    assert graph.meta["opset"] == 17 and graph.meta["producer"] == "tests"
    assert graph.meta["bn_folded"] is False
    assert set(graph.meta["tensor_stats"]) == {"W1", "b1", "W2", "b2"}


def test_gemm_transposed_with_alpha_reports_effective_std(tmp_path: Path) -> None:
    w = (RNG.standard_normal((16, 8)) * 0.3).astype(np.float32)  # (N, K) with transB=1
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)]
    path = _save(tmp_path, nodes, [numpy_helper.from_array(w, "W"), _c("B", [1.0] * 16)], [4, 8], [4, 16])
    fc = load_onnx(path)["fc"]
    assert fc.kind is Kind.DENSE and (fc.fan_in, fc.width, fc.fan_out) == (8, 16, 16)
    assert fc.weight.name == "W"
    assert fc.weight.std == pytest.approx(0.5 * float(w.std()), rel=1e-6)
    assert fc.weight.second_moment == pytest.approx(
        0.25 * float((w.astype(np.float64) ** 2).mean()), rel=1e-6
    )
    assert fc.weight.kurtosis == pytest.approx(
        float((w.astype(np.float64) ** 4).mean() / (w**2).mean() ** 2), rel=1e-4
    )
    assert fc.bias.mean == pytest.approx(2.0)
    assert fc.attrs["weight_scale"] == 0.5 and fc.attrs["transposed"] is True


def test_grouped_conv_fan_in_and_folded_batchnorm(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    path = _save(
        tmp_path, nodes, [_w("W", 16, 2, 3, 3, std=0.1), _c("B", [0.0] * 16)], ["N", 8, 10, 10], ["N", 16]
    )
    graph = load_graph(path)
    conv = graph["conv"]
    assert conv.kind is Kind.CONV
    assert (conv.fan_in, conv.width, conv.fan_out) == (2 * 3 * 3, 16, 16 * 9)
    assert conv.attrs["group"] == 4 and conv.attrs["kernel_shape"] == [3, 3]
    assert conv.attrs["pads"] == [1, 1, 1, 1] and conv.attrs["strides"] == [1, 1]
    assert conv.shape == (1, 16, 10, 10) and graph["x"].width == 8
    gap = graph["gap"]
    assert gap.kind is Kind.POOL and gap.attrs == {"mode": "global_avg", "window": 100, "onnx_value": "p"}
    assert graph["flat"].kind is Kind.RESHAPE and graph["flat"].width == 16
    assert graph.meta["bn_folded"] is True


def test_silu_and_gelu_erf_collapse_to_one_layer_each(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
        helper.make_node("Mul", ["h", "s"], ["a"], name="silu"),
        helper.make_node("MatMul", ["a", "W2"], ["g"], name="fc2"),
        # PyTorch's nn.GELU() export: Div sqrt2 -> Erf -> Add 1 -> Mul x -> Mul 0.5
        helper.make_node("Div", ["g", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        helper.make_node("Mul", ["g", "e1"], ["m"], name="gelu_mul"),
        helper.make_node("Mul", ["m", "half"], ["z"], name="gelu_half"),
        # The other order of the tail: (0.5 * x) * (1 + erf(x * 0.7071)).
        helper.make_node("Mul", ["z", "invsqrt2"], ["d2"], name="g2_mul"),
        helper.make_node("Mul", ["z", "half"], ["hz"], name="g2_half"),
        helper.make_node("Erf", ["d2"], ["e2"], name="g2_erf"),
        helper.make_node("Add", ["one", "e2"], ["e21"], name="g2_add"),
        helper.make_node("Mul", ["hz", "e21"], ["y"], name="g2_out"),
    ]
    inits = [
        _w("W1", 8, 12),
        _w("W2", 12, 6),
        _c("sqrt2", math.sqrt(2)),
        _c("one", 1.0),
        _c("half", 0.5),
        _c("invsqrt2", 1 / math.sqrt(2)),
    ]
    graph = load_onnx(_save(tmp_path, nodes, inits, [2, 8], [2, 6]))
    kinds = [(layer.name, layer.kind, layer.activation) for layer in graph]
    assert kinds == [
        ("x", Kind.INPUT, None),
        ("fc1", Kind.DENSE, None),
        ("silu", Kind.ACTIVATION, "silu"),
        ("fc2", Kind.DENSE, None),
        ("gelu_half", Kind.ACTIVATION, "gelu"),
        ("g2_out", Kind.ACTIVATION, "gelu"),
    ]
    assert graph["silu"].inputs == ["fc1"] and graph["silu"].width == 12
    assert graph["gelu_half"].inputs == ["fc2"] and graph["gelu_half"].attrs["approximate"] == "none"
    assert graph["g2_out"].inputs == ["gelu_half"] and graph.outputs == ["g2_out"]
    assert graph.following_activation("fc2") == "gelu"
    values = {layer.name: layer.attrs["onnx_value"] for layer in graph}
    assert values == {"x": "x", "fc1": "h", "silu": "a", "fc2": "g", "gelu_half": "z", "g2_out": "y"}


def test_gelu_tanh_and_decomposed_layernorm_collapse(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["ng"]),
        helper.make_node("Add", ["ng", "beta"], ["ln"], name="ln_out"),
        helper.make_node("Pow", ["ln", "three"], ["c"]),
        helper.make_node("Mul", ["c", "k"], ["ck"]),
        helper.make_node("Add", ["ln", "ck"], ["s"]),
        helper.make_node("Mul", ["s", "sq2pi"], ["t0"]),
        helper.make_node("Tanh", ["t0"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["ln", "t1"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"], name="gelu"),
    ]
    inits = [
        _c("two", 2.0),
        _c("eps", 1e-5),
        _c("gamma", [2.0] * 6),
        _c("beta", [0.0] * 6),
        _c("three", 3.0),
        _c("k", 0.044715),
        _c("sq2pi", math.sqrt(2 / math.pi)),
        _c("one", 1.0),
        _c("half", 0.5),
    ]
    graph = load_onnx(_save(tmp_path, nodes, inits, [1, 4, 6], [1, 4, 6], opset=13))
    assert [layer.kind for layer in graph] == [Kind.INPUT, Kind.NORM, Kind.ACTIVATION]
    ln, gelu = graph["ln_out"], graph["gelu"]
    assert ln.attrs["norm"] == "layer" and ln.attrs["gamma"].rms == pytest.approx(2.0)
    assert ln.attrs["epsilon"] == pytest.approx(1e-5) and ln.width == 6
    assert gelu.activation == "gelu" and gelu.attrs["approximate"] == "tanh" and gelu.inputs == ["ln_out"]
    assert (ln.attrs["onnx_value"], gelu.attrs["onnx_value"]) == ("ln", "y")


def test_residual_block_with_scalar_gate(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["f"], name="fc"),
        helper.make_node("Mul", ["eta", "f"], ["g"], name="gate"),
        helper.make_node("Add", ["x", "g"], ["y"], name="join"),
    ]
    path = _save(tmp_path, nodes, [_w("W", 16, 16, std=math.sqrt(2 / 16)), _c("eta", 0.25)], [1, 16], [1, 16])
    graph = load_onnx(path)
    assert graph["gate"].kind is Kind.SCALE
    assert graph["gate"].attrs == {"value": pytest.approx(0.25), "constant": "eta", "onnx_value": "g"}
    assert graph["join"].kind is Kind.ADD and sorted(graph["join"].inputs) == ["gate", "x"]
    (block,) = graph.residual_blocks()
    assert block.add == "join" and block.fork == "x" and block.skip == "x"
    assert block.branch == ["relu", "fc", "gate"]
    assert block.gate == pytest.approx(0.25) and block.terminal == "linear"


def test_unmodeled_op_keeps_graph_connected(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Softmax", ["h"], ["s"], name="softmax"),
        helper.make_node("Neg", ["s"], ["n"], name="neg"),
        helper.make_node("Add", ["n", "c"], ["a"], name="shift"),
        helper.make_node("Div", ["a", "four"], ["q"], name="quarter"),
        helper.make_node("MatMul", ["q", "W2"], ["y"], name="fc2"),
    ]
    inits = [_w("W1", 4, 8), _w("W2", 8, 3), _c("c", [1.0] * 5), _c("four", 4.0)]
    graph = load_onnx(_save(tmp_path, nodes, inits, [5, 4], [5, 3]))
    softmax = graph["softmax"]
    assert softmax.kind is Kind.UNMODELED
    assert softmax.attrs["reason"] == "Softmax is not modeled; treated as pass-through"
    assert softmax.inputs == ["fc1"] and softmax.width == 8
    assert graph["neg"].kind is Kind.UNMODELED and graph["neg"].inputs == ["softmax"]
    shift = graph["shift"]  # a 5-element constant is not a bias of the 8-wide layer
    assert shift.kind is Kind.UNMODELED and "adds a constant" in shift.attrs["reason"]
    assert graph["quarter"].kind is Kind.SCALE and graph["quarter"].attrs["value"] == pytest.approx(0.25)
    assert graph["fc2"].inputs == ["quarter"] and graph.outputs == ["fc2"]


def test_mul_of_two_signals_and_attention_matmul_are_unmodeled(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "ht"], ["att"], name="scores"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="gate_sig"),
        helper.make_node("Mul", ["x", "s"], ["g"], name="glu"),
        helper.make_node("Concat", ["g", "h"], ["y"], name="cat", axis=1),
    ]
    graph = load_onnx(_save(tmp_path, nodes, [_w("W", 6, 6)], [3, 6], [3, 9]))
    assert graph["scores"].kind is Kind.UNMODELED and "two signals" in graph["scores"].attrs["reason"]
    assert graph["gate_sig"].activation == "sigmoid"  # x * sigmoid(h) is gating, not SiLU
    assert graph["glu"].kind is Kind.UNMODELED and "gating" in graph["glu"].attrs["reason"]
    assert graph["cat"].kind is Kind.CONCAT and graph["cat"].width == 12
    assert graph["t"].kind is Kind.RESHAPE


def test_transformer_block_shape_ops_are_not_layers(tmp_path: Path) -> None:
    """A PyTorch-style export: Reshape targets computed from Shape, attention, two residuals."""
    d, heads = 8, 2
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "g1", "z8"], ["h"], name="ln1", epsilon=1e-5),
        n("MatMul", ["h", "Wq"], ["q0"], name="q"),
        n("Add", ["z8", "q0"], ["q1"], name="q_bias"),
        n("Shape", ["x"], ["shp"], name="shape"),
        n("Gather", ["shp", "i0"], ["bsz"], name="gather", axis=0),
        n("Unsqueeze", ["bsz", "ax0"], ["bsz1"], name="unsqueeze"),
        n("Concat", ["bsz1", "m1", "nh", "hd"], ["target"], name="concat", axis=0),
        n("Reshape", ["q1", "target"], ["q4"], name="split_heads"),
        n("Transpose", ["q4"], ["qt"], name="to_heads", perm=[0, 2, 1, 3]),
        n("Transpose", ["q4"], ["kt"], name="to_keys", perm=[0, 2, 3, 1]),
        n("MatMul", ["qt", "kt"], ["s"], name="scores"),
        n("Softmax", ["s"], ["pr"], name="softmax", axis=-1),
        n("MatMul", ["pr", "qt"], ["o"], name="mix"),
        n("Transpose", ["o"], ["ot"], name="from_heads", perm=[0, 2, 1, 3]),
        n("Reshape", ["ot", "flat"], ["o3"], name="merge_heads"),
        n("MatMul", ["o3", "Wo"], ["a"], name="out_proj"),
        n("Add", ["x", "a"], ["x1"], name="res1"),
        n("MatMul", ["x1", "W1"], ["f"], name="fc1"),
        n("Relu", ["f"], ["r"], name="relu"),
        n("MatMul", ["r", "W2"], ["m"], name="fc2"),
        n("Add", ["x1", "m"], ["y"], name="res2"),
    ]

    def ints(name: str, value: list[int] | int) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)

    inits = [_c("g1", [1.0] * d), _c("z8", [0.0] * d), _w("Wq", d, d), _w("Wo", d, d), _w("W1", d, 4 * d)]
    inits += [_w("W2", 4 * d, d), ints("i0", 0), ints("ax0", [0]), ints("m1", [-1]), ints("nh", [heads])]
    inits += [ints("hd", [d // heads]), ints("flat", [0, 0, d])]
    graph = load_onnx(_save(tmp_path, nodes, inits, ["batch", "seq", d], ["batch", "seq", d]))
    names = [layer.name for layer in graph]
    assert not {"shape", "gather", "unsqueeze", "concat"} & set(names)
    assert graph["split_heads"].inputs == ["q"] and graph["split_heads"].shape == (1, None, heads, d // heads)
    assert graph["merge_heads"].width == d and graph["x"].width == d and graph["fc1"].width == 4 * d
    # Attention is one layer passing its values (qt) through; the scores and Softmax fold into it.
    assert graph["mix"].kind is Kind.UNMODELED and graph["mix"].inputs == ["to_heads"]
    assert not {"scores", "softmax"} & set(names)
    assert graph["q"].bias is not None and graph["ln1"].attrs["norm"] == "layer"
    blocks = {block.add: block for block in graph.residual_blocks()}
    assert set(blocks) == {"res1", "res2"}
    assert blocks["res2"].branch == ["fc1", "relu", "fc2"] and blocks["res2"].last_weight == "W2"
    assert blocks["res1"].normalized and blocks["res1"].last_weight == "Wo"


def test_large_weights_leave_the_proto_and_still_give_stats(tmp_path: Path) -> None:
    w = (RNG.standard_normal((256, 300)) * 0.05).astype(np.float32)  # above KEEP_ELEMENTS
    div = RNG.uniform(1.0, 2.0, (300, 256)).astype(np.float32)
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["W2"], name="fill", value=_c("v", [0.5])),
        helper.make_node("Div", ["x", "D"], ["s"], name="norm_in"),
        helper.make_node("MatMul", ["s", "W"], ["h"], name="fc"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="head"),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(div, "D")]
    inits.append(numpy_helper.from_array(np.array([300, 4], dtype=np.int64), "wshape"))
    graph = load_onnx(_save(tmp_path, nodes, inits, [300, 256], [300, 4]))
    fc, head = graph["fc"], graph["head"]
    assert (fc.fan_in, fc.width) == (256, 300) and fc.shape == (300, 300)
    assert fc.weight.std == pytest.approx(float(w.std()), rel=1e-6)
    expected = math.sqrt(float(np.mean(1.0 / div.astype(np.float64) ** 2)))
    assert graph["norm_in"].kind is Kind.SCALE and graph["norm_in"].attrs["value"] == pytest.approx(expected)
    assert (head.fan_in, head.width) == (300, 4) and head.shape == (300, 4)
    assert head.weight.count == 1200 and head.weight.mean == 0.5 and head.weight.std == 0.0
    assert graph.meta["tensor_stats"]["W2"] == head.weight


def test_symbolic_batch_defaults_to_one_and_input_shape_overrides(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    path = _save(tmp_path, nodes, [_w("W", 4, 3, 3, 3)], ["batch", 3, "h", "w"], ["batch", 4, "h2", "w2"])
    graph = load_onnx(path)
    assert graph["x"].shape == (1, 3, None, None) and graph["x"].width == 3
    assert graph["pool"].attrs["window"] == 4 and graph["pool"].width == 4
    graph = load_graph(path, input_shape=(2, 3, 32, 32))
    assert graph["x"].shape == (2, 3, 32, 32)
    assert graph["conv"].shape == (2, 4, 30, 30) and graph["pool"].shape == (2, 4, 15, 15)
    assert graph.meta["input_shapes"] == {"x": (2, 3, 32, 32)}
    with pytest.raises(UsageError, match="rank 2"):
        load_onnx(path, input_shape=(1, 3))


def test_opset_7_and_21_models_load(tmp_path: Path) -> None:
    old = [
        helper.make_node("Gemm", ["x", "W", "B"], ["g"], name="fc", transB=1),
        helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["n"], name="bn", epsilon=1e-3),
        helper.make_node("LeakyRelu", ["n"], ["l"], name="act"),
        helper.make_node("Dropout", ["l"], ["y"], name="drop", ratio=0.1),
    ]
    inits = [_w("W", 5, 4), _c("B", [0.0] * 5), _c("s", [1.0] * 5), _c("b", [0.5] * 5)]
    inits += [_c("m", [0.0] * 5), _c("v", [1.0] * 5)]
    graph = load_onnx(_save(tmp_path, old, inits, [2, 4], [2, 5], opset=7, name="old.onnx", ir_version=3))
    assert graph.meta["opset"] == 7 and graph.meta["ir_version"] == 3
    assert [layer.kind for layer in graph] == [
        Kind.INPUT,
        Kind.DENSE,
        Kind.NORM,
        Kind.ACTIVATION,
        Kind.RESHAPE,
    ]
    bn = graph["bn"]
    assert bn.attrs["norm"] == "batch" and bn.attrs["epsilon"] == pytest.approx(1e-3)
    assert bn.attrs["gamma"].rms == pytest.approx(1.0) and bn.attrs["beta"].mean == pytest.approx(0.5)
    assert bn.attrs["running_var"].mean == pytest.approx(1.0) and bn.width == 5
    assert _own(graph["act"].attrs) == {"activation": "leaky_relu", "alpha": pytest.approx(0.01)}

    new = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["u"], name="unsq"),
        helper.make_node("Conv", ["u", "W"], ["c"], name="conv"),
        helper.make_node("GroupNormalization", ["c", "gs", "gb"], ["gn"], name="gn", num_groups=2),
        helper.make_node("Gelu", ["gn"], ["y"], name="gelu", approximate="tanh"),
    ]
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    inits = [axes, _w("W", 4, 2, 3), _c("gs", [1.0] * 4), _c("gb", [0.0] * 4)]
    graph = load_onnx(_save(tmp_path, new, inits, [2, 9], [1, 4, 7], opset=21, name="new.onnx"))
    assert graph.meta["opset"] == 21
    assert graph["conv"].fan_in == 6 and graph["conv"].shape == (1, 4, 7)
    assert graph["gn"].attrs["norm"] == "group" and graph["gn"].attrs["num_groups"] == 2
    assert _own(graph["gelu"].attrs) == {"activation": "gelu", "approximate": "tanh"}
    assert graph["gelu"].width == 4


# ----------------------------------------------------------------------------- load errors


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        load_graph(tmp_path / "nope.onnx")
    with pytest.raises(LoadError, match="no such file"):
        load_onnx(tmp_path / "nope.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(LoadError, match="empty"):
        load_graph(tmp_path / "empty.onnx")
    with pytest.raises(LoadError, match="empty"):
        load_onnx(tmp_path / "empty.onnx")
    with pytest.raises(LoadError, match="directory"):
        load_graph(tmp_path)


def test_random_bytes_and_truncated_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(1).bytes(4096))
    assert sniff(junk) == "unknown"
    with pytest.raises(LoadError, match="unrecognized file format"):
        load_graph(junk)
    with pytest.raises(LoadError, match="not an ONNX model"):
        load_onnx(junk)
    path, _ = _mlp(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert sniff(path) == "onnx" and sniff(cut) == "onnx"
    with pytest.raises(LoadError, match="truncated") as info:
        load_graph(cut)
    assert info.value.path == str(cut) and "\n" not in info.value.problem


def test_git_lfs_pointer_and_pytorch_files(tmp_path: Path) -> None:
    pointer = tmp_path / "model.onnx"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert sniff(pointer) == "git-lfs-pointer"
    with pytest.raises(LoadError, match="git lfs pull"):
        load_graph(pointer)
    pickle_file = tmp_path / "model.onnx.bak"
    pickle_file.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    assert sniff(pickle_file) == "pickle"
    # With torch: the corrupt pickle is named; without: the install that reads PyTorch files.
    expected = "not a readable PyTorch checkpoint" if importlib.util.find_spec("torch") else "needs torch"
    with pytest.raises(LoadError, match=expected):
        load_graph(pickle_file)


def test_zip_and_safetensors_sniffing(tmp_path: Path) -> None:
    import json
    import struct
    import zipfile

    def make_zip(name: str, members: list[str]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            for member in members:
                zf.writestr(member, b"x")
        return path

    assert sniff(make_zip("a.pt", ["archive/data.pkl", "archive/data/0"])) == "torch-zip"
    assert (
        sniff(make_zip("b.pt", ["m/data.pkl", "m/constants.pkl", "m/code/__torch__/m.py"])) == "torchscript"
    )
    assert sniff(make_zip("c.pt2", ["m/archive_format", "m/models/model.json"])) == "pt2"
    assert sniff(make_zip("d.zip", ["readme.txt"])) == "unknown"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    st = tmp_path / "w.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    assert sniff(st) == "safetensors"


def _external_model(tmp_path: Path, location: str) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    w = _w("W", 4, 3)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return _save(model_dir, [helper.make_node("MatMul", ["x", "W"], ["y"])], [w], [1, 4], [1, 3])


def test_external_data_outside_model_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(np.ones(12, dtype=np.float32).tobytes())
    path = _external_model(tmp_path, "../secret.bin")
    with pytest.raises(LoadError, match="outside the model directory") as info:
        load_graph(path)
    assert "../secret.bin" in info.value.problem


def test_external_data_inside_dir_loads_and_missing_file_is_named(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "weights.bin")
    with pytest.raises(LoadError, match="is missing"):
        load_onnx(path)
    data = np.arange(12, dtype=np.float32)
    (path.parent / "weights.bin").write_bytes(data.tobytes())
    layer = load_onnx(path)["MatMul_0"]
    assert layer.kind is Kind.DENSE and layer.weight.mean == pytest.approx(float(data.mean()))
    (path.parent / "weights.bin").unlink()
    (path.parent / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")
    (tmp_path / "elsewhere.bin").write_bytes(data.tobytes())
    with pytest.raises(LoadError, match="symbolic link"):
        load_onnx(path)


def test_checker_failure_and_bad_tensor_are_load_errors(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "nowhere"], ["y"])], [], [1, 4], [1, 3])
    with pytest.raises(LoadError, match="ONNX checker"):
        load_onnx(path)
    w = _w("W", 4, 3)
    w.raw_data = w.raw_data[:20]
    path = _save(
        tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"])], [w], [1, 4], [1, 3], name="short.onnx"
    )
    with pytest.raises(LoadError, match="W"):
        load_onnx(path)
