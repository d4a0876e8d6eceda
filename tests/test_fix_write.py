"""Writing fixed models: what changes, what stays byte-identical, and failures that leave
nothing behind."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from initaudit import atomic
from initaudit.audit import audit_file
from initaudit.errors import LoadError, UsageError
from initaudit.fix.command import fix_one
from initaudit.fix.plan import FixPlan, TensorChange
from initaudit.fix.write_onnx import OnnxWriter, cast_back
from initaudit.frontends import LoadOptions
from initaudit.rules import Severity

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def _copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / f"{name}.onnx"
    shutil.copyfile(SAMPLES / f"{name}.onnx", target)
    return target


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(atomic.TEMP_SUFFIX)]


def _fixable_failing_samples() -> list[str]:
    """Samples that fail `check` for a reason other than FM2 (which weights cannot fix)."""
    names = []
    for path in sorted(SAMPLES.glob("*.onnx")):
        result = audit_file(path)
        failing = {f.code for f in result.findings if f.severity >= Severity.ERROR}
        if failing and failing != {"IA201"}:
            names.append(path.stem)
    return names


FIXABLE = _fixable_failing_samples()


def test_the_fixable_samples_are_the_expected_ones():
    assert set(FIXABLE) >= {
        "deep_xavier_mlp",
        "deep_pytorch_default_mlp",
        "deep_tanh_xavier_mlp",
        "residual_mlp_unscaled",
    }


@pytest.mark.parametrize("name", FIXABLE)
def test_fixed_sample_passes(tmp_path, name):
    path = _copy(tmp_path, name)
    before = _fingerprint(path)
    report = fix_one(path)
    assert report.written == [tmp_path / f"{name}.fixed.onnx"]
    after = audit_file(report.target)
    assert not after.fails(Severity.ERROR), [f.message for f in after.findings]
    assert after.verdict("fm1") == "pass" and after.verdict("fm2") == "pass"
    assert report.after.verdict("fm1") == "pass"  # what the command reported is the re-audit
    # What --dry-run predicts is what the written file audits to (float32 rounding apart).
    predicted, written = report.plan.predicted.prediction.summary, after.prediction.summary
    assert written.mean_ratio == pytest.approx(predicted.mean_ratio, rel=1e-4)
    assert written.log_var == pytest.approx(predicted.log_var, rel=1e-4)
    assert _fingerprint(path) == before  # the input's bytes and mtime
    assert _leftovers(tmp_path) == []


def test_only_changed_tensors_differ_byte_for_byte(tmp_path):
    path = _copy(tmp_path, "deep_pytorch_default_mlp")
    report = fix_one(path)
    original, fixed = onnx.load(str(path)), onnx.load(str(report.target))
    changed = report.plan.by_tensor()
    old = {t.name: t for t in original.graph.initializer}
    new = {t.name: t for t in fixed.graph.initializer}
    assert list(old) == list(new)  # same initializers, same order
    unchanged = [name for name in old if name not in changed]
    assert "head.weight" in unchanged and "fc1.bias" in unchanged
    for name in unchanged:
        assert old[name].SerializeToString() == new[name].SerializeToString(), name
    for field in ("opset_import", "metadata_props"):
        assert [x.SerializeToString() for x in getattr(original, field)] == [
            x.SerializeToString() for x in getattr(fixed, field)
        ]
    for field in ("doc_string", "ir_version", "producer_name", "producer_version", "domain", "model_version"):
        assert getattr(original, field) == getattr(fixed, field)
    for field in ("node", "input", "output", "value_info"):
        assert [x.SerializeToString() for x in getattr(original.graph, field)] == [
            x.SerializeToString() for x in getattr(fixed.graph, field)
        ]
    assert (original.graph.name, original.graph.doc_string) == (fixed.graph.name, fixed.graph.doc_string)
    # The changed tensors: same name, type and dims; values old * factor in float64, cast once.
    for name, change in changed.items():
        a, b = old[name], new[name]
        assert (a.name, a.data_type, list(a.dims)) == (b.name, b.data_type, list(b.dims))
        expected = (numpy_helper.to_array(a).astype(np.float64) * change.factor).astype(np.float32)
        np.testing.assert_array_equal(numpy_helper.to_array(b), expected)
    # Put the original tensors back: the whole file is the input, byte for byte.
    for name in changed:
        new[name].CopyFrom(old[name])
    assert fixed.SerializeToString() == path.read_bytes()


def _external(tmp_path: Path, name: str) -> Path:
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location="model.onnx.data", size_threshold=0,
    )  # fmt: skip
    return path


def test_external_data_goes_to_a_fresh_file(tmp_path):
    path = _external(tmp_path, "deep_xavier_mlp")
    data = path.with_name("model.onnx.data")
    before = [_fingerprint(path), _fingerprint(data)]
    report = fix_one(path)
    fresh = path.with_name("model.fixed.onnx.data")
    assert report.written == [fresh, path.with_name("model.fixed.onnx")]
    assert [_fingerprint(path), _fingerprint(data)] == before
    fixed = onnx.load(str(report.target), load_external_data=False)
    locations = {e.value for t in fixed.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {fresh.name}
    old = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(report.target)).graph.initializer}
    for name in old:
        change = report.plan.by_tensor().get(name)
        if change is None:
            assert old[name].tobytes() == new[name].tobytes(), name
        else:
            np.testing.assert_array_equal(
                new[name], (old[name].astype(np.float64) * change.factor).astype(np.float32)
            )
    assert not audit_file(report.target).fails(Severity.ERROR)
    # A second run finds the data file: it is never appended to, and replaced only with --force.
    (tmp_path / "ext" / "other.onnx.data").write_bytes(b"keep")
    with pytest.raises(UsageError, match="--force"):
        fix_one(path, output=tmp_path / "ext" / "other.onnx")
    assert (tmp_path / "ext" / "other.onnx.data").read_bytes() == b"keep"
    assert not (tmp_path / "ext" / "other.onnx").exists()


def _typed(tmp_path: Path, name: str, data_type: int) -> Path:
    """A sample with every initializer and the graph's I/O in ``data_type``."""
    model = onnx.load(str(SAMPLES / f"{name}.onnx"))
    np_type = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}[data_type]
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np_type), t.name))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.elem_type = data_type
    path = tmp_path / f"{name}_{TensorProto.DataType.Name(data_type).lower()}.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("data_type", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_tensors_are_cast_back(tmp_path, data_type):
    path = _typed(tmp_path, "deep_xavier_mlp", data_type)
    np_type = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}[data_type]
    report = fix_one(path)
    assert len(report.plan.changes) == 20
    old = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    new = {t.name: t for t in onnx.load(str(report.target)).graph.initializer}
    for name, change in report.plan.by_tensor().items():
        assert new[name].data_type == data_type
        # ml_dtypes rounds to nearest even, independently of initaudit's bit arithmetic.
        expected = (numpy_helper.to_array(old[name]).astype(np.float64) * change.factor).astype(np_type)
        assert numpy_helper.to_array(new[name]).tobytes() == expected.tobytes()
    assert not audit_file(report.target).fails(Severity.ERROR)


def test_a_tensor_that_cannot_be_cast_back_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(LoadError, match="float16"):
        cast_back(np.array([1e6]), TensorProto.FLOAT16, "w", tmp_path / "m.onnx")
    # An int64 initializer in a plan: refused before anything is written.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    shape = numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape])
    path = tmp_path / "int.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    plan = FixPlan(before=audit_file(path), changes=[TensorChange("shape", 1.0, 2.0, 2.0, "test", "IA103")])
    with pytest.raises(LoadError, match="int64"):
        OnnxWriter(path).validate(plan)
    import initaudit.fix.command as command

    monkeypatch.setattr(
        command, "build_plan", lambda result, **kw: FixPlan(result, plan.changes, predicted=result)
    )
    with pytest.raises(LoadError, match="int64"):
        fix_one(path)
    assert not path.with_name("int.fixed.onnx").exists() and _leftovers(tmp_path) == []


def test_onnxruntime_smoke_run_where_installed(tmp_path, monkeypatch):
    """onnxruntime is optional: a stand-in built on onnx.reference shows the fixed model is run."""
    import types

    from onnx.reference import ReferenceEvaluator

    class Session:
        def __init__(self, path, providers=None):
            self.model = onnx.load(path)
            self.ref = ReferenceEvaluator(self.model)

        def get_inputs(self):
            return [
                types.SimpleNamespace(
                    name=vi.name,
                    shape=[d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim],
                    type="tensor(float)",
                )
                for vi in self.model.graph.input
            ]

        def run(self, names, feeds):
            return self.ref.run(names, feeds)

    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=Session))
    report = fix_one(_copy(tmp_path, "deep_xavier_mlp"))
    assert "onnxruntime ran the fixed model on a random input: outputs (1, 10), finite" in report.notes


# ----------------------------------------------------------------------------- failures


def test_existing_output_needs_force(tmp_path):
    path = _copy(tmp_path, "deep_xavier_mlp")
    target = tmp_path / "deep_xavier_mlp.fixed.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(UsageError, match="--force"):
        fix_one(path)
    assert target.read_bytes() == b"precious"
    fix_one(path, force=True)
    assert not audit_file(target).fails(Severity.ERROR)


def test_output_that_is_the_input_needs_in_place(tmp_path):
    path = _copy(tmp_path, "deep_xavier_mlp")
    before = _fingerprint(path)
    with pytest.raises(UsageError, match="--in-place"):
        fix_one(path, output=path, force=True)
    assert _fingerprint(path) == before


def _blocks_writes(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return True
    probe.unlink()
    return False


def test_read_only_directory(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes through read-only permissions")
    folder = tmp_path / "ro"
    folder.mkdir()
    path = _copy(folder, "deep_xavier_mlp")
    before = _fingerprint(path)
    folder.chmod(0o555)
    try:
        if not _blocks_writes(folder):
            pytest.skip("chmod does not block writes here")
        with pytest.raises(LoadError, match="permission denied"):
            fix_one(path)
        assert sorted(p.name for p in folder.iterdir()) == ["deep_xavier_mlp.onnx"]
    finally:
        folder.chmod(0o755)
    assert _fingerprint(path) == before


def test_unwritable_directory_simulated(tmp_path, monkeypatch):
    path = _copy(tmp_path, "deep_xavier_mlp")
    before = _fingerprint(path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    with pytest.raises(LoadError, match="permission denied"):
        fix_one(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep_xavier_mlp.onnx"]
    assert _fingerprint(path) == before


def _fail_mid_file(monkeypatch, after_bytes: int = 1000) -> None:
    """The disk fills up after ``after_bytes`` of a file: part of a chunk is written, then ENOSPC."""
    real = atomic._Sink.write

    def write(self, data):
        if self.written + len(memoryview(data)) > after_bytes:
            real(self, memoryview(data)[: max(after_bytes - self.written, 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(atomic._Sink, "write", write)


@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_mid_file_leaves_nothing(tmp_path, monkeypatch, existing):
    path = _copy(tmp_path, "deep_xavier_mlp")
    target = tmp_path / "deep_xavier_mlp.fixed.onnx"
    if existing:
        target.write_bytes(b"the old output")
    before = _fingerprint(path)
    _fail_mid_file(monkeypatch)
    with pytest.raises(LoadError, match="no space left"):
        fix_one(path, force=existing)
    assert _fingerprint(path) == before
    assert _leftovers(tmp_path) == []
    if existing:
        assert target.read_bytes() == b"the old output"
    else:
        assert not target.exists()


def test_fsync_failure_leaves_nothing(tmp_path, monkeypatch):
    path = _copy(tmp_path, "residual_mlp_unscaled")
    before = _fingerprint(path)

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(LoadError, match="no space left"):
        fix_one(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert _fingerprint(path) == before


def test_rename_failure_with_external_data_undoes_the_data_file(tmp_path, monkeypatch):
    path = _external(tmp_path, "deep_xavier_mlp")
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".onnx"):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(LoadError):
        fix_one(path)
    assert len(calls) == 2  # the data file went first, then the model failed
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_in_place_keeps_the_mode(tmp_path):
    path = _copy(tmp_path, "deep_xavier_mlp")
    path.chmod(0o640)
    report = fix_one(path, in_place=True)
    assert report.target == path.resolve()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not audit_file(path).fails(Severity.ERROR)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_output_gets_the_source_mode(tmp_path):
    path = _copy(tmp_path, "deep_xavier_mlp")
    path.chmod(0o604)
    report = fix_one(path)
    assert stat.S_IMODE(report.target.stat().st_mode) == 0o604


def test_redraw_is_seeded_and_has_the_planned_std(tmp_path):
    path = _copy(tmp_path, "deep_xavier_mlp")
    first = fix_one(path, output=tmp_path / "a.onnx", redraw=True, seed=3)
    again = fix_one(path, output=tmp_path / "b.onnx", redraw=True, seed=3)
    other = fix_one(path, output=tmp_path / "c.onnx", redraw=True, seed=4)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "c.onnx").read_bytes()
    weights = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "a.onnx")).graph.initializer
    }
    for change in first.plan.changes:
        w = weights[change.tensor].astype(np.float64)
        # The sample std of N = 16384 Gaussian draws has relative standard error 1/sqrt(2N).
        se = 1 / math.sqrt(2 * w.size)
        assert abs(w.std() / change.draw_std - 1) < 5 * se
        assert abs(w.mean()) < 5 * change.draw_std / math.sqrt(w.size)
    assert not again.after.fails(Severity.ERROR) and not other.after.fails(Severity.ERROR)


# ----------------------------------------------------------------------------- PyTorch and safetensors

torch = pytest.importorskip("torch")


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # `--model sample_models.torch_models:...` imports from the working directory


FACTORY = "sample_models.torch_models:deep_pytorch_default_mlp"


def _sample_state() -> dict:
    from sample_models.torch_models import sample_module

    return sample_module("deep_pytorch_default_mlp").state_dict()


def test_state_dict_round_trip_keeps_keys_and_wrappers(tmp_path, at_root):
    state = _sample_state()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    before = _fingerprint(path)
    report = fix_one(path, options=LoadOptions(model_factory=FACTORY))
    assert report.target == tmp_path / "ckpt.fixed.pth"
    out = torch.load(report.target, map_location="cpu", weights_only=True)
    assert out["epoch"] == 7 and list(out["state_dict"]) == [f"module.{k}" for k in state]
    changes = report.plan.by_tensor()
    for key, value in state.items():
        got = out["state_dict"][f"module.{key}"]
        assert got.dtype == value.dtype
        change = changes.get(key)
        if change is None:
            assert torch.equal(got, value), key
        else:
            expected = (value.double() * change.factor).float()
            assert torch.equal(got, expected), key
    assert not report.after.fails(Severity.ERROR) and report.after.verdict("fm1") == "pass"
    assert _fingerprint(path) == before


def test_tied_tensors_are_changed_together(tmp_path):
    from initaudit.fix.write_torch import TorchWriter

    shared = torch.randn(4, 4)
    path = tmp_path / "tied.pt"
    torch.save({"embed.weight": shared, "head.weight": shared, "other": torch.randn(3)}, path)
    writer = TorchWriter(path, "torch-zip", LoadOptions())
    plan = FixPlan(before=None, changes=[TensorChange("head.weight", 1.0, 2.0, 2.0, "test", "IA103")])  # type: ignore[arg-type]
    writer.write(plan, tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(out["head.weight"], shared * 2)
    assert out["embed.weight"].data_ptr() == out["head.weight"].data_ptr()
    assert any("tied" in note for note in writer.notes)


def _save_safetensors(
    tensors: dict[str, np.ndarray], path: Path, dtypes: dict[str, str] | None = None
) -> None:
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        dtype = (dtypes or {}).get(name, "F32")
        if dtype == "BF16":
            raw = np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16).tobytes()
        else:
            raw = np.asarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(np.shape(array)),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_round_trip_is_byte_identical_outside_the_changes(tmp_path, at_root):
    state = {k: v.numpy() for k, v in _sample_state().items()}
    path = tmp_path / "model.safetensors"
    _save_safetensors(state, path)
    before = _fingerprint(path)
    report = fix_one(path, options=LoadOptions(model_factory=FACTORY))
    assert report.target == tmp_path / "model.fixed.safetensors"
    from initaudit.frontends.safetensors_file import SafetensorsFile

    src, out = SafetensorsFile(path), SafetensorsFile(report.target)
    raw_in, raw_out = path.read_bytes(), report.target.read_bytes()
    assert raw_in[: src.data_start] == raw_out[: out.data_start]  # header and metadata
    changes = report.plan.by_tensor()
    for name, info in src.tensors.items():
        a = raw_in[src.data_start + info.begin : src.data_start + info.end]
        b = raw_out[out.data_start + info.begin : out.data_start + info.end]
        if name in changes:
            expected = (state[name].astype(np.float64) * changes[name].factor).astype("<f4")
            if changes[name].action == "zero":
                expected = np.zeros_like(expected)  # +0.0, not old * 0 (which keeps signs)
            assert b == expected.tobytes(), name
        else:
            assert a == b, name
    assert not report.after.fails(Severity.ERROR)
    assert _fingerprint(path) == before


def test_safetensors_writer_needs_no_torch_and_rounds_bf16(tmp_path):
    values = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    path = tmp_path / "w.safetensors"
    _save_safetensors({"a.weight": values, "b.weight": values}, path, {"a.weight": "BF16"})
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
from pathlib import Path
from initaudit.fix.plan import FixPlan, TensorChange
from initaudit.fix.write_safetensors import SafetensorsWriter
plan = FixPlan(before=None, changes=[TensorChange("a.weight", 1.0, 1.3, 1.3, "t", "IA103")])
SafetensorsWriter(Path({str(path)!r})).write(plan, Path({str(tmp_path / "out.safetensors")!r}))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    from initaudit.frontends.safetensors_file import SafetensorsFile

    out = SafetensorsFile(tmp_path / "out.safetensors")
    stored = values.astype(ml_dtypes.bfloat16).astype(np.float64)
    expected = (stored * 1.3).astype(ml_dtypes.bfloat16)
    assert out.raw("a.weight").tobytes() == expected.tobytes()
    np.testing.assert_array_equal(out.array("b.weight"), values)


def test_disk_full_writing_safetensors_leaves_nothing(tmp_path, monkeypatch, at_root):
    path = tmp_path / "model.safetensors"
    _save_safetensors({k: v.numpy() for k, v in _sample_state().items()}, path)
    before = _fingerprint(path)
    _fail_mid_file(monkeypatch, after_bytes=300_000)
    with pytest.raises(LoadError, match="no space left"):
        fix_one(path, options=LoadOptions(model_factory=FACTORY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert _fingerprint(path) == before


def test_pickled_module_gives_a_state_dict_and_its_proof(tmp_path, at_root):
    from sample_models.torch_models import sample_module

    path = tmp_path / "whole.pt"
    torch.save(sample_module("deep_xavier_mlp"), path)
    with pytest.raises(LoadError, match="--trust-model"):
        fix_one(path)
    report = fix_one(path, options=LoadOptions(trust_model=True))
    assert report.target == tmp_path / "whole.fixed.pt"
    state = torch.load(report.target, weights_only=True)
    assert isinstance(state, dict) and "fc1.weight" in state
    assert any("state dict" in note for note in report.notes)
    assert report.after.computable and report.after.verdict("fm1") == "pass"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save, to build the input
def test_torchscript_gives_a_state_dict_audited_in_its_architecture(tmp_path, at_root):
    from sample_models.torch_models import INPUT_SHAPES, sample_module

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(sample_module("residual_mlp_unscaled")), str(path))
    options = LoadOptions(trust_model=True, input_shape=tuple(INPUT_SHAPES["residual_mlp_unscaled"]))
    report = fix_one(path, options=options)
    assert report.target == tmp_path / "scripted.fixed.pt" and len(report.plan.changes) == 50
    assert set(torch.load(report.target, weights_only=True)) >= {c.tensor for c in report.plan.changes}
    blocks = len(report.before.prediction.blocks)
    assert report.after.prediction.summary.mean_ratio == pytest.approx((1 + 1 / blocks) ** blocks, rel=1e-5)
