"""The command line through typer's CliRunner and as a real process: exit codes, JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from initaudit import __version__
from initaudit.cli import app, main
from initaudit.report.json_report import SCHEMA
from initaudit.rules import RULES

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"initaudit {__version__}"


def test_passing_model_exits_zero(samples):
    result = run("check", str(samples / "wide_he_mlp.onnx"))
    assert result.exit_code == 0, result.output
    assert "FM1 mean length" in result.stdout and "PASS" in result.stdout


def test_failing_model_exits_one_and_names_the_fix(samples):
    result = run("check", str(samples / "deep_xavier_mlp.onnx"))
    assert result.exit_code == 1
    assert "IA101" in result.stdout
    assert "multiply `" in result.stdout


def test_fail_on_and_exit_zero(samples):
    path = str(samples / "deep_xavier_mlp.onnx")
    assert run("check", path, "--exit-zero").exit_code == 0
    # Ignoring the IA1 family drops the FM1 error and the IA103 warnings alike.
    assert run("check", path, "--ignore", "IA1").exit_code == 0
    assert run("check", path, "--ignore", "IA1", "--fail-on", "warning").exit_code == 0
    assert run("check", path, "--select", "IA103", "--fail-on", "warning").exit_code == 1


def test_json_output_carries_every_number(samples):
    result = run("check", str(samples / "residual_mlp_scaled.onnx"), "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == SCHEMA and doc["version"] == __version__
    (report,) = doc["reports"]
    assert report["verdicts"] == {"fm1": "pass", "fm2": "pass"}
    s = report["summary"]
    for key in ("mean_ratio", "beta", "second_ratio", "median", "var_hat", "log_var", "sum_eta2", "depth"):
        assert key in s
    assert len(report["residual_blocks"]) == 50
    eta = report["residual_blocks"][0]["eta"]
    assert eta == pytest.approx(50**-0.5, rel=0.02)  # the gate times the folded weight scale
    assert s["mean_ratio"] == pytest.approx(2.6916, rel=0.1)  # sampled weights, not the law
    assert any(layer["weight"] and layer["weight"]["scheme"] for layer in report["layers"])


def test_json_findings_have_codes_and_fingerprints(samples):
    result = run("check", str(samples / "deep_narrow_he_mlp.onnx"), "--format", "json")
    assert result.exit_code == 1
    (report,) = json.loads(result.stdout)["reports"]
    codes = {f["code"] for f in report["findings"]}
    assert "IA201" in codes
    for f in report["findings"]:
        assert len(f["fingerprint"]) == 16 and f["severity"] in ("info", "warning", "error")
    assert report["counts"]["error"] >= 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"\x00\x01garbage\xff" * 10, ""),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "git lfs pull"),
    ],
)
def test_bad_input_is_one_line_and_exit_two(tmp_path, content, problem):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    result = run("check", str(path))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and problem.lower() in lines[0].lower()
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == ([path] if content is not None else [])  # nothing written


def test_truncated_model_exits_two(tmp_path, samples):
    data = (samples / "small_he_cnn_bn.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert run("check", str(path)).exit_code == 2


def test_usage_errors_exit_two(samples):
    assert run("check", str(samples / "wide_he_mlp.onnx"), "--select", "XX9").exit_code == 2
    assert run("check", str(samples / "wide_he_mlp.onnx"), "--input-shape", "a,b").exit_code == 2
    assert run("check", str(samples / "wide_he_mlp.onnx"), "--fail-on", "sometimes").exit_code == 2
    assert run("explain", "IA999").exit_code == 2


def test_rules_and_explain():
    listed = run("rules", "--format", "json")
    assert listed.exit_code == 0
    assert [r["code"] for r in json.loads(listed.stdout)] == list(RULES)
    for code in RULES:
        result = run("explain", code.lower())
        assert result.exit_code == 0 and result.stdout.startswith(code)


def test_main_returns_exit_codes_without_raising(samples):
    assert main(["check", str(samples / "wide_he_mlp.onnx"), "-q"]) == 0
    assert main(["check", str(samples / "deep_xavier_mlp.onnx"), "-q"]) == 1
    assert main(["check", "/nonexistent/model.onnx"]) == 2
    assert main(["check", "--no-such-option"]) == 2


def test_real_process_and_no_torch_import(samples):
    # The analytic path must not import torch (nor onnx2torch): check as a real process.
    code = (
        "import sys; from initaudit.cli import main; rc = main(['check', sys.argv[1], '-q']); "
        "bad = [m for m in ('torch', 'onnx2torch', 'torchvision') if m in sys.modules]; "
        "print('IMPORTED', bad) if bad else None; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(samples / "small_he_cnn_bn.onnx")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IMPORTED" not in done.stdout
    module = subprocess.run([sys.executable, "-m", "initaudit", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and __version__ in module.stdout
