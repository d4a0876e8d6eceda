"""ONNX embeddings: ``Gather(table, ids)`` starts the signal, as nn.Embedding does in the torch frontend.

Graphs built with onnx.helper check the reading rules; a torch module exported with
``torch.onnx.export`` must then audit exactly as the torch frontend audits the module itself
(widths, weights, per-tap length statistics to 1e-6), and run under ``check --mc`` through
onnx2torch with the embedding measured.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from initaudit.audit import AuditResult, audit_file, audit_graph
from initaudit.frontends.onnx_model import load_onnx
from initaudit.graph import Kind, LayerGraph
from initaudit.rules import Severity

RNG = np.random.default_rng(3)
REL = 1e-6


def _array(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _ints(name: str, value: Any) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def _save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    inits: list[TensorProto],
    out: tuple[str, list[int]] = ("y", [1, 8, 8]),
) -> Path:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _tap_rows(result: AuditResult) -> list[dict[str, Any]]:
    keep = ("kind", "width", "mean", "spread", "log_mean", "log_var", "median", "entry_mean", "segment")
    return [{k: getattr(p, k) for k in keep} for p in result.prediction.layers if p.tap]


def _linear_rows(graph: LayerGraph) -> list[dict[str, Any]]:
    """Widths and weight moments; names differ by format (``onnx::MatMul_21`` vs ``fc1.weight``)."""
    rows = []
    for layer in graph.linear_layers():
        row: dict[str, Any] = {"width": layer.width, "fan_in": layer.fan_in, "fan_out": layer.fan_out}
        for part in ("weight", "bias"):
            stats = getattr(layer, part)
            for moment in ("mean", "std", "second_moment", "count"):
                row[f"{part}.{moment}"] = getattr(stats, moment) if stats else None
        rows.append(row)
    return rows


def _sources(graph: LayerGraph) -> list[tuple[str | None, int | None]]:
    return [(graph[name].attrs.get("embedding"), graph[name].width) for name in graph.inputs]


def _assert_close(label: str, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b), f"{label}: {len(a)} vs {len(b)} rows"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for key, value in x.items():
            other = y[key]
            if isinstance(value, float) and isinstance(other, float):
                assert math.isclose(value, other, rel_tol=REL, abs_tol=1e-12), f"{label}[{i}].{key}"
            else:
                assert value == other, f"{label}[{i}].{key}: {value!r} vs {other!r}"


def _unmodeled_ops(result: AuditResult) -> list[str]:
    return [f.message for f in result.findings if f.code == "IA901"]


# --------------------------------------------------------------------------- graphs by hand


def _token_mlp(tmp_path: Path, *, pos: bool = False, mask: bool = False) -> tuple[Path, np.ndarray]:
    """ids -> Gather(table) [+ Gather(positions)] -> MatMul + bias Add -> Relu -> MatMul."""
    table = RNG.standard_normal((50, 16)) * 0.5
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["tok"], name="embed")]
    inits = [_array("emb.weight", table)]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])]
    h = "tok"
    if pos:  # the table as a Constant node, the positions as an initializer: both are constants
        value = numpy_helper.from_array((RNG.standard_normal((8, 16)) * 0.1).astype(np.float32), "p")
        nodes += [
            helper.make_node("Constant", [], ["pos.weight"], name="pos_table", value=value),
            helper.make_node("Gather", ["pos.weight", "positions"], ["pe"], name="pos"),
            helper.make_node("Add", ["tok", "pe"], ["h"], name="embed_sum"),
        ]
        inits.append(_ints("positions", [list(range(8))]))
        h = "h"
    if mask:  # an attention-mask-like int input: cast, scaled, added as a constant
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 8]))
        nodes += [
            helper.make_node("Cast", ["mask"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mf", "last"], ["m3"], name="mask_unsqueeze"),
            helper.make_node("Add", [h, "m3"], ["hm"], name="mask_add"),
        ]
        inits.append(_ints("last", [-1]))
        h = "hm"
    nodes += [
        helper.make_node("MatMul", [h, "fc1.weight"], ["f"], name="fc1"),
        helper.make_node("Add", ["f", "fc1.bias"], ["fb"], name="fc1_bias"),
        helper.make_node("Relu", ["fb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2"),
    ]
    inits += [
        _array("fc1.weight", RNG.standard_normal((16, 32)) * math.sqrt(2 / 16)),
        _array("fc1.bias", np.zeros(32)),
        _array("fc2.weight", RNG.standard_normal((32, 8)) * math.sqrt(1 / 32)),
    ]
    name = f"tokens{'_pos' if pos else ''}{'_mask' if mask else ''}.onnx"
    return _save(tmp_path / name, nodes, inputs, inits), table


def _float_twin(tmp_path: Path, token_model: Path) -> Path:
    """The same network with the Gather's output as a float input of shape (1, 8, 16)."""
    model = onnx.load(str(token_model))
    nodes = [n for n in model.graph.node if n.op_type != "Gather"]
    for node in nodes:
        node.input[:] = ["x" if t == "tok" else t for t in node.input]
    inits = [t for t in model.graph.initializer if t.name != "emb.weight"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])
    return _save(tmp_path / "twin.onnx", nodes, [x], inits)


def test_gather_on_an_initializer_starts_the_signal(tmp_path: Path) -> None:
    path, table = _token_mlp(tmp_path)
    graph = load_onnx(path)
    assert graph.inputs == ["embed"] and "ids" not in graph  # token ids are no signal
    embed = graph["embed"]
    assert (embed.kind, embed.op, embed.width, embed.inputs) == (Kind.INPUT, "Gather", 16, [])
    assert embed.shape == (1, 8, 16) and embed.attrs["embedding"] == "emb.weight"
    assert embed.attrs["onnx_value"] == "tok"
    stats = embed.attrs["table"]
    assert stats.second_moment == pytest.approx(float(np.mean(table.astype(np.float32) ** 2)), rel=1e-6)
    fc1 = graph["fc1"]
    assert (fc1.fan_in, fc1.width, fc1.inputs, fc1.attrs["onnx_value"]) == (16, 32, ["embed"], "fb")
    result = audit_graph(graph, str(path))
    assert not _unmodeled_ops(result)
    # An embedding is an input of the table's width: the audit is the float-input twin's, tap by tap.
    twin = audit_file(_float_twin(tmp_path, path))
    _assert_close("taps", _tap_rows(result), _tap_rows(twin))
    assert [f.code for f in result.findings] == [f.code for f in twin.findings]


def test_position_embedding_and_masks_of_a_token_model(tmp_path: Path) -> None:
    """Two lookups meet in an Add of two sources (not a residual join); a second integer input
    (a mask) is no signal once the model reads tokens; a Constant node can hold a table."""
    path, _ = _token_mlp(tmp_path, pos=True, mask=True)
    graph = load_onnx(path)
    assert graph.inputs == ["embed", "pos"] and "mask" not in graph and "ids" not in graph
    assert _sources(graph) == [("emb.weight", 16), ("pos.weight", 16)]
    assert graph["pos"].attrs["table"].shape == (8, 16)
    assert "pos.weight" in graph.meta["tensor_stats"]
    join = graph["embed_sum"]
    assert join.kind is Kind.ADD and join.inputs == ["embed", "pos"] and not graph.residual_blocks()
    mask_add = graph["mask_add"]  # the mask is a constant added to the signal
    assert mask_add.kind is Kind.UNMODELED and mask_add.inputs == ["embed_sum"]
    assert "adds a constant" in mask_add.attrs["reason"]
    result = audit_graph(graph, str(path))
    assert not any("Gather" in message for message in _unmodeled_ops(result))
    (add,) = [row for row in result.prediction.layers if row.name == "embed_sum"]
    assert add.tap and add.mean == pytest.approx(2.0)  # two unit sources: M = 1 + 1


def test_integer_inputs_outside_token_models_still_carry_the_signal(tmp_path: Path) -> None:
    """A uint8 image cast to float is the signal; so are the ids of a Gather that is no lookup."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["xf", "W"], ["y"], name="fc"),
    ]
    image = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 12])]
    graph = load_onnx(
        _save(tmp_path / "u8.onnx", nodes, image, [_array("W", RNG.standard_normal((12, 8)))], ("y", [1, 8]))
    )
    assert graph.inputs == ["x"] and graph["fc"].inputs == ["cast"]
    # Gather along axis 1 of a table picks columns: not a row lookup.
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["g"], name="cols", axis=1),
        helper.make_node("MatMul", ["g", "W"], ["y"], name="fc"),
    ]
    ids = [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])]
    inits = [_array("T", RNG.standard_normal((4, 10))), _array("W", RNG.standard_normal((4, 3)))]
    graph = load_onnx(_save(tmp_path / "cols.onnx", nodes, ids, inits, ("y", [4, 4, 3])))
    assert graph.inputs == ["ids"] and graph["cols"].kind is Kind.UNMODELED


# --------------------------------------------------------------------------- a real export


def _token_net() -> Any:
    """Token + learned position embeddings, then Linear / GELU / LayerNorm / Linear / GELU."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(50, 16)
            self.pos = nn.Embedding(8, 16)
            self.fc1 = nn.Linear(16, 32)
            self.act = nn.GELU()
            self.ln = nn.LayerNorm(32)
            self.fc2 = nn.Linear(32, 16)
            self.act2 = nn.GELU()

        def forward(self, ids: Any) -> Any:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            h = self.tok(ids) + self.pos(positions)
            return self.act2(self.fc2(self.ln(self.act(self.fc1(h)))))

    torch.manual_seed(0)
    return TokenNet().eval()


def _ids(high: int) -> Any:
    torch = pytest.importorskip("torch")
    return torch.randint(0, high, (1, 8), generator=torch.Generator().manual_seed(0))


def _export(module: Any, ids: Any, path: Path, opset: int | None = None) -> Path:
    """torch.onnx.export with the TorchScript exporter (the dynamo one needs onnxscript)."""
    import torch

    kwargs = {"opset_version": opset} if opset else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (ids,),
                str(path),
                dynamo=False,
                input_names=["input_ids"],
                output_names=["y"],
                **kwargs,
            )
    except Exception as exc:  # an exporter this torch lacks, or one that needs packages offline
        pytest.skip(f"torch.onnx.export failed here: {type(exc).__name__}: {exc}")
    return path


def _torch_audit(module: Any, ids: Any, name: str) -> AuditResult:
    from initaudit.frontends.torch_graph import graph_from_module

    return audit_graph(graph_from_module(module, (ids,), source=f"{name}.pt", fmt="torch"), f"{name}.pt")


@pytest.fixture(scope="module")
def token_net() -> tuple[Any, Any, AuditResult]:
    module, ids = _token_net(), _ids(50)
    return module, ids, _torch_audit(module, ids, "token_net")


@pytest.mark.parametrize("opset", [17, None], ids=["opset17-erf-idiom", "default-Gelu-op"])
def test_exported_module_audits_like_the_module(token_net, tmp_path: Path, opset: int | None) -> None:
    module, ids, torch_result = token_net
    onnx_result = audit_file(_export(module, ids, tmp_path / "token_net.onnx", opset))
    onnx_graph, torch_graph = onnx_result.graph, torch_result.graph
    assert _sources(onnx_graph) == _sources(torch_graph) == [("tok.weight", 16), ("pos.weight", 16)]
    assert "input_ids" not in onnx_graph
    _assert_close("linear", _linear_rows(onnx_graph), _linear_rows(torch_graph))
    _assert_close("taps", _tap_rows(onnx_result), _tap_rows(torch_result))
    s, t = onnx_result.prediction.summary, torch_result.prediction.summary
    for key in ("depth", "mean_ratio", "beta", "median", "log_mean", "log_var", "second_ratio"):
        assert math.isclose(getattr(s, key), getattr(t, key), rel_tol=REL), key
    assert sorted(f.code for f in onnx_result.findings) == sorted(f.code for f in torch_result.findings)
    assert not _unmodeled_ops(onnx_result)


@pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None, reason="onnx2torch is not installed")
def test_check_mc_runs_the_exported_model_and_measures_the_embedding(token_net, tmp_path, capsys) -> None:
    """The ensemble runs the ONNX file through onnx2torch (its Gelu op included) and taps both
    lookups. M_0 is each network's mean lookup length (token ids are not a signal); every tap
    agrees with the torch frontend's own ensemble on the module within its errors."""
    from initaudit.cli import main
    from initaudit.montecarlo.measure import MCOptions, measure

    module, ids, torch_result = token_net
    path = _export(module, ids, tmp_path / "token_net.onnx")
    assert sum(n.op_type == "Gelu" for n in onnx.load(str(path)).graph.node) == 2
    main(["check", str(path), "--mc", "200", "--format", "json"])
    report = json.loads(capsys.readouterr().out)["reports"][0]
    mc = report["monte_carlo"]
    assert mc["samples"] == 200 and mc["engine"] == "ensemble"
    rows = [row for row in report["layers"] if row["measured"]]
    by_name = {row["name"]: row["measured"] for row in rows}
    # Token ids are not a signal: M_0 is each network's mean lookup length (measure.py), so the
    # two lookups add up to 2 in every network, split as their tables' mean squares are.
    tok, pos = by_name["/tok/Gather"], by_name["/pos/Gather"]
    assert tok["mean"] + pos["mean"] == pytest.approx(2.0, rel=1e-9)
    q_tok, q_pos = (float(e.weight.detach().double().pow(2).mean()) for e in (module.tok, module.pos))
    want = 2 * q_tok / (q_tok + q_pos)
    assert abs(tok["mean"] - want) < 4 * tok["mean_se"] + 0.01 * want
    # ... and the sum of the lookups is the predicted 2: no IA401 at the embeddings.
    assert not [f for f in report["findings"] if f["code"] == "IA401" and "Gather" in f["message"]]
    mirror = measure(torch_result.graph, torch_result.prediction, MCOptions(samples=200, seed=0))
    torch_taps = [mirror.taps[layer.name] for layer in torch_result.graph if layer.name in mirror.taps]
    assert len(rows) == len(torch_taps) == len(torch_result.graph.layers)
    for row, want in zip(rows, torch_taps, strict=True):
        got = row["measured"]
        se = math.hypot(got["log_mean_se"], want.log_mean_se)
        assert abs(got["log_mean"] - want.log_mean) < 5 * se + 1e-9, row["name"]


@pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None, reason="onnx2torch is not installed")
def test_gelu_op_runs_in_the_bridge_as_onnx_defines_it() -> None:
    """Opset 20's Gelu (both forms), which onnx2torch lacks, against onnx's reference evaluator;
    each Gelu output keeps a tap."""
    torch = pytest.importorskip("torch")
    from onnx.reference import ReferenceEvaluator

    from initaudit.montecarlo.onnx_bridge import onnx_program

    nodes = [
        helper.make_node("Gelu", ["x"], ["g1"], name="exact"),
        helper.make_node("Gelu", ["g1"], ["y"], name="tanh", approximate="tanh"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    graph = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    values: dict[str, str] = {}
    program, _ = onnx_program(model, (2, 6), value_nodes=values)
    data = (RNG.standard_normal((2, 6)) * 2).astype(np.float32)
    (want,) = ReferenceEvaluator(model).run(None, {"x": data})
    with torch.no_grad():
        got = program.module()(torch.from_numpy(data))
    got = got[0] if isinstance(got, tuple | list) else got
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert {"g1", "y"} <= set(values)


@pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None, reason="onnx2torch is not installed")
def test_mc_feeds_every_input_of_a_model_with_ids_and_a_mask(tmp_path: Path) -> None:
    """Two integer inputs (ids, mask): the ensemble is given one of each, and the lookup's tap
    and the sum of lookups measure what the prediction says (M_0: the mean lookup length)."""
    pytest.importorskip("torch")
    from initaudit.montecarlo.measure import MCOptions, measure
    from initaudit.theory.propagate import predict

    path, _ = _token_mlp(tmp_path, pos=True, mask=True)
    assert len(onnx.load(str(path)).graph.input) == 2
    graph = load_onnx(path)
    result = measure(graph, predict(graph), MCOptions(samples=100, seed=2))
    assert {"embed", "pos", "embed_sum", "relu", "fc2"} <= set(result.taps)
    embed, pos, total = result.taps["embed"], result.taps["pos"], result.taps["embed_sum"]
    assert embed.samples == 100
    # M_0 is each network's mean lookup length: the two lookups add up to 2 in every network,
    # and their sum (independent zero-mean tables) is 2 in mean, as predicted.
    assert embed.mean + pos.mean == pytest.approx(2.0, rel=1e-9)
    assert abs(total.mean - 2.0) < 4 * total.mean_se


# --------------------------------------------------------------------------- transformers


def _hf(name: str) -> tuple[Any, list[str]]:
    """A tiny random-init model as ``ids -> last_hidden_state``, and the lookups (state-dict
    keys) that start its signal."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    class LastHidden(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any) -> Any:
            return self.model(input_ids=ids).last_hidden_state  # export passes no keywords

    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
        tables = ["model.wte.weight", "model.wpe.weight"]
        return LastHidden(transformers.GPT2Model(config).eval()), tables
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    kinds = ("word", "token_type", "position")
    tables = [f"model.embeddings.{kind}_embeddings.weight" for kind in kinds]
    return LastHidden(transformers.BertModel(config, add_pooling_layer=False).eval()), tables


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_tiny_transformers_exports_read_their_embeddings(name: str, tmp_path: Path) -> None:
    """The lookups, their sums (the taps before the first block), every linear layer and every
    residual join match the torch frontend's reading: the exported MatMul(Softmax(q k^T), v)
    passes its values through, as scaled_dot_product_attention does there."""
    module, tables = _hf(name)
    ids = _ids(100)
    onnx_result = audit_file(_export(module, ids, tmp_path / f"{name}.onnx"))
    torch_result = _torch_audit(module, ids, name)
    assert _sources(onnx_result.graph) == _sources(torch_result.graph) == [(t, 64) for t in tables]
    assert not any("Gather" in message for message in _unmodeled_ops(onnx_result))
    _assert_close("linear", _linear_rows(onnx_result.graph), _linear_rows(torch_result.graph))
    sums = len(tables) - 1  # the Adds of the lookups: one for GPT-2, two for BERT
    onnx_taps, torch_taps = _tap_rows(onnx_result), _tap_rows(torch_result)
    _assert_close("embedding taps", onnx_taps[:sums], torch_taps[:sums])
    _assert_close("taps", onnx_taps, torch_taps)
    assert len(onnx_taps) == sums + 2 * 2  # two residual joins per block
    findings = [(f.code, f.severity) for f in onnx_result.findings]
    assert sorted(findings) == sorted((f.code, f.severity) for f in torch_result.findings)
    assert onnx_result.fails(Severity.WARNING) == torch_result.fails(Severity.WARNING)  # check's exit
    assert onnx_result.fails(Severity.ERROR) == torch_result.fails(Severity.ERROR)
    attention = [layer for layer in onnx_result.graph if layer.kind is Kind.UNMODELED]
    assert len(attention) == 2 and all("values" in layer.attrs["reason"] for layer in attention)
    # Each source starts at its table's mean square over their mean (Monte Carlo's M_0): the
    # sums add them in order (BERT: word + token type, then + position), all of them making 3.
    q = [onnx_result.graph[name].attrs["table"].second_moment for name in onnx_result.graph.inputs]
    partial = [sum(q[: k + 2]) / (sum(q) / len(q)) for k in range(sums)]
    assert [row["mean"] for row in onnx_taps[:sums]] == pytest.approx(partial)
    assert partial[-1] == pytest.approx(len(q))
