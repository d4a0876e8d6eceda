"""nn.Module -> LayerGraph: the three tracers, the op handlers, and the numbers they lead to."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from initaudit.audit import audit_graph  # noqa: E402
from initaudit.errors import LoadError, UsageError  # noqa: E402
from initaudit.frontends.torch_graph import (  # noqa: E402
    example_inputs,
    graph_from_exported,
    graph_from_module,
    graph_from_scripted,
    guessed_shape_note,
)
from initaudit.graph import Kind  # noqa: E402
from initaudit.theory.propagate import predict  # noqa: E402


class Block(nn.Module):
    """x + eta * fc2(relu(fc1(x))), the scale as a buffer: a residual block with a gate."""

    def __init__(self, width: int, eta: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.register_buffer("eta", torch.tensor(eta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.eta * self.fc2(torch.relu(self.fc1(x)))


def residual_cnn(blocks: int = 3, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *[Block(width, 1 / math.sqrt(blocks)) for _ in range(blocks)],
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(width, 4),
    )


EXAMPLE = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def default_mlp(depth: int, width: int, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers)


def _signature(graph):
    return [(layer.kind, layer.width, layer.fan_in) for layer in graph if layer.kind is not Kind.RESHAPE]


def _tap_means(graph):
    return [row.mean for row in predict(graph).layers if row.tap]


def test_export_maps_every_layer_kind_with_state_dict_names():
    graph = graph_from_module(residual_cnn(), EXAMPLE, source="m.pt", fmt="torch-zip")
    assert graph.meta["extraction"] == "torch.export"
    by_name = {layer.name: layer for layer in graph}
    assert by_name["0"].kind is Kind.CONV and by_name["0"].fan_in == 27 and by_name["0"].width == 16
    assert by_name["0"].weight.name == "0.weight" and by_name["0"].bias.name == "0.bias"
    assert by_name["1"].kind is Kind.NORM and by_name["1"].attrs["norm"] == "batch"
    assert by_name["3"].attrs == {"mode": "max", "window": 4, "kernel_shape": [2, 2], "strides": [2, 2]}
    # 8x8 -> max pool 2 -> 4x4 -> adaptive average to 1x1: a 16-position window.
    assert by_name["4"].attrs["mode"] == "global_avg" and by_name["4"].attrs["window"] == 16
    assert by_name["6.fc1"].kind is Kind.DENSE and by_name["6.fc1"].weight.name == "6.fc1.weight"
    assert by_name["6.mul"].kind is Kind.SCALE
    assert by_name["6.mul"].attrs["value"] == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    assert by_name["9"].attrs["norm"] == "layer" and by_name["10"].attrs["activation"] == "gelu"
    blocks = graph.residual_blocks()
    assert len(blocks) == 3
    assert [b.gate for b in blocks] == pytest.approx([1 / math.sqrt(3)] * 3, rel=1e-6)
    assert all(b.terminal == "linear" and b.last_weight.endswith("fc2.weight") for b in blocks)


def test_fx_reads_the_same_graph_as_export_and_hooks_say_what_they_miss():
    model = residual_cnn()
    exported = graph_from_module(model, EXAMPLE, source="m", fmt="torch", extractors=("torch.export",))
    traced = graph_from_module(model, EXAMPLE, source="m", fmt="torch", extractors=("torch.fx",))
    assert traced.meta["extraction"] == "torch.fx"
    assert _signature(traced) == _signature(exported)
    assert [layer.name for layer in traced][1:] == [layer.name for layer in exported][1:]
    assert _tap_means(traced) == pytest.approx(_tap_means(exported), rel=1e-12)
    hooked = graph_from_module(model, EXAMPLE, source="m", fmt="torch", extractors=("forward hooks",))
    assert hooked.meta["extraction"] == "forward hooks"
    assert not hooked.residual_blocks()  # the adds are functional: invisible to hooks
    assert any("forward hooks see only modules" in note for note in hooked.notes)
    dense = [layer.weight.name for layer in hooked if layer.kind is Kind.DENSE]
    assert dense == [layer.weight.name for layer in exported if layer.kind is Kind.DENSE]


def test_data_dependent_control_flow_falls_back_to_hooks_with_a_note():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h) if float(h.sum()) > -1 else h  # data-dependent: neither export nor fx

    graph = graph_from_module(Branchy(), (torch.randn(2, 8),), source="m", fmt="torch")
    assert graph.meta["extraction"] == "forward hooks"
    assert any("torch.export failed" in n for n in graph.notes)
    assert any("torch.fx failed" in n for n in graph.notes)
    assert [layer.weight.name for layer in graph if layer.weight] == ["a.weight", "b.weight"]


def test_pytorch_default_init_is_flagged_with_the_exact_shrink():
    """Default nn.Linear init has variance 1/(3 fan-in): each ReLU layer divides E[M] by 6.

    Without biases the predicted mean ratio is prod_l fan_in * mean(W_l^2) / 2, computed here
    independently from the weights; it is near 6^-L."""
    depth, width = 12, 256
    model = default_mlp(depth, width, bias=False)
    graph = graph_from_module(model, (torch.randn(1, width),), source="mlp.pt", fmt="torch-zip")
    expected = math.prod(
        width * float(np.mean(m.weight.detach().double().numpy() ** 2)) / 2
        for m in model
        if isinstance(m, nn.Linear)
    )
    summary = predict(graph).summary
    assert summary.mean_ratio == pytest.approx(expected, rel=1e-6)
    # The sample variance of 65536 uniform draws is within ~1% of 1/(3 fan-in): 6^-12 to ~5%.
    assert summary.mean_ratio == pytest.approx(6.0**-depth, rel=0.15)
    result = audit_graph(graph, "mlp.pt")
    assert result.verdict("fm1") == "error"
    ia103 = [f for f in result.findings if f.code == "IA103"]
    assert {f.location for f in ia103} == {f"{2 * i}.weight" for i in range(depth)}
    assert all(f.evidence["multiplier"] == pytest.approx(math.sqrt(6), rel=0.05) for f in ia103)


def test_default_init_with_biases_still_fails_fm1():
    result = audit_graph(graph_from_module(default_mlp(10, 128), (torch.randn(1, 128),), source="m", fmt="t"))
    assert result.verdict("fm1") == "error"
    assert any(f.code == "IA101" for f in result.findings)


def test_he_init_mlp_passes():
    model = default_mlp(10, 256, bias=False)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    result = audit_graph(graph_from_module(model, (torch.randn(1, 256),), source="m", fmt="t"))
    assert result.verdict("fm1") == "pass" and result.verdict("fm2") == "pass"


def test_torchscript_and_pt2_give_the_export_numbers(tmp_path):
    model = residual_cnn().eval()
    reference = graph_from_module(model, EXAMPLE, source="m", fmt="torch")
    for kind in ("script", "trace"):
        scripted = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, EXAMPLE)
        scripted.save(tmp_path / f"{kind}.pt")
        graph = graph_from_scripted(torch.jit.load(tmp_path / f"{kind}.pt"), EXAMPLE, source="m", fmt="ts")
        assert _signature(graph) == _signature(reference), kind
        assert _tap_means(graph) == pytest.approx(_tap_means(reference), rel=1e-12)
        assert [w.weight.name for w in graph.linear_layers()] == [
            w.weight.name for w in reference.linear_layers()
        ]
    torch.export.save(torch.export.export(model, EXAMPLE, strict=False), tmp_path / "m.pt2")
    graph = graph_from_exported(torch.export.load(tmp_path / "m.pt2"), source="m.pt2", fmt="pt2")
    assert [layer.name for layer in graph] == [layer.name for layer in reference]
    assert _tap_means(graph) == pytest.approx(_tap_means(reference), rel=1e-12)


def test_activations_and_scales_map_to_their_theory_names():
    class Acts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(8))
            self.prelu = nn.PReLU(init=0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.leaky_relu(self.fc[0](x), 0.2)
            x = nn.functional.elu(self.fc[1](x), alpha=0.5)
            x = torch.tanh(self.fc[2](x)) * 3.0
            x = nn.functional.gelu(self.fc[3](x), approximate="tanh") / 2.0
            x = nn.functional.silu(self.fc[4](x))
            x = nn.functional.relu6(self.fc[5](x))
            x = self.prelu(self.fc[6](x))
            return nn.functional.softplus(self.fc[7](x))

    graph = graph_from_module(Acts(), (torch.randn(2, 8),), source="m", fmt="t")
    acts = [
        (layer.attrs["activation"], layer.attrs.get("alpha"))
        for layer in graph
        if layer.kind is Kind.ACTIVATION
    ]
    assert acts == [
        ("leaky_relu", pytest.approx(0.2)),
        ("elu", 0.5),
        ("tanh", None),
        ("gelu", None),
        ("silu", None),
        ("relu", None),
        ("prelu", pytest.approx(0.2)),
        ("softplus", None),
    ]
    gelu = next(layer for layer in graph if layer.attrs.get("activation") == "gelu")
    assert gelu.attrs["approximate"] == "tanh"
    scales = [layer.attrs["value"] for layer in graph if layer.kind is Kind.SCALE]
    assert scales == pytest.approx([3.0, 0.5])


def test_attention_passes_its_values_through_and_is_reported():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
            return x + self.o(y)

    graph = graph_from_module(Attn(), (torch.randn(1, 5, 16),), source="m", fmt="t")
    attention = next(layer for layer in graph if "attention" in layer.op)
    assert attention.kind is Kind.UNMODELED and attention.inputs == ["v"]
    (block,) = graph.residual_blocks()
    assert block.branch[0] == "v" and block.last_weight == "o.weight"
    assert any(f.code == "IA901" for f in audit_graph(graph).findings)


def test_embedding_starts_the_signal_and_ids_are_not_a_signal():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(50, 16)
            self.pos = nn.Embedding(8, 16)
            self.fc = nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            return torch.relu(self.fc(self.tok(ids) + self.pos(positions)))

    module = Tiny()
    inputs = example_inputs(module, (1, 8), "int64")
    assert inputs[0].dtype == torch.int64
    graph = graph_from_module(module, inputs, source="m", fmt="t")
    assert graph.inputs == ["tok", "pos"]
    assert all(graph[name].width == 16 for name in graph.inputs)
    assert not graph.residual_blocks()  # two sources meeting is not a residual join


def test_example_inputs_guess_from_the_first_layer_and_say_so():
    mlp = default_mlp(2, 32)
    (x,) = example_inputs(mlp, None, None)
    assert tuple(x.shape) == (1, 32) and x.dtype == torch.float32
    assert "1,32" in guessed_shape_note(mlp, None)
    assert guessed_shape_note(mlp, (4, 32)) is None
    (x,) = example_inputs(mlp, (4, 32), "float64")
    assert tuple(x.shape) == (4, 32) and x.dtype == torch.float64
    (ids,) = example_inputs(nn.Sequential(nn.Embedding(10, 4)), (2, 5), None)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (2, 5)
    with pytest.raises(UsageError, match="--input-shape"):
        example_inputs(nn.Sequential(nn.ReLU()), None, None)
    with pytest.raises(UsageError, match="--input-dtype"):
        example_inputs(mlp, (1, 32), "Tensor")


def test_a_module_without_float_input_or_embedding_is_a_load_error():
    class IdsOnly(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return ids * 2

    with pytest.raises(LoadError, match="nothing to propagate"):
        graph_from_module(IdsOnly(), (torch.ones(1, 3, dtype=torch.int64),), source="m.pt", fmt="t")


def test_module_mode_is_restored():
    model = residual_cnn().train()
    graph_from_module(model, EXAMPLE, source="m", fmt="t")
    assert model.training


def test_a_residual_stream_is_measured_from_its_entry_not_through_a_linear_stem():
    """A patch-embedding-like stem scales the stream once; FM1 is about what depth does."""
    torch.manual_seed(0)
    stem = nn.Linear(32, 32, bias=False)
    nn.init.normal_(stem.weight, std=0.01 / math.sqrt(32))  # E[M] drops 10^4-fold, once
    blocks = [Block(32, 0.1) for _ in range(4)]
    for block in blocks:  # biases would swamp a stream this small: a different failure (IA104)
        for fc in (block.fc1, block.fc2):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
    plain = nn.Sequential(stem, *blocks)
    prediction = predict(graph_from_module(plain, (torch.randn(1, 32),), source="m", fmt="t"))
    factors = math.prod(block.factor for block in prediction.blocks)
    assert prediction.summary.mean_ratio == pytest.approx(factors, rel=1e-9)
    assert (
        audit_graph(graph_from_module(plain, (torch.randn(1, 32),), source="m", fmt="t")).verdict("fm1")
        == "pass"
    )
    # With an activation before the stream, the stem is part of the depth: measured from the input.
    activated = nn.Sequential(stem, nn.ReLU(), *blocks)
    prediction = predict(graph_from_module(activated, (torch.randn(1, 32),), source="m", fmt="t"))
    assert prediction.summary.mean_ratio < 1e-3
