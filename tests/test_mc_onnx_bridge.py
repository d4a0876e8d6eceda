"""The ONNX -> torch.export bridge for Monte Carlo (initaudit.montecarlo.onnx_bridge).

Every check compares numbers with an independent reference: onnx's ReferenceEvaluator for
what the program computes, the ONNX initializers themselves for the map, initaudit's ONNX
frontend for the layer widths.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

torch = pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:  # importing it is the bridge's job (torchvision)
    pytest.skip("onnx2torch is not installed", allow_module_level=True)

from initaudit.errors import InitauditError, LoadError, UsageError  # noqa: E402
from initaudit.frontends import load_graph  # noqa: E402
from initaudit.frontends.torch_graph import graph_from_exported  # noqa: E402
from initaudit.montecarlo import onnx_bridge  # noqa: E402
from initaudit.montecarlo.onnx_bridge import ConversionError, onnx_program  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SAMPLE_FILES = sorted(SAMPLES.glob("*.onnx"))


def _shape(path: Path, batch: int = 2) -> tuple[int, ...]:
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)


@pytest.fixture(scope="module")
def converted() -> dict[str, tuple[Any, dict[str, str], dict[str, str], list[str]]]:
    """Each sample converted once: program, initializer map, value nodes, notes."""
    out = {}
    for path in SAMPLE_FILES:
        notes: list[str] = []
        values: dict[str, str] = {}
        program, mapping = onnx_program(path, _shape(path), notes=notes, value_nodes=values)
        out[path.name] = (program, mapping, values, notes)
    return out


def _run(program: Any, *inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = program.module()(*(torch.from_numpy(x) for x in inputs))
    out = out[0] if isinstance(out, tuple | list) else out
    return out.numpy()


def _recorded(program: Any, *inputs: np.ndarray) -> dict[str, Any]:
    """Every node's value when the lifted program runs (parameters first, as Monte Carlo runs it)."""
    sig, state, constants = program.graph_signature, program.state_dict, program.constants
    args = [
        state[spec.target] if spec.target in state else constants[spec.target]
        for spec in sig.input_specs
        if spec.kind.name != "USER_INPUT"
    ]
    args += [torch.from_numpy(x) for x in inputs]
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            values[node.name] = result = super().run_node(node)
            return result

    with torch.no_grad():
        Recorder(program.graph_module).run(*args)
    return values


# --------------------------------------------------------------------------- the sample models


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_sample_outputs_equal_the_reference_evaluator(path: Path, converted: dict) -> None:
    program, _, _, notes = converted[path.name]
    x = np.random.default_rng(7).standard_normal(_shape(path)).astype(np.float32)
    want = ReferenceEvaluator(str(path)).run(None, {"input": x})[0]
    got = _run(program, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    assert notes == []  # opset 17, no tied tensors: nothing to adapt


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_initializer_map_finds_every_weight(path: Path, converted: dict) -> None:
    program, mapping, _, _ = converted[path.name]
    model = onnx.load(str(path))
    state = program.state_dict
    parameters = set(program.graph_signature.inputs_to_parameters.values())
    for t in model.graph.initializer:
        array = numpy_helper.to_array(t)
        assert np.issubdtype(array.dtype, np.floating)
        # Exact, also the CNN head: Gemm(transB=1, alpha=1) is stored (out, in) as nn.Linear keeps it.
        assert np.array_equal(state[mapping[t.name]].detach().numpy(), array), t.name
        statistic = t.name.endswith(("running_mean", "running_var"))
        assert (mapping[t.name] in parameters) != statistic, t.name
    assert len(set(mapping.values())) == len(mapping)  # no two initializers share a tensor


def test_batchnorm_at_init_is_told_apart_by_role(converted: dict) -> None:
    """gamma = running_var = 1 and beta = running_mean = 0: equal values, distinct roles."""
    _, mapping, _, _ = converted["small_he_cnn_bn.onnx"]
    for i in (1, 2, 3):
        for onnx_key, torch_attr in [
            ("weight", "weight"),
            ("bias", "bias"),
            ("running_mean", "running_mean"),
            ("running_var", "running_var"),
        ]:
            assert mapping[f"bn{i}.{onnx_key}"] == f"bn{i}/BatchNormalization.{torch_attr}"


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_layer_widths_match_the_onnx_frontend(path: Path, converted: dict) -> None:
    program, _, values, _ = converted[path.name]
    shape = _shape(path)
    onnx_graph = load_graph(path, input_shape=shape)
    torch_graph = graph_from_exported(program, source=str(path), fmt="onnx")
    by_node = {}
    for name, node in torch_graph.meta["_nodes"].items():
        by_node.setdefault(node, torch_graph[name])
    nodes = {n.name: n for n in onnx.load(str(path)).graph.node}
    compared = 0
    for layer in onnx_graph:
        last = layer.attrs.get("fused", [layer.name])[-1]
        value = nodes[last].output[0] if last in nodes else layer.name
        twin = by_node[values[value]]
        assert twin.width == layer.width, (layer.name, twin.name)
        compared += 1
    assert compared == len(onnx_graph)

    def linear(graph: Any) -> list[tuple[str, int | None, int | None]]:
        return [(layer.kind.value, layer.fan_in, layer.width) for layer in graph.linear_layers()]

    assert linear(torch_graph) == linear(onnx_graph)
    assert len(linear(onnx_graph)) >= 4


@pytest.mark.parametrize("name", ["small_he_cnn_bn.onnx", "residual_mlp_scaled.onnx"])
def test_value_nodes_are_the_onnx_intermediates(name: str, converted: dict) -> None:
    program, _, values, _ = converted[name]
    path = SAMPLES / name
    x = np.random.default_rng(3).standard_normal(_shape(path)).astype(np.float32)
    recorded = _recorded(program, x)
    names = list(values)
    reference = ReferenceEvaluator(str(path)).run(names, {"input": x})
    model = onnx.load(str(path))
    assert len(values) == 1 + sum(len(n.output) for n in model.graph.node)  # the input, every output
    for value, want in zip(names, reference, strict=True):
        got = recorded[values[value]].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()) + 1e-7)


# --------------------------------------------------------------------------- small hand-built graphs


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[TensorProto],
    out: list[int | str | None],
    *,
    opset: int = 17,
    x: tuple[int | str, ...] = ("batch", 8),
    domains: tuple[str, ...] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        inits,
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _array(name: str, values: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 8)).astype(np.float32)
B = RNG.standard_normal(8).astype(np.float32)


def _check_against_reference(model: onnx.ModelProto, program: Any, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(_run(program, x), want, rtol=1e-5, atol=1e-6)


def test_gemm_alpha_transposition_and_tied_weights() -> None:
    """W feeds a Gemm (alpha 0.5, transB 0: nn.Linear stores 0.5 W^T) and two MatMuls (one
    buffer each in onnx2torch: merged back into one parameter, so the tie survives)."""
    model = _model(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["h"], alpha=0.5, beta=2.0, name="gemm"),
            helper.make_node("MatMul", ["h", "W"], ["h2"], name="mm1"),
            helper.make_node("MatMul", ["h2", "W"], ["y"], name="mm2"),
        ],
        [_array("W", W), _array("b", B)],
        ["batch", 8],
    )
    notes: list[str] = []
    program, mapping = onnx_program(model, (2, 8), notes=notes)
    _check_against_reference(model, program, (2, 8))
    state = program.state_dict
    assert np.array_equal(state["gemm.weight"].detach().numpy(), torch.from_numpy(W).T.mul(0.5).numpy())
    assert np.array_equal(state["gemm.bias"].detach().numpy(), torch.from_numpy(B).mul(2.0).numpy())
    assert mapping["b"] == "gemm.bias"
    assert np.array_equal(state[mapping["W"]].detach().numpy(), W)
    parameters = program.graph_signature.inputs_to_parameters
    assert sorted(parameters.values()) == sorted(["gemm.weight", "gemm.bias", mapping["W"]])
    matmul_weights = {
        n.args[1].name for n in program.graph.nodes if n.op == "call_function" and "matmul" in str(n.target)
    }
    assert len(matmul_weights) == 1  # both MatMuls read the one merged parameter
    assert any("copied into 2 torch tensors" in note and "'W'" in note for note in notes)


def test_shape_operands_are_burnt_in() -> None:
    """Reshape (with a 0), Slice, Unsqueeze-13 and Expand read constant operands' values:
    onnx2torch's modules cannot be exported as they are, the specialized ones can."""
    ints = np.int64
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
            helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["s"], name="slice"),
            helper.make_node("Unsqueeze", ["s", "uaxes"], ["u"], name="unsqueeze"),
            helper.make_node("Expand", ["u", "eshape"], ["e"], name="expand"),
            helper.make_node("ReduceSum", ["e", "raxes"], ["y"], keepdims=0, name="sum"),
        ],
        [
            _array("W", W),
            _array("shape", [0, 2, 4], ints),
            _array("starts", [1], ints),
            _array("ends", [4], ints),
            _array("axes", [2], ints),
            _array("uaxes", [1], ints),
            _array("eshape", [1, 3, 1, 1], ints),
            _array("raxes", [1], ints),
        ],
        ["batch", 2, 3],
    )
    values: dict[str, str] = {}
    program, mapping = onnx_program(model, (2, 8), value_nodes=values)
    _check_against_reference(model, program, (2, 8))
    assert mapping == {"W": "initializers.onnx_initializer_0"}
    assert list(program.graph_signature.inputs_to_parameters.values()) == ["initializers.onnx_initializer_0"]
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("item" in t or "assert_scalar" in t for t in targets)  # nothing read at run time
    x = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)
    recorded = _recorded(program, x)
    want = ReferenceEvaluator(model).run(["r", "s", "u"], {"x": x})
    for name, value in zip(["r", "s", "u"], want, strict=True):
        np.testing.assert_allclose(recorded[values[name]].numpy(), value, rtol=1e-6)


def test_real_value_export_fallback_drops_constant_asserts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the specialization, Reshape's ``torch.any(shape == 0)`` stops the plain export;
    the retry with real values gets through and leaves asserts on the shape constant only,
    which go (they can never fail: the constant never changes)."""
    monkeypatch.setattr(onnx_bridge, "_specialize", lambda *args, **kwargs: None)
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["r"]),
            helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=0),
        ],
        [_array("W", W), _array("shape", [0, 2, 4], np.int64), _array("axes", [2], np.int64)],
        ["batch", 2],
    )
    program, _ = onnx_program(model, (2, 8))
    _check_against_reference(model, program, (2, 8))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("assert_scalar" in t for t in targets)


def test_verify_compares_with_the_module_on_a_second_input() -> None:
    linear = torch.nn.Linear(4, 3)
    inputs = [(torch.randn(2, 4, generator=torch.Generator().manual_seed(s)),) for s in (0, 1)]
    program = torch.export.export(linear, inputs[0], strict=False)
    with torch.no_grad():
        expected = [linear(*args) for args in inputs]
    onnx_bridge._verify(program, inputs, expected)  # the same numbers: no complaint
    off = [expected[0], expected[1] + 1e-3 * expected[1].abs().max()]
    with pytest.raises(ConversionError, match="on a second input"):
        onnx_bridge._verify(program, inputs, off)


def test_newer_opset_is_converted_down() -> None:
    """ReduceMean-18 takes its axes as an input; onnx2torch only knows ReduceMean-13."""
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("ReduceMean", ["h", "axes"], ["y"], keepdims=1),
        ],
        [_array("W", W), _array("axes", [1], np.int64)],
        ["batch", 1],
        opset=18,
    )
    notes: list[str] = []
    program, _ = onnx_program(model, (2, 8), notes=notes)
    _check_against_reference(model, program, (2, 8))
    assert notes == [
        "converted from opset 18 to 17 with onnx.version_converter: onnx2torch has no converter "
        "for ReduceMean (opset 18)"
    ]


def test_custom_op_is_named() -> None:
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Foo", ["h"], ["y"], domain="com.acme", name="foo"),
        ],
        [_array("W", W)],
        ["batch", 8],
        domains=("com.acme",),
    )
    with pytest.raises(ConversionError) as info:
        onnx_program(model, (2, 8))
    assert (info.value.op, info.value.node) == ("com.acme::Foo", "foo")
    assert "com.acme::Foo" in str(info.value)
    assert isinstance(info.value, InitauditError)  # the CLI's one-line message, exit 2


def test_op_no_opset_can_convert_is_named() -> None:
    """GroupNormalization exists from opset 18 on: down-conversion cannot help."""
    graph = helper.make_graph(
        [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, name="gn")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])],
        [_array("s", np.ones(2)), _array("b", np.zeros(2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(
        ConversionError, match=r"no converter for op GroupNormalization \(at any opset\)"
    ) as info:
        onnx_program(model, (1, 4, 3))
    assert (info.value.op, info.value.node) == ("GroupNormalization", "gn")


def test_converter_failure_is_named() -> None:
    """onnx2torch's Conv takes its weight from an initializer only, not from a second input."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConversionError, match="needs input 'w' as an initializer") as info:
        onnx_program(model, (1, 3, 5, 5))
    assert (info.value.op, info.value.node) == ("Conv", "conv")


def test_exporter_idioms_are_folded_first() -> None:
    """Two idioms of torch.onnx exports that onnx2torch cannot take as they are: a Conv bias
    given by an Identity alias of one shared zero tensor, and a causal mask made by Trilu
    (no converter) from a Shape. Both are constants once the input shape is fixed."""
    w1, w2 = RNG.standard_normal((4, 3, 3, 3)), RNG.standard_normal((4, 4, 3, 3))
    model = _model(
        [
            helper.make_node("Identity", ["zeros"], ["b1"]),
            helper.make_node("Identity", ["zeros"], ["b2"]),
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Shape", ["c2"], ["s"], start=2),
            helper.make_node("Expand", ["one", "s"], ["ones"]),
            helper.make_node("Trilu", ["ones"], ["mask"], upper=0),
            helper.make_node("Mul", ["c2", "mask"], ["y"]),
        ],
        [_array("zeros", np.zeros(4)), _array("w1", w1), _array("w2", w2), _array("one", 1.0)],
        [1, 4, 5, 5],
        x=(1, 3, 5, 5),
    )
    notes: list[str] = []
    program, mapping = onnx_program(model, (1, 3, 5, 5), notes=notes)
    _check_against_reference(model, program, (1, 3, 5, 5))
    assert (mapping["b1"], mapping["b2"], mapping["w1"]) == ("conv1.bias", "conv2.bias", "conv1.weight")
    assert notes == [
        "2 Conv weight(s) computed in the graph ('b1', 'b2': aliases or weight normalization) became "
        "tensors of their own; resampling draws them independently"
    ]
    # The folded mask is a constant of the program, not a parameter to redraw.
    parameters = set(program.graph_signature.inputs_to_parameters.values())
    assert parameters == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}


def test_weights_are_the_operands_of_compute_ops() -> None:
    """What resampling may redraw: operands of MatMul/Mul/Add..., also through Identity and
    Transpose; never a Pow exponent, a Clip bound, a 0/1 mask or a BatchNorm statistic."""
    model = _model(
        [
            helper.make_node("Transpose", ["w"], ["wt"]),
            helper.make_node("MatMul", ["x", "wt"], ["h"]),
            helper.make_node("Mul", ["h", "gamma"], ["g"]),
            helper.make_node("Mul", ["g", "mask"], ["m"]),
            helper.make_node("Pow", ["m", "two"], ["p"]),
            helper.make_node("Clip", ["p", "lo", "hi"], ["y"]),
        ],
        [
            _array("w", W),
            _array("gamma", np.full(8, 1e-4)),
            _array("mask", [1, 0, 1, 1, 0, 1, 1, 1]),
            _array("two", 2.0),
            _array("lo", 0.0),
            _array("hi", 6.0),
        ],
        ["batch", 8],
    )
    assert onnx_bridge._weights(model.graph) == {"w", "gamma"}
    program, mapping = onnx_program(model, (2, 8))
    _check_against_reference(model, program, (2, 8))
    parameters = set(program.graph_signature.inputs_to_parameters.values())
    assert parameters == {mapping["w"], mapping["gamma"]}


def test_split_18_is_converted_down() -> None:
    """Split-18 (num_outputs) has no onnx2torch converter and no onnx down-adapter."""
    model = _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Split", ["h"], ["a", "b", "c"], axis=1, num_outputs=3),
            helper.make_node("Concat", ["c", "a", "b"], ["y"], axis=1),
        ],
        [_array("W", W)],
        ["batch", 8],
        opset=18,
    )
    notes: list[str] = []
    program, _ = onnx_program(model, (2, 8), notes=notes)
    _check_against_reference(model, program, (2, 8))  # chunks 3, 3, 2: the order shows
    assert notes == [
        "converted from opset 18 to 17 with onnx.version_converter: onnx2torch has no converter "
        "for Split (opset 18)"
    ]


def test_shape_from_the_input_values_is_refused() -> None:
    """Tile's repeats come from the input's values: no fixed-shape program computes that."""
    ints = np.int64
    model = _model(
        [
            helper.make_node("Slice", ["x", "st", "en", "ax"], ["s"]),
            helper.make_node("Cast", ["s"], ["si"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["si", "flat"], ["r"]),
            helper.make_node("Tile", ["x", "r"], ["y"], name="tile"),
        ],
        [
            _array("st", [0], ints),
            _array("en", [2], ints),
            _array("ax", [1], ints),
            _array("flat", [-1], ints),
        ],
        [None, None],
        x=(1, 8),
    )
    with pytest.raises(ConversionError) as info:
        onnx_program(model, (1, 8))
    assert info.value.op == "Tile"


# --------------------------------------------------------------------------- loading safely


def test_no_file_is_written_and_the_proto_is_not_touched(tmp_path: Path) -> None:
    source = SAMPLES / "small_he_cnn_bn.onnx"
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes())
    before = sorted(tmp_path.iterdir())
    onnx_program(path, (1, 3, 32, 32))
    assert sorted(tmp_path.iterdir()) == before  # onnx2torch, given a path, writes beside it

    model = onnx.load(str(source))
    raw = model.SerializeToString()
    onnx_program(model, (1, 3, 32, 32))
    assert model.SerializeToString() == raw


def test_external_data_is_read_from_inside_the_model_directory(tmp_path: Path) -> None:
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_array("W", W)], ["batch", 8])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.bin", size_threshold=0)
    assert (tmp_path / "m.bin").stat().st_size == W.nbytes
    program, mapping = onnx_program(path, (2, 8))
    assert np.array_equal(program.state_dict[mapping["W"]].detach().numpy(), W)

    in_memory = onnx.load(str(path), load_external_data=False)
    with pytest.raises(LoadError, match="external data: pass the file path"):
        onnx_program(in_memory, (2, 8))

    outside = tmp_path / "sub"
    outside.mkdir()
    escaped = onnx.load(str(path), load_external_data=False)
    for entry in escaped.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../m.bin"
    onnx.save_model(escaped, str(outside / "m.onnx"))
    with pytest.raises(LoadError, match="outside the model directory"):
        onnx_program(outside / "m.onnx", (2, 8))


def test_input_shape_must_fit() -> None:
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_array("W", W)], ["batch", 8])
    with pytest.raises(UsageError, match="rank 3"):
        onnx_program(model, (1, 2, 8))
    open_width = _model([helper.make_node("Relu", ["x"], ["y"])], [], ["batch", "n"], x=("batch", "n"))
    with pytest.raises(UsageError, match="--input-shape"):
        onnx_program(open_width)
    program, _ = onnx_program(open_width, (3, 5))
    assert _run(program, np.ones((3, 5), np.float32)).shape == (3, 5)


# --------------------------------------------------------------------------- torchvision


class _BrokenModule(types.ModuleType):
    """A torchvision whose import "works" but which raises on any use, as a CUDA build
    does next to a CPU torch."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"operator torchvision::{name} does not exist")


@pytest.mark.parametrize("torchvision", [None, _BrokenModule("torchvision")], ids=["absent", "broken"])
def test_onnx2torch_imports_without_a_working_torchvision(
    torchvision: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in sys.modules if n == "onnx2torch" or n.startswith("onnx2torch.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    for name in ("torchvision", "torchvision.ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)  # None: "import torchvision" fails
    monkeypatch.setattr(onnx_bridge, "_torchvision_stubbed", False)

    module = onnx_bridge._import_onnx2torch()
    assert callable(module.convert)
    assert sys.modules["torchvision"] is torchvision  # the stand-in is gone, the original back
    assert "torchvision.ops" not in sys.modules
    assert onnx_bridge._torchvision_stubbed

    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_array("W", W)], ["batch", 8])
    program, _ = onnx_program(model, (2, 8))
    _check_against_reference(model, program, (2, 8))

    boxes = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["x", "x"], ["y"], name="nms")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [None, 3])],
    )
    nms = helper.make_model(boxes, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConversionError, match="needs torchvision") as info:
        onnx_program(nms, (1, 4, 4))
    assert info.value.op == "NonMaxSuppression"


# --------------------------------------------------------------------------- Monte Carlo taps


@pytest.mark.parametrize(
    ("name", "shape"), [("residual_mlp_scaled.onnx", (1, 64)), ("small_he_cnn_bn.onnx", (1, 3, 32, 32))]
)
def test_measure_taps_each_layer_at_its_onnx_value(name: str, shape: tuple[int, ...]) -> None:
    """Every layer's tap is the fx node computing the ONNX value the layer stands for (a fused
    MatMul + bias Add: after the Add): M_j of one fixed-weight network equals the mean square of
    that value under onnx's reference evaluator."""
    from initaudit.montecarlo.ensemble import program_parameters, run_ensemble
    from initaudit.montecarlo.measure import _program
    from initaudit.montecarlo.resample import resample

    path = SAMPLES / name
    graph = load_graph(path, input_shape=shape)
    program, taps, _, names = _program(graph)
    model = onnx.load(str(path))
    nodes = {n.name: n for n in model.graph.node}
    expected = {}  # the frontend's convention: a layer is its (last fused) node's first output
    for layer in graph:
        last = layer.attrs.get("fused", [layer.name])[-1]
        expected[layer.name] = nodes[last].output[0] if last in nodes else layer.name
    fused = [layer for layer in graph if len(layer.attrs.get("fused", [])) > 1]
    assert len(fused) == (102 if name.startswith("residual") else 0)  # stem, 100 branch layers, head
    assert all(expected[layer.name] != nodes[layer.name].output[0] for layer in fused)  # after the Add
    kinds = {"activation", "add", "dense", "conv"}
    assert {layer.name for layer in graph if layer.kind.value in kinds} <= set(taps)
    assert set(names) == {t.name for t in model.graph.initializer if t.name in names}  # ONNX names

    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    sampled = resample(program_parameters(program), "inputs", 1, torch.Generator().manual_seed(0))
    got = run_ensemble(program, taps, torch.from_numpy(x), sampled, chunk=1)
    reference = ReferenceEvaluator(model).run([expected[k] for k in taps], {graph.inputs[0]: x})
    for (layer, _), want in zip(taps.items(), reference, strict=True):
        m = float(np.mean(np.asarray(want, dtype=np.float64) ** 2))
        assert float(got[layer][0]) == pytest.approx(m, rel=1e-4), layer


def test_scheme_resampling_reads_fan_in_through_the_initializer_map(tmp_path: Path) -> None:
    """ONNX MatMul weights are (in, out): by PyTorch's layout their fans would be swapped, and
    under the wrong fans no scheme matches. Through the bridge's map, each is PyTorch's default."""
    from initaudit.montecarlo.ensemble import program_parameters
    from initaudit.montecarlo.measure import _program, resample_fan_in
    from initaudit.montecarlo.resample import resample_laws

    rng = np.random.default_rng(0)
    widths, nodes, inits, h = [16, 48, 16, 48], [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        inits.append(_array(f"w{i}", rng.uniform(-1 / math.sqrt(a), 1 / math.sqrt(a), (a, b))))
        nodes += [
            helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        h = f"r{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    model = _model(nodes, inits, [1, widths[-1]], x=(1, 16))
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    graph = load_graph(path)
    program, _, _, names = _program(graph)
    params = program_parameters(program)
    fan_in = resample_fan_in(graph, names)
    assert sorted(fan_in.values()) == [16, 16, 48] and set(fan_in) <= set(params)
    laws = resample_laws(params, "scheme", fan_in=fan_in)
    for key, fin in fan_in.items():
        assert laws[key].label == "pytorch_default"
        assert laws[key].std == pytest.approx(math.sqrt(1 / (3 * fin)), rel=1e-9)


# --------------------------------------------------------------------------- embeddings


def test_onnx_gather_on_an_initializer_is_an_embedding() -> None:
    """onnx2torch turns Gather(table, ids) into aten.index.Tensor(table, [ids]): the torch graph
    reads it as the lookup that starts the signal, with the table's width."""
    rng = np.random.default_rng(1)
    table = _array("emb.weight", rng.standard_normal((50, 16)))
    weight = _array("fc.weight", rng.standard_normal((16, 16)) * math.sqrt(2 / 16))
    nodes = [
        helper.make_node("Gather", ["emb.weight", "ids"], ["h0"], name="embed", axis=0),
        helper.make_node("MatMul", ["h0", "fc.weight"], ["h1"], name="fc"),
        helper.make_node("Relu", ["h1"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
        [table, weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    values: dict[str, str] = {}
    program, mapping = onnx_program(model, (1, 8), value_nodes=values)
    torch_graph = graph_from_exported(program, source="gather", fmt="onnx")
    source = torch_graph[torch_graph.inputs[0]]
    assert source.kind.value == "input" and source.width == 16
    assert source.attrs["embedding"] == mapping["emb.weight"]
    assert torch_graph.meta["_nodes"][source.name] == values["h0"]
    dense = torch_graph.linear_layers()
    assert [(layer.fan_in, layer.width, layer.inputs) for layer in dense] == [(16, 16, [source.name])]


def test_table_lookup_in_a_torch_module_is_an_embedding_and_is_measured() -> None:
    """``self.table[ids]`` (aten.index.Tensor on a parameter) starts the signal like nn.Embedding,
    so Monte Carlo runs such a model and measures the lookup (E[M] = the table's mean square)."""
    from initaudit.frontends.torch_graph import graph_from_module
    from initaudit.montecarlo.measure import MCOptions, measure
    from initaudit.theory.propagate import predict

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(40, 32, generator=torch.Generator().manual_seed(0)))
            self.fc = torch.nn.Linear(32, 32)
            torch.nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")
            torch.nn.init.zeros_(self.fc.bias)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(self.table[ids]))

    ids = torch.arange(16).reshape(1, 16)
    graph = graph_from_module(Lookup(), (ids,), source="lookup", fmt="torch")
    source = graph[graph.inputs[0]]
    assert source.attrs["embedding"] == "table" and source.width == 32
    pred = predict(graph)
    result = measure(graph, pred, MCOptions(samples=300, resample="gaussian", seed=1))
    est = result.taps[source.name]
    assert est.samples == 300 and math.isfinite(est.mean) and est.mean > 0
    relu = next(layer.name for layer in graph if layer.kind.value == "activation")
    assert relu in result.taps and result.taps[relu].samples == 300
