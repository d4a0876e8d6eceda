"""``initaudit fix`` under onnxruntime: every fixed sample runs, agrees with onnx's reference
evaluator on the same input, and the fix report shows the smoke run's result."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator
from rich.console import Console

from initaudit.fix.command import fix_one, render_text, report_json

ort = pytest.importorskip("onnxruntime")

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.onnx"))
SMOKE = re.compile(r"onnxruntime ran the fixed model on a random input: outputs (.*), (finite|NOT finite)$")


def _inputs(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """A standard normal draw for each graph input that is not an initializer (symbolic
    dimensions set to 1), read from the model itself rather than from onnxruntime."""
    weights = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        assert tensor.elem_type == onnx.TensorProto.FLOAT  # every sample takes float32
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_fixed_sample_runs_in_onnxruntime_like_the_reference(tmp_path, sample):
    path = tmp_path / sample.name
    shutil.copyfile(sample, path)
    report = fix_one(path)
    if not report.written:  # a passing sample (or FM2 alone): nothing written, nothing run
        assert not report.plan.changes
        assert not any("onnxruntime" in note for note in report.notes)
        return
    model = onnx.load(str(report.target))
    feeds = _inputs(model, seed=1)
    session = ort.InferenceSession(str(report.target), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    want = ReferenceEvaluator(model).run(None, feeds)
    assert len(got) == len(want) == len(model.graph.output)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and np.all(np.isfinite(a))
        # float32 sums in another order, and onnxruntime's fast tanh: a few ulps per layer, relative
        # to the output's scale (measured: at most 1.3e-5 of it, over 30 tanh layers). The fix
        # keeps that scale near the input's, which is what it is for.
        scale = float(np.max(np.abs(b)))
        assert 0.01 < scale < 1e3
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)

    # The smoke run's line: the output shapes onnxruntime gives here, finite, in text and JSON.
    (line,) = [note for note in report.notes if note.startswith("onnxruntime")]
    match = SMOKE.match(line)
    assert match is not None, line
    assert match.group(1) == ", ".join(str(tuple(o.shape)) for o in got) and match.group(2) == "finite"
    console = Console(record=True, width=400, color_system=None)
    render_text(report, console)
    assert f"note: {line}" in console.export_text()
    assert line in report_json(report, "error")["notes"]


def test_a_model_onnxruntime_cannot_run_is_reported_not_raised(tmp_path):
    """The smoke run never fails the fix: onnxruntime's error becomes the note."""
    from initaudit.fix.write_onnx import run_random_input

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    note = run_random_input(broken)
    assert note is not None and note.startswith("onnxruntime could not run the fixed model: ")
