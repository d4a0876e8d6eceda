"""`check --mc`: measured numbers beside the predicted ones, end to end through the CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("torch")

from initaudit.cli import main


def _report(capsys, *args: str) -> tuple[int, dict]:
    code = main(["check", *args, "--format", "json"])
    out = capsys.readouterr()
    return code, json.loads(out.out)["reports"][0]


def test_shortcut_measures_the_narrow_deep_sample_like_theory(samples, capsys):
    """FM2's sample: depth 50, width 16. The median (1.3e-4 of the mean) and E ln M are compared,
    not the mean: M_L is far too heavy-tailed at L/n ~ 3 for a sample mean (THEORY's caution)."""
    code, report = _report(capsys, str(samples / "deep_narrow_he_mlp.onnx"), "--mc", "4000")
    mc = report["monte_carlo"]
    assert mc["engine"] == "shortcut" and mc["samples"] == 4000 and mc["resample"] == "gaussian"
    last = [layer for layer in report["layers"] if layer["tap"]][-1]
    measured = last["measured"]
    assert abs(measured["log_mean"] - last["log_mean"]) < 4 * measured["log_mean_se"]
    assert abs(measured["median"] - last["median"]) < 4 * measured["median_se"]
    assert not [f for f in report["findings"] if f["code"] == "IA401"]
    assert code == 1  # the FM2 error stands
    # Var ln M ~ 21 here: the second moments' standard errors are marked approximate
    assert measured["log_var"] > 0.25
    assert any(note.startswith("second moments") and "approximate" in note for note in mc["notes"])


def test_ensemble_runs_the_residual_onnx_sample_through_onnx2torch(samples, capsys):
    if importlib.util.find_spec("onnx2torch") is None:  # importing it needs the bridge's torchvision stub
        pytest.skip("onnx2torch is not installed")
    code, report = _report(capsys, str(samples / "residual_mlp_scaled.onnx"), "--mc", "300", "--seed", "3")
    mc = report["monte_carlo"]
    assert mc["engine"] == "ensemble" and any("onnx2torch" in note for note in mc["notes"])
    taps = [layer for layer in report["layers"] if layer["tap"]]
    last = taps[-1]["measured"]
    # (1 + 1/50)^50 = 2.69 in mean; the spread is small here (L/n ~ 0.4 at width 128 per branch).
    assert abs(last["mean"] - taps[-1]["mean"]) < 4 * last["mean_se"]
    assert abs(last["log_mean"] - taps[-1]["log_mean"]) < 4 * last["log_mean_se"]
    assert code == 0


def test_unscaled_residual_sample_agrees_in_log_moments(samples, capsys):
    """50 unscaled pre-activation blocks: E ln M_L was predicted 1.6 nats low (IA401 fired at
    +14 se) until the join's log transfer followed the stream's coordinate mean (THEORY section 4)."""
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    code, report = _report(capsys, str(samples / "residual_mlp_unscaled.onnx"), "--mc", "400")
    last = [layer for layer in report["layers"] if layer["tap"]][-1]
    measured = last["measured"]
    assert abs(measured["log_mean"] - last["log_mean"]) < 4 * measured["log_mean_se"]
    assert abs(measured["median"] - last["median"]) < 4 * measured["median_se"]
    codes = [f["code"] for f in report["findings"]]
    assert "IA401" not in codes and "IA301" in codes
    assert code == 1  # the residual error stands


def test_light_tails_leave_the_second_moments_unmarked(samples, capsys):
    _, report = _report(capsys, str(samples / "wide_he_mlp.onnx"), "--mc", "500")
    assert not any(note.startswith("second moments") for note in report["monte_carlo"]["notes"])


def test_same_seed_same_numbers(samples, capsys):
    args = (str(samples / "wide_he_mlp.onnx"), "--mc", "500", "--seed", "7")
    first = _report(capsys, *args)[1]["layers"]
    second = _report(capsys, *args)[1]["layers"]
    assert [row["measured"] for row in first] == [row["measured"] for row in second]


def test_weights_only_keeps_its_report_and_says_why_no_monte_carlo(tmp_path, capsys):
    import torch

    torch.save({"fc.weight": torch.randn(8, 8)}, tmp_path / "sd.pt")
    code, report = _report(capsys, str(tmp_path / "sd.pt"), "--mc", "100")
    assert report["monte_carlo"] is None
    assert any("Monte Carlo not run" in note and "--model" in note for note in report["notes"])
    assert code == 0


def test_progress_lines_when_stderr_is_not_a_terminal(samples, capsys):
    main(["check", str(samples / "wide_he_mlp.onnx"), "--mc", "200", "-q"])
    err = capsys.readouterr().err
    assert "Monte Carlo wide_he_mlp.onnx: 100% (200/200)" in err


def test_bad_mc_options_exit_2(samples, capsys):
    assert main(["check", str(samples / "wide_he_mlp.onnx"), "--mc", "1"]) == 2
    assert main(["check", str(samples / "wide_he_mlp.onnx"), "--mc", "10", "--mc-batch", "0"]) == 2
    assert "--mc-batch" in capsys.readouterr().err


def test_batchnorm_is_measured_as_training_runs_it_and_compared(samples, capsys):
    """BatchNorm normalizes each sampled network by its own batch statistics (THEORY §4: as
    training does), so right after each BN + ReLU the length is exactly the prediction's 1 in
    mean, and IA401 compares (and stays silent)."""
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    code, report = _report(capsys, str(samples / "small_he_cnn_bn.onnx"), "--mc", "200")
    mc = report["monte_carlo"]
    assert mc["engine"] == "ensemble"
    assert not any("running statistics" in note for note in mc["notes"])
    taps = [layer for layer in report["layers"] if layer["tap"] and layer["measured"]]
    assert len(taps) >= 3
    for layer in taps:
        measured = layer["measured"]
        assert abs(measured["mean"] - layer["mean"]) < 4 * measured["mean_se"] + 1e-3
        assert abs(measured["log_mean"] - layer["log_mean"]) < 4 * measured["log_mean_se"] + 1e-3
    assert not [f for f in report["findings"] if f["code"] == "IA401"]
    assert code == 0
