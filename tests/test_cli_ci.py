"""The CI gate end to end through the command line: many models per run, every format to stdout
and to file sinks in one run, load errors beside audits, the step summary, plots, `predict`."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from initaudit.cli import main
from initaudit.report.json_report import json_schema
from initaudit.report.markdown import DEFAULT_LIMIT

SARIF_SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-2.1.0.json").read_text(encoding="utf-8"))


@pytest.fixture
def repo(tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model repository: one passing and one failing model, run from its root."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(samples / "wide_he_mlp.onnx", models / "good.onnx")
    shutil.copy(samples / "deep_xavier_mlp.onnx", models / "bad.onnx")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return tmp_path


def test_a_directory_is_searched_and_every_sink_is_written_in_one_run(repo, capsys):
    code = main(
        [
            *("check", "models", "-q", "--json-output", "r.json", "--sarif-output", "r.sarif"),
            *("--junit-output", "r.xml", "--summary-output", "summary.md"),
        ]
    )
    assert code == 1  # bad.onnx has an FM1 error
    out = capsys.readouterr().out
    assert "models/bad.onnx: IA101" in out and "models/good.onnx" not in out

    document = json.loads((repo / "r.json").read_text())
    jsonschema.validate(document, json_schema())
    assert [r["path"] for r in document["reports"]] == ["models/bad.onnx", "models/good.onnx"]
    assert [r["verdicts"]["fm1"] for r in document["reports"]] == ["error", "pass"]

    sarif = json.loads((repo / "r.sarif").read_text())
    jsonschema.Draft4Validator(SARIF_SCHEMA).validate(sarif)
    uris = {loc["physicalLocation"]["artifactLocation"]["uri"] for r in sarif["runs"][0]["results"]
            for loc in r["locations"]}  # fmt: skip
    assert uris == {"models/bad.onnx"}

    suites = ET.parse(repo / "r.xml").getroot()
    failures = {s.get("name"): int(s.get("failures")) for s in suites.iter("testsuite")}
    assert failures["models/bad.onnx"] >= 1 and failures["models/good.onnx"] == 0

    summary = (repo / "summary.md").read_text()
    assert "models/bad.onnx" in summary and "IA101" in summary
    assert len(summary.encode()) < DEFAULT_LIMIT


@pytest.mark.parametrize("fmt", ["json", "sarif", "github", "junit", "markdown"])
def test_machine_formats_on_stdout_are_plain_text(repo, capsys, fmt):
    assert main(["check", "models", "--format", fmt]) == 1
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # never through rich
    if fmt == "github":
        lines = out.splitlines()
        assert lines and all(line.startswith(("::error ", "::warning ", "::notice ")) for line in lines)
        assert any("file=models/bad.onnx" in line and "IA101" in line for line in lines)


def test_the_step_summary_is_appended_to(repo, monkeypatch):
    summary = repo / "step_summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    main(["check", "models/good.onnx", "--summary-output", str(summary)])
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "models/good.onnx" in text
    # Any other path is replaced, as every other sink is.
    other = repo / "other.md"
    other.write_text("stale\n")
    main(["check", "models/good.onnx", "--summary-output", str(other)])
    assert "stale" not in other.read_text()


def test_an_unreadable_model_is_an_error_entry_and_the_others_are_still_judged(repo, capsys):
    (repo / "models" / "broken.onnx").write_bytes(b"\x08\x07 not a protobuf at all")
    code = main(["check", "models", "--format", "json", "-o", "r.json"])
    assert code == 2  # errors outrank findings
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("initaudit: error: models/broken.onnx: ")
    document = json.loads((repo / "r.json").read_text())
    jsonschema.validate(document, json_schema())
    assert [e["path"] for e in document["errors"]] == ["models/broken.onnx"]
    assert len(document["reports"]) == 2


def test_when_no_model_can_be_read_nothing_is_written(repo, capsys):
    (repo / "models" / "broken.onnx").write_bytes(b"garbage")
    code = main(["check", "models/broken.onnx", "--json-output", "r.json", "--sarif-output", "r.sarif"])
    assert code == 2
    assert not (repo / "r.json").exists() and not (repo / "r.sarif").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_a_path_that_matches_nothing_is_a_usage_error(repo, capsys):
    assert main(["check", "nowhere/*.onnx"]) == 2
    assert main(["check", "missing.onnx"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("initaudit: error:") == 2


def test_a_glob_selects_models(repo, capsys):
    assert main(["check", "models/g*.onnx", "-q"]) == 0
    assert main(["check", "models/*.onnx", "-q"]) == 1


def test_plot_with_check_writes_a_page(repo):
    assert main(["check", "models/good.onnx", "-q", "--plot", "signal.html"]) == 0
    page = (repo / "signal.html").read_text()
    assert "<svg" in page and "good.onnx" in page


def test_fail_on_warning_and_exit_zero_through_the_runner(repo):
    # good.onnx has no warning-level finding; bad.onnx has IA103 warnings besides its error.
    assert main(["check", "models/good.onnx", "--fail-on", "warning", "-q"]) == 0
    assert main(["check", "models/bad.onnx", "--ignore", "IA101", "-q"]) == 0
    assert main(["check", "models/bad.onnx", "--ignore", "IA101", "--fail-on", "warning", "-q"]) == 1
    assert main(["check", "models", "--exit-zero", "-q"]) == 0


def test_predict_reports_design_answers_in_every_format(tmp_path, capsys):
    assert main(["predict", "--widths", "64x50", "--init", "xavier", "-f", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    jsonschema.validate(document, json_schema())
    (report,) = document["reports"]
    assert report["verdicts"]["fm1"] == "error"
    design = report["design"]
    assert all(design[key]["checked"] for key in ("min_width", "max_depth", "variance_multiplier"))
    assert design["variance_multiplier"]["value"] == pytest.approx(2.0)  # Xavier -> He under ReLU
    # The width it suggests for this depth does pass when asked again, and one less does not.
    width = design["min_width"]["value"]
    assert main(["predict", "--widths", f"{width}x50", "-q", "--fail-on", "warning"]) == 0
    assert main(["predict", "--widths", f"{width - 1}x50", "-q", "--fail-on", "warning"]) == 1
    capsys.readouterr()
    assert main(["predict", "--widths", "64", "--residual", "50", "--eta", "1/sqrt(L)", "-f", "sarif"]) == 0
    jsonschema.Draft4Validator(SARIF_SCHEMA).validate(json.loads(capsys.readouterr().out))


def test_predict_rejects_bad_specs_in_one_line(capsys):
    for args in (["--widths", "64x"], ["--widths", "64", "--init", "magic"], ["--widths", "0x3"]):
        assert main(["predict", *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("initaudit: error:"), err


def test_repeated_findings_are_counted_in_the_console_and_listed_with_verbose(samples, capsys):
    path = str(samples / "deep_xavier_mlp.onnx")  # 20 IA103 warnings, one per weight
    main(["check", path])
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if line.startswith("IA103 warning ")]
    assert len(shown) == 3 and "[... 17 more IA103 warnings" in out
    main(["check", path, "-v"])
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if line.startswith("IA103 warning ")]
    assert len(shown) == 20 and "more IA103" not in out
    main(["check", path, "-q"])  # one line per finding: quiet output is for grep and editors
    assert capsys.readouterr().out.count(": IA103 warning:") == 20


def test_baseline_entries_that_match_nothing_any_more_are_reported(repo, capsys):
    assert main(["check", "models", "--write-baseline", "baseline.json"]) == 0
    assert main(["check", "models", "--baseline", "baseline.json", "-q"]) == 0
    assert "no longer match" not in capsys.readouterr().err
    # The bad model gets fixed: its accepted findings are gone, and the baseline says so.
    shutil.copy(repo / "models" / "good.onnx", repo / "models" / "bad.onnx")
    assert main(["check", "models", "--baseline", "baseline.json", "-q"]) == 0
    accepted = len(json.loads((repo / "baseline.json").read_text())["entries"])
    assert f"initaudit: {accepted} baseline entries no longer match a finding" in capsys.readouterr().err
