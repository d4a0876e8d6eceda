"""`initaudit fix` and `initaudit check --fix` end to end, through the CLI entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from initaudit.audit import audit_file
from initaudit.cli import main
from initaudit.rules import Severity

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def _copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / f"{name}.onnx"
    shutil.copyfile(SAMPLES / f"{name}.onnx", target)
    return target


def _failing(fm2_only: bool) -> list[str]:
    names = []
    for path in sorted(SAMPLES.glob("*.onnx")):
        failing = {f.code for f in audit_file(path).findings if f.severity >= Severity.ERROR}
        if failing and (failing == {"IA201"}) == fm2_only:
            names.append(path.stem)
    return names


FIXABLE, FM2_ONLY = _failing(False), _failing(True)


def test_samples_split_as_expected():
    assert {
        "deep_xavier_mlp",
        "deep_pytorch_default_mlp",
        "deep_tanh_xavier_mlp",
        "residual_mlp_unscaled",
    } <= set(FIXABLE)
    assert FM2_ONLY == ["deep_narrow_he_mlp"]


@pytest.mark.parametrize("name", FIXABLE)
def test_fix_then_check_passes(tmp_path, capsys, name):
    path = _copy(tmp_path, name)
    assert main(["check", str(path), "-q"]) == 1
    assert main(["fix", str(path), "-q"]) == 0
    fixed = tmp_path / f"{name}.fixed.onnx"
    capsys.readouterr()
    assert main(["check", str(fixed), "-q"]) == 0, capsys.readouterr().out
    assert main(["check", str(fixed), "--fail-on", "warning", "-q"]) == 0, capsys.readouterr().out


def test_check_fix_writes_the_named_output(tmp_path, capsys):
    path = _copy(tmp_path, "deep_xavier_mlp")
    out = tmp_path / "out.onnx"
    assert main(["check", str(path), "--fix", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Fix plan: 20 tensor(s)" in text and "Before and after" in text and "re-audit" in text
    assert main(["check", str(out), "-q"]) == 0


def test_fm2_says_why_and_exits_1(tmp_path, capsys):
    path = _copy(tmp_path, "deep_narrow_he_mlp")
    out = tmp_path / "out.onnx"
    assert main(["check", str(path), "--fix", "-o", str(out)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "cannot be fixed by weights" in text
    assert "width >= 54" in text and "at most 11 layers" in text
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_several_models_with_one_output_is_a_usage_error(tmp_path, capsys):
    a, b = _copy(tmp_path, "deep_xavier_mlp"), _copy(tmp_path, "deep_tanh_xavier_mlp")
    assert main(["fix", str(a), str(b), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "-o names one output" in capsys.readouterr().err
    assert main(["fix", str(a), str(b), "-q"]) == 0  # each beside its input
    assert (tmp_path / "deep_xavier_mlp.fixed.onnx").exists()
    assert (tmp_path / "deep_tanh_xavier_mlp.fixed.onnx").exists()


def test_dry_run_writes_nothing_and_exits_by_the_prediction(tmp_path, capsys):
    fixable, narrow = _copy(tmp_path, "residual_mlp_unscaled"), _copy(tmp_path, "deep_narrow_he_mlp")
    listing = sorted(tmp_path.iterdir())
    assert main(["fix", str(fixable), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: would write" in text and "after (predicted)" in text and "IA301" in text
    assert main(["fix", str(narrow), "--dry-run", "-q"]) == 1
    assert sorted(tmp_path.iterdir()) == listing


def test_json_report(tmp_path, capsys):
    path = _copy(tmp_path, "deep_pytorch_default_mlp")
    assert main(["fix", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "initaudit.fix/1" and doc["exit_code"] == 0
    (entry,) = doc["files"]
    assert (
        entry["output"].endswith("deep_pytorch_default_mlp.fixed.onnx") and entry["after_kind"] == "written"
    )
    changes = entry["plan"]["changes"]
    assert len(changes) == 22
    assert {c["code"] for c in changes} == {"IA103", "IA104"}
    assert all(c["factor"] == 0 and c["action"] == "zero" for c in changes if c["code"] == "IA104")
    assert entry["before"]["verdicts"]["fm1"] == "error"
    assert entry["after"]["verdicts"] == {"fm1": "pass", "fm2": "pass"}
    # The after report is the re-audit of the written file.
    assert entry["after"]["summary"]["mean_ratio"] == pytest.approx(
        audit_file(tmp_path / "deep_pytorch_default_mlp.fixed.onnx").prediction.summary.mean_ratio
    )


def test_existing_output_exits_2_without_force(tmp_path, capsys):
    path = _copy(tmp_path, "deep_xavier_mlp")
    out = tmp_path / "deep_xavier_mlp.fixed.onnx"
    out.write_bytes(b"keep me")
    assert main(["fix", str(path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["fix", str(path), "--force", "-q"]) == 0
    assert main(["check", str(out), "-q"]) == 0


def test_residual_scale_zero(tmp_path, capsys):
    path = _copy(tmp_path, "residual_mlp_unscaled")
    assert main(["fix", str(path), "--residual-scale", "zero", "-q"]) == 0
    fixed = audit_file(tmp_path / "residual_mlp_unscaled.fixed.onnx")
    assert fixed.verdict("fm1") == "pass"
    assert not any(f.code in ("IA302", "IA502") for f in fixed.findings)
    assert fixed.prediction.summary.sum_eta2 == 0


def test_in_place(tmp_path, capsys):
    path = _copy(tmp_path, "deep_tanh_xavier_mlp")
    assert main(["check", str(path), "--fix", "--in-place", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert main(["check", str(path), "-q"]) == 0


def test_fix_options_need_fix_on_check(tmp_path, capsys):
    path = _copy(tmp_path, "deep_xavier_mlp")
    assert main(["check", str(path), "--dry-run"]) == 2


def test_fixing_onnx_never_imports_torch(tmp_path):
    path = _copy(tmp_path, "deep_xavier_mlp")
    script = (
        "import sys\n"
        "from initaudit.cli import main\n"
        f"code = main(['fix', {str(path)!r}, '-q'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
