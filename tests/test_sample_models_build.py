"""sample_models/build.py: valid, deterministic, committed files current, weights as documented."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _load_build() -> ModuleType:
    # sample_models is a folder of data, not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("sample_models_build", SAMPLES / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = build.build_all(tmp_path_factory.mktemp("samples"))
    return {p.stem: p for p in paths}


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _hidden(weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [w for name, w in weights.items() if name.startswith("fc") and name.endswith(".weight")]


def test_every_model_is_written_and_valid(built: dict[str, Path]) -> None:
    assert list(built) == list(build.MODELS)
    for name, path in built.items():
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(path)
        assert model.ir_version == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
        assert model.producer_name == "initaudit-samples"
        for value in (model.graph.input[0], model.graph.output[0]):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", name
        assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)
        assert path.stat().st_size < 2_500_000, name


def test_rebuild_is_byte_identical(built: dict[str, Path], tmp_path: Path) -> None:
    for path in build.build_all(tmp_path):
        assert path.read_bytes() == built[path.stem].read_bytes(), path.name


def test_committed_files_match_a_fresh_build(built: dict[str, Path]) -> None:
    committed = {p.stem for p in SAMPLES.glob("*.onnx")}
    assert committed == set(built), "run: python sample_models/build.py"
    for name, path in built.items():
        assert (SAMPLES / f"{name}.onnx").read_bytes() == path.read_bytes(), name


def test_readme_lists_every_file() -> None:
    readme = (SAMPLES / "README.md").read_text()
    for name in build.MODELS:
        assert f"`{name}.onnx`" in readme


def _assert_std(w: np.ndarray, std: float) -> None:
    # Sample std of N Gaussian draws has standard error std / sqrt(2N).
    se = std / math.sqrt(2 * w.size)
    assert abs(float(np.std(w.astype(np.float64))) - std) < 3 * se
    assert abs(float(np.mean(w))) < 3 * std / math.sqrt(w.size)


def test_xavier_weights(built: dict[str, Path]) -> None:
    hidden = _hidden(_weights(built["deep_xavier_mlp"]))
    assert len(hidden) == 20 and all(w.shape == (128, 128) for w in hidden)
    _assert_std(np.concatenate([w.ravel() for w in hidden]), math.sqrt(1 / 128))


def test_he_weights(built: dict[str, Path]) -> None:
    weights = _weights(built["wide_he_mlp"])
    hidden = _hidden(weights)
    assert [w.shape for w in hidden] == [(64, 256)] + [(256, 256)] * 7
    for w in hidden:
        _assert_std(w, math.sqrt(2 / w.shape[0]))
    assert weights["head.weight"].shape == (256, 10)
    assert not any(np.any(b) for n, b in weights.items() if n.endswith(".bias"))
    narrow = _hidden(_weights(built["deep_narrow_he_mlp"]))
    assert len(narrow) == 50
    _assert_std(np.concatenate([w.ravel() for w in narrow]), math.sqrt(2 / 16))


def test_pytorch_default_weights(built: dict[str, Path]) -> None:
    weights = _weights(built["deep_pytorch_default_mlp"])
    bound = 1 / math.sqrt(128)
    w = np.concatenate([x.ravel() for x in _hidden(weights)]).astype(np.float64)
    assert np.abs(w).max() <= bound
    # Uniform(-b, b): variance b^2/3 = 1/(3 fan_in); Var(w^2) = 4 b^4 / 45.
    se = math.sqrt(4 * bound**4 / 45 / w.size)
    assert abs(float(np.mean(w**2)) - bound**2 / 3) < 3 * se
    biases = [b for n, b in weights.items() if n.endswith(".bias")]
    assert len(biases) == 13 and all(np.abs(b).max() <= bound and np.any(b) for b in biases)


def test_residual_models(built: dict[str, Path]) -> None:
    unscaled, scaled = _weights(built["residual_mlp_unscaled"]), _weights(built["residual_mlp_scaled"])
    assert sum(n.endswith(".eta") for n in unscaled) == 0
    etas = [v for n, v in scaled.items() if n.endswith(".eta")]
    assert len(etas) == 50 and all(v.shape == () and v == np.float32(1 / math.sqrt(50)) for v in etas)
    branch = [w for n, w in scaled.items() if n.startswith("blocks.") and n.endswith(".weight")]
    assert len(branch) == 100
    _assert_std(np.concatenate([w.ravel() for w in branch]), math.sqrt(2 / 64))
    ops = [n.op_type for n in onnx.load(built["residual_mlp_scaled"]).graph.node]
    assert ops.count("Mul") == 50 and ops.count("MatMul") == 102


def test_cnn(built: dict[str, Path]) -> None:
    model = onnx.load(built["small_he_cnn_bn"])
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for i, shape in enumerate([(16, 3, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3)], start=1):
        w = weights[f"conv{i}.weight"]
        assert w.shape == shape
        assert np.all(weights[f"bn{i}.weight"] == 1) and np.all(weights[f"bn{i}.running_var"] == 1)
        assert not np.any(weights[f"bn{i}.bias"]) and not np.any(weights[f"bn{i}.running_mean"])
    _assert_std(weights["conv3.weight"], math.sqrt(2 / (32 * 9)))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}["transB"] == 1
    assert weights["fc.weight"].shape == (10, 32)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 3 and ops.count("MaxPool") == 1
