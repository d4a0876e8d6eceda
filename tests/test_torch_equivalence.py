"""Issue 3, acceptance 1: every sample's PyTorch forms audit exactly like its ONNX file.

``sample_models/torch_models.py`` holds a torch twin of each ONNX sample; the first tests prove
the twin computes the same function (against ``onnx.reference``). Then each twin is saved three
ways, as users keep models: a state dict loaded into the factory (``--model``), a ``.pt2``
(``torch.export``) and a TorchScript archive (both with trust). Each form's audit must match
the ONNX audit to 1e-6 relative: the widths of the linear layers, the taps' length statistics,
the residual blocks, the summary behind FM1/FM2, the verdicts and the findings. Layer names
differ by format (``/fc1/MatMul`` vs a torch node), so layers are matched by position among
layers of their kind; tensor names are the same (the samples use state-dict keys), so they
must match exactly.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# TorchScript is deprecated in torch 2.9+, yet users still keep models that way.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

from initaudit.audit import AuditResult, audit_file, audit_graph  # noqa: E402
from initaudit.graph import Kind, LayerGraph  # noqa: E402
from initaudit.theory.propagate import Summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
REL = 1e-6
FORMS = ("state_dict", "pt2", "torchscript")


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sample_models_build", SAMPLES / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NAMES = list(_load_build().MODELS)


@pytest.fixture(scope="module")
def tm() -> Iterator[ModuleType]:
    """``sample_models.torch_models``, imported as ``--model`` imports it: from the repo root."""
    added = str(ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(ROOT))
    try:
        yield importlib.import_module("sample_models.torch_models")
    finally:
        if added:
            sys.path.remove(str(ROOT))


def test_every_sample_has_a_torch_twin(tm):
    assert list(tm.FACTORIES) == NAMES
    assert set(tm.INPUT_SHAPES) == set(NAMES)


# --- the twins compute the ONNX samples' functions -------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_twin_matches_onnx_reference(tm, name):
    from onnx.reference import ReferenceEvaluator

    module = tm.sample_module(name)
    x = np.random.default_rng(7).standard_normal((3, *tm.INPUT_SHAPES[name][1:])).astype(np.float32)
    (expected,) = ReferenceEvaluator(str(SAMPLES / f"{name}.onnx")).run(None, {"input": x})
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


def test_load_onnx_weights_transposes_square_matmul_weights(tm):
    # A 128x128 MatMul weight has the same shape either way: the layout must come from the graph.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(SAMPLES / "deep_xavier_mlp.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = tm.sample_module("deep_xavier_mlp").state_dict()
    assert stored["fc3.weight"].shape == (128, 128)
    np.testing.assert_array_equal(state["fc3.weight"].numpy(), stored["fc3.weight"].T)
    np.testing.assert_array_equal(state["head.weight"].numpy(), stored["head.weight"].T)
    # Gemm(transB=1) keeps torch's layout.
    cnn = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(SAMPLES / "small_he_cnn_bn.onnx")).graph.initializer
    }
    np.testing.assert_array_equal(
        tm.sample_module("small_he_cnn_bn").state_dict()["fc.weight"].numpy(), cnn["fc.weight"]
    )


def test_load_onnx_weights_refuses_a_mismatched_module(tm):
    with pytest.raises(ValueError, match="differ"):
        tm.load_onnx_weights(tm.residual_mlp_unscaled(), SAMPLES / "residual_mlp_scaled.onnx")  # no eta


# --- the PyTorch forms ----------------------------------------------------------------------


@dataclass
class Sample:
    name: str
    onnx: AuditResult
    keys: set[str]  # the twin's state-dict keys
    paths: dict[str, Path]
    audits: dict[str, AuditResult]


def _load_form(tm: ModuleType, name: str, form: str, path: Path) -> LayerGraph:
    """One saved form through the product's loader, with the options the CLI would pass."""
    from initaudit.frontends import LoadOptions, load_graph

    shape = tm.INPUT_SHAPES[name]
    if form == "state_dict":
        options = LoadOptions(model_factory=f"sample_models.torch_models:{name}", input_shape=shape)
    elif form == "pt2":
        options = LoadOptions(trust_model=True)  # the program carries its example inputs
    else:
        options = LoadOptions(trust_model=True, input_shape=shape)  # TorchScript has no shapes
    return load_graph(path, options)


@pytest.fixture(scope="module", params=NAMES)
def sample(
    request: pytest.FixtureRequest, tm: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Sample:
    """The sample's ONNX audit and its three saved PyTorch forms (audited lazily, once each)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    module = tm.sample_module(name)
    example = (torch.zeros(tm.INPUT_SHAPES[name]),)
    paths = {form: folder / f"{name}.{ext}" for form, ext in zip(FORMS, ("pt", "pt2", "ts.pt"), strict=True)}
    torch.save(module.state_dict(), paths["state_dict"])
    torch.export.save(torch.export.export(module, example), paths["pt2"])
    torch.jit.save(torch.jit.script(module), paths["torchscript"])
    return Sample(
        name=name,
        onnx=audit_file(SAMPLES / f"{name}.onnx"),
        keys=set(module.state_dict()),
        paths=paths,
        audits={},
    )


def _audit(tm: ModuleType, sample: Sample, form: str) -> AuditResult:
    if form not in sample.audits:
        graph = _load_form(tm, sample.name, form, sample.paths[form])
        sample.audits[form] = audit_graph(graph, str(sample.paths[form]))
    return sample.audits[form]


@pytest.fixture(params=FORMS)
def form(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def pair(tm: ModuleType, sample: Sample, form: str) -> tuple[AuditResult, AuditResult]:
    """(ONNX audit, this form's audit)."""
    return sample.onnx, _audit(tm, sample, form)


# --- comparison helpers -----------------------------------------------------------------------


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float):
        return a == b
    if not isinstance(b, int | float):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def _diffs(label: str, onnx_rows: list[dict[str, Any]], torch_rows: list[dict[str, Any]]) -> list[str]:
    """Every field that differs, as ``label[i].field: onnx value vs torch value``."""
    if len(onnx_rows) != len(torch_rows):
        return [f"{label}: {len(onnx_rows)} in ONNX vs {len(torch_rows)} in torch"]
    out = []
    for i, (a, b) in enumerate(zip(onnx_rows, torch_rows, strict=True)):
        for key in a:
            if not _close(a[key], b.get(key)):
                out.append(f"{label}[{i}].{key}: ONNX {a[key]!r} vs torch {b.get(key)!r}")
    return out


def _ordinal(graph: LayerGraph, name: str) -> str:
    """A layer as ``kind#i`` (its position among layers of its kind); a tensor name as is."""
    if name not in graph:
        return name
    kind = graph[name].kind
    return f"{kind.value}#{[la.name for la in graph if la.kind is kind].index(name)}"


def _linear_rows(result: AuditResult) -> list[dict[str, Any]]:
    rows = []
    for layer in result.graph.linear_layers():
        row: dict[str, Any] = {
            "kind": layer.kind.value,
            "width": layer.width,
            "fan_in": layer.fan_in,
            "fan_out": layer.fan_out,
        }
        for part in ("weight", "bias"):
            stats = getattr(layer, part)
            row[f"{part}.name"] = stats.name if stats else None
            for moment in ("mean", "std", "second_moment", "count"):
                row[f"{part}.{moment}"] = getattr(stats, moment) if stats else None
        rows.append(row)
    return rows


def _tap_rows(result: AuditResult) -> list[dict[str, Any]]:
    keep = ("kind", "width", "mean", "spread", "log_mean", "log_var", "median", "entry_mean", "segment")
    return [{k: getattr(p, k) for k in keep} for p in result.prediction.layers if p.tap]


def _block_rows(result: AuditResult) -> list[dict[str, Any]]:
    graph = result.graph
    rows = []
    for block, pred in zip(graph.residual_blocks(), result.prediction.blocks, strict=True):
        rows.append(
            {
                "branch_layers": len(block.branch),
                "eta": block.eta,
                "gate": block.gate,
                "folded": block.folded,
                "terminal": block.terminal,
                "normalized": block.normalized,
                "last_weight": block.last_weight,
                "gain": pred.gain,
                "factor": pred.factor,
                "add": _ordinal(graph, block.add),
            }
        )
    return rows


def _summary_row(result: AuditResult) -> dict[str, Any]:
    s: Summary = result.prediction.summary
    row = {f.name: getattr(s, f.name) for f in fields(s) if f.name not in ("worst_layer", "unmodeled")}
    row["worst_layer"] = _ordinal(result.graph, s.worst_layer)
    row["unmodeled"] = len(s.unmodeled)
    return row


def _finding_rows(result: AuditResult) -> list[dict[str, Any]]:
    graph = result.graph
    rows = []
    for f in sorted(result.findings, key=lambda f: (f.code, _ordinal(graph, f.location))):
        row: dict[str, Any] = {
            "code": f.code,
            "severity": str(f.severity),
            "location": _ordinal(graph, f.location),
        }
        for key, value in f.evidence.items():
            row[f"evidence.{key}"] = _ordinal(graph, value) if isinstance(value, str) else value
        rows.append(row)
    return rows


def _assert_same(
    label: str, rows: list[dict[str, Any]], other: list[dict[str, Any]], result: AuditResult
) -> None:
    problems = _diffs(label, rows, other)
    extraction = result.graph.meta.get("extraction", "?")
    assert not problems, f"{result.path} (extraction {extraction}):\n" + "\n".join(problems[:25])


# --- the acceptance tests -------------------------------------------------------------------


def test_linear_layer_widths_and_weights(pair):
    onnx_result, torch_result = pair
    _assert_same("linear", _linear_rows(onnx_result), _linear_rows(torch_result), torch_result)


def test_taps_length_statistics(pair):
    onnx_result, torch_result = pair
    _assert_same("tap", _tap_rows(onnx_result), _tap_rows(torch_result), torch_result)


def test_residual_blocks(pair):
    onnx_result, torch_result = pair
    _assert_same("block", _block_rows(onnx_result), _block_rows(torch_result), torch_result)


def test_summary_fm1_fm2_numbers(pair):
    onnx_result, torch_result = pair
    _assert_same("summary", [_summary_row(onnx_result)], [_summary_row(torch_result)], torch_result)


def test_verdicts_and_findings(pair):
    onnx_result, torch_result = pair
    for family in ("fm1", "fm2"):
        assert torch_result.verdict(family) == onnx_result.verdict(family), family
    _assert_same("finding", _finding_rows(onnx_result), _finding_rows(torch_result), torch_result)


_TICKED = re.compile(r"`([^`]+)`")


def test_findings_name_state_dict_keys(pair, sample):
    """Every tensor a finding or fix names is a key of the module's state dict, and the same
    tensors are named as for the ONNX file (whose initializers are named like state-dict keys)."""
    onnx_result, torch_result = pair
    graph = torch_result.graph
    for layer in graph.linear_layers():
        for stats in (layer.weight, layer.bias):
            assert stats is None or stats.name in sample.keys, (layer.name, stats and stats.name)
    for layer in graph:
        constant = layer.attrs.get("constant") if layer.kind is Kind.SCALE else None
        assert constant is None or constant in sample.keys, (layer.name, constant)

    def tensors(result: AuditResult) -> set[str]:
        named = {f.location for f in result.findings if f.location and f.location not in result.graph}
        for f in result.findings:
            named |= {t for t in _TICKED.findall(f"{f.message} {f.fix}") if t not in result.graph}
        return named

    torch_tensors = tensors(torch_result)
    assert torch_tensors <= sample.keys, sorted(torch_tensors - sample.keys)
    assert torch_tensors == tensors(onnx_result)


def test_state_dict_is_really_loaded(tm, tmp_path):
    """The factory's own init (PyTorch default, ~1/6 of He's variance) must not leak into the
    audit: a state dict saved from it gives wide_he_mlp's architecture an FM1 error, while the
    sample's weights pass."""
    torch.manual_seed(0)
    path = tmp_path / "default_init.pt"
    torch.save(tm.wide_he_mlp().state_dict(), path)
    result = audit_graph(_load_form(tm, "wide_he_mlp", "state_dict", path), str(path))
    assert result.verdict("fm1") == "error"
    assert result.prediction.summary.mean_ratio < 0.01
    assert audit_file(SAMPLES / "wide_he_mlp.onnx").verdict("fm1") == "pass"
