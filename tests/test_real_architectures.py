"""Architectures nobody here wrote, at random init, from small configs (no download).

Each must trace with torch.export, find its residual blocks, name state-dict keys, and give
a report without crashing; the numbers checked are the structural ones we can count by hand.
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

from initaudit.audit import audit_graph  # noqa: E402
from initaudit.frontends.torch_graph import graph_from_module  # noqa: E402
from initaudit.graph import Kind  # noqa: E402
from initaudit.report.console import render_console  # noqa: E402
from initaudit.report.json_report import render_json  # noqa: E402

IDS = (torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0)),)
PIXELS = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
LAYERS = 2


def gpt2():
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2Model(config), IDS


def bert():
    config = transformers.BertConfig(
        num_hidden_layers=LAYERS,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config), IDS


def resnet():
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"
    )
    return transformers.ResNetModel(config), PIXELS


def vit():
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=LAYERS,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return transformers.ViTModel(config), PIXELS


#: factory, residual joins (attention + MLP per transformer layer, one per ResNet block),
#: a weight key that must appear among the linear layers.
CASES = {
    "gpt2": (gpt2, 2 * LAYERS, "h.1.mlp.c_proj.weight"),
    "bert": (bert, 2 * LAYERS, "encoder.layer.1.output.dense.weight"),
    "resnet": (resnet, 2, "encoder.stages.1.layers.0.layer.1.convolution.weight"),
    "vit": (vit, 2 * LAYERS, "layers.1.mlp.fc2.weight"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def audited(request):
    factory, joins, key = CASES[request.param]
    torch.manual_seed(0)
    model, example = factory()
    graph = graph_from_module(model, example, source=f"{request.param}.pt", fmt="torch-zip")
    return request.param, graph, audit_graph(graph, f"{request.param}.pt"), joins, key


def test_traced_by_export_with_every_block(audited):
    _name, graph, _, joins, key = audited
    assert graph.meta["extraction"] == "torch.export", graph.notes
    assert len(graph.residual_blocks()) == joins
    assert key in {layer.weight.name for layer in graph.linear_layers()}
    assert not [
        layer for layer in graph if layer.kind is Kind.UNMODELED and "could not be read" in str(layer.attrs)
    ]


def test_report_renders_and_names_state_dict_keys(audited):
    _name, graph, result, _, _ = audited
    from rich.console import Console

    console = Console(record=True, width=120)
    render_console(result, console, False, False)
    assert "Verdict" in console.export_text()
    assert render_json([result], "error").startswith("{")
    params = {layer.weight.name for layer in graph.linear_layers()}
    weight_findings = [f for f in result.findings if f.code == "IA103"]
    assert all(f.location in params for f in weight_findings)


def test_transformer_attention_is_reported_not_guessed(audited):
    name, graph, result, _, _ = audited
    if name == "resnet":
        assert not any(f.code == "IA901" for f in result.findings)
        return
    attention = [layer for layer in graph if "attention" in layer.op]
    assert len(attention) == LAYERS
    assert any(f.code == "IA901" and "attention" in f.message for f in result.findings)


def test_gpt2_gelu_module_folds_into_one_activation():
    model, example = gpt2()
    graph = graph_from_module(model, example, source="gpt2.pt", fmt="torch-zip")
    acts = [layer for layer in graph if layer.kind is Kind.ACTIVATION]
    assert [(a.attrs["activation"], a.attrs["approximate"]) for a in acts] == [("gelu", "tanh")] * LAYERS
    # Conv1D is addmm(bias, x, W) with W stored (in, out).
    c_fc = next(layer for layer in graph.linear_layers() if layer.weight.name == "h.0.mlp.c_fc.weight")
    assert (c_fc.fan_in, c_fc.width) == (64, 256) and c_fc.bias.name == "h.0.mlp.c_fc.bias"
