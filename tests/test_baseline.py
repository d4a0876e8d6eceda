"""Baselines: accepted findings stop failing, new ones fail; fingerprints survive moves and cwd."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from initaudit.audit import AuditResult, audit_file, display_path
from initaudit.baseline import BASELINE_VERSION, load_baseline, relative_path, write_baseline
from initaudit.errors import UsageError
from initaudit.rules import Finding, Severity

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with two failing models, audited from its root."""
    root = tmp_path / "project"
    (root / "models" / "mlp").mkdir(parents=True)
    shutil.copy(SAMPLES / "deep_xavier_mlp.onnx", root / "models" / "mlp" / "xavier.onnx")
    shutil.copy(SAMPLES / "residual_mlp_unscaled.onnx", root / "models" / "residual.onnx")
    monkeypatch.chdir(root)
    return root


def _audit(*paths: str | Path) -> list[AuditResult]:
    return [audit_file(p) for p in paths]


MODELS = ("models/mlp/xavier.onnx", "models/residual.onnx")


def test_a_baseline_accepts_exactly_the_findings_it_lists(project):
    results = _audit(*MODELS)
    total = sum(len(r.findings) for r in results)
    assert total == 22  # xavier: IA101 + 20 x IA103; residual: IA301 (test_policy checks the split)
    assert write_baseline(results, project / "initaudit-baseline.json") == total
    baseline = load_baseline(project / "initaudit-baseline.json")
    assert len(baseline) == total
    for result in _audit(*MODELS):
        kept, suppressed = baseline.filter(result)
        assert kept.findings == [] and suppressed == len(result.findings) == kept.suppressed
        assert not kept.fails(Severity.INFO) and kept.verdict("fm1") == "pass"


def test_the_file_is_sorted_deterministic_relative_and_written_atomically(project):
    path = project / "initaudit-baseline.json"
    write_baseline(_audit(*MODELS), path)
    first = path.read_bytes()
    os.chmod(path, 0o640)
    write_baseline(_audit(*reversed(MODELS)), path)  # another order, same findings
    assert path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the replaced file keeps its mode
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == []  # no temp file left
    document = json.loads(first)
    assert document["version"] == BASELINE_VERSION and document["root"] == "."
    entries = document["entries"]
    keys = [(e["path"], e["code"], e["location"]) for e in entries]
    assert keys == sorted(keys)
    assert {e["path"] for e in entries} == set(MODELS)  # POSIX, relative to the baseline's directory
    assert all(set(e) == {"fingerprint", "code", "path", "location", "message"} for e in entries)


def test_fingerprints_are_the_reports_when_the_baseline_sits_in_the_working_directory(project):
    (result,) = _audit(MODELS[1])
    write_baseline([result], project / "b.json")
    (entry,) = json.loads((project / "b.json").read_text())["entries"]
    assert entry["fingerprint"] == result.findings[0].fingerprint(display_path(MODELS[1]))


def test_the_baseline_matches_from_any_working_directory_and_after_a_move(project, tmp_path, monkeypatch):
    baseline_path = project / "ci" / "baseline.json"
    baseline_path.parent.mkdir()
    write_baseline(_audit(*MODELS), baseline_path)
    assert json.loads(baseline_path.read_text())["entries"][0]["path"].startswith("../models/")
    for cwd in (project / "models" / "mlp", tmp_path, project / "ci"):
        monkeypatch.chdir(cwd)
        baseline = load_baseline(Path(os.path.relpath(baseline_path)))
        for model in MODELS:
            kept, suppressed = baseline.filter(audit_file(Path(os.path.relpath(project / model))))
            assert kept.findings == [] and suppressed > 0, (cwd, model)
    moved = tmp_path / "elsewhere" / "clone"
    shutil.copytree(project, moved)
    monkeypatch.chdir(tmp_path)
    baseline = load_baseline(moved / "ci" / "baseline.json")
    assert all(not baseline.filter(audit_file(moved / m))[0].findings for m in MODELS)


def test_new_findings_are_kept(project):
    write_baseline(_audit(MODELS[0]), project / "b.json")
    baseline = load_baseline(project / "b.json")
    # The accepted model's findings are suppressed; the other model's are all new.
    (unlisted,) = _audit(MODELS[1])
    kept, suppressed = baseline.filter(unlisted)
    assert suppressed == 0 and [f.code for f in kept.findings] == ["IA301"]
    # The accepted path now holds another failure: FM2 is new there, its IA101/IA103 are gone.
    shutil.copy(SAMPLES / "deep_narrow_he_mlp.onnx", project / MODELS[0])
    kept, suppressed = baseline.filter(audit_file(MODELS[0]))
    assert [f.code for f in kept.findings] == ["IA201"] and suppressed == 0


def test_messages_and_numbers_do_not_matter_but_rule_path_and_tensor_do(project):
    (result,) = _audit(MODELS[0])
    write_baseline([result], project / "b.json")
    baseline = load_baseline(project / "b.json")
    first = result.findings[1]  # an IA103 on one tensor
    reworded = replace(first, message="variance 0.123x (numbers changed)", evidence={})
    assert baseline.filter(replace(result, findings=[reworded]))[1] == 1
    for changed in (replace(first, location="fc99.weight"), replace(first, code="IA104")):
        assert baseline.filter(replace(result, findings=[changed]))[1] == 0
    assert baseline.filter(replace(result, path="models/other.onnx", findings=[first]))[1] == 0


def test_duplicate_fingerprints_are_counted(project):
    (result,) = _audit(MODELS[1])
    note = Finding("IA903", Severity.INFO, "2 sparse initializer(s) were not read")  # no location
    same = replace(note, message="5 sparse initializer(s) were not read")  # only a number differs
    other = replace(note, message="a symbolic dimension was set to 1")
    assert note.fingerprint("m") == same.fingerprint("m") != other.fingerprint("m")
    write_baseline([replace(result, findings=[note, same])], project / "b.json")
    baseline = load_baseline(project / "b.json")
    # Two entries accept two findings with that fingerprint; a third and another note are new.
    kept, suppressed = baseline.filter(replace(result, findings=[note, other, same, note]))
    assert suppressed == 2 and kept.findings == [other, note]


def _legacy(code: str, path: str, location: str) -> str:
    """The fingerprint every baseline written so far holds (DESIGN.md: rule | path | tensor)."""
    return hashlib.sha256(f"{code}|{path}|{location}".encode()).hexdigest()[:16]


def test_a_baseline_written_with_the_old_fingerprints_still_accepts_everything(project):
    """Located findings hash as before; unlocated ones, which all shared ``code|path|``, are
    recomputed from the message stored beside them, each entry still accepting one finding."""
    results = _audit(*MODELS)
    notes = [
        Finding("IA903", Severity.INFO, "2 sparse initializer(s) were not read"),
        Finding("IA903", Severity.INFO, "shape inference failed (x); shapes come from weights only"),
    ]
    results[1] = replace(results[1], findings=[*results[1].findings, *notes])
    entries = [
        {
            "fingerprint": _legacy(f.code, path, f.location),
            "code": f.code,
            "path": path,
            "location": f.location,
            "message": f.message,
        }
        for result in results
        for path in [relative_path(result.path, project)]
        for f in result.findings
    ]
    assert sum(not e["location"] for e in entries) == 2 and len(entries) == 24
    document = {"version": 1, "tool": "initaudit", "root": ".", "entries": entries}
    (project / "old.json").write_text(json.dumps(document))
    baseline = load_baseline(project / "old.json")
    located = [e for e in baseline.entries if e.location]
    assert [e.fingerprint for e in located] == [x["fingerprint"] for x in entries if x["location"]]
    for result in results:
        kept, suppressed = baseline.filter(result)
        assert kept.findings == [] and suppressed == len(result.findings)
    assert baseline.stale(results) == []
    # Each upgraded entry accepts its own note only: a third note is new.
    extra = Finding("IA903", Severity.INFO, "opset 6 is older than 7; attribute defaults may be misread")
    kept, _ = baseline.filter(replace(results[1], findings=[*notes, extra]))
    assert kept.findings == [extra]


def test_stale_entries_are_those_of_audited_models_that_no_longer_occur(project):
    xavier, residual = _audit(*MODELS)
    write_baseline([xavier, residual], project / "b.json")
    baseline = load_baseline(project / "b.json")
    fixed = replace(xavier, findings=xavier.findings[1:])  # the IA101 is gone
    (stale,) = baseline.stale([fixed])  # the residual model was not audited: its entry is not stale
    assert (stale.code, stale.path) == ("IA101", MODELS[0])
    assert baseline.stale([xavier, residual]) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a readable JSON baseline"),
        ("[]", "expected an object with an 'entries' list"),
        ('{"version": 1, "entries": {}}', "expected an object with an 'entries' list"),
        ('{"version": "1", "entries": []}', "'version' must be an integer"),
        ('{"version": 99, "tool_version": "9.0", "entries": []}', "version 99 was written by a newer"),
        ('{"version": 1, "entries": [{"code": "IA101"}]}', "entry 0 has no 'fingerprint'"),
        ('{"version": 1, "entries": ["abc"]}', "entry 0 must be an object"),
        ('{"version": 1, "entries": [{"fingerprint": "ab", "path": 3}]}', "'path' must be a string"),
    ],
)
def test_a_malformed_baseline_is_a_usage_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "baseline.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as raised:
        load_baseline(path)
    assert str(path) in str(raised.value)


def test_missing_files_and_directories_say_what_to_do(tmp_path):
    with pytest.raises(UsageError, match=r"no such file \(create it with --write-baseline"):
        load_baseline(tmp_path / "absent.json")
    with pytest.raises(UsageError, match="does not exist"):
        write_baseline([], tmp_path / "no" / "such" / "dir.json")


def test_an_explicit_root_is_recorded_relative_to_the_file(project):
    (project / "ci").mkdir()
    write_baseline(_audit(MODELS[1]), project / "ci" / "b.json", root=project)
    document = json.loads((project / "ci" / "b.json").read_text())
    assert document["root"] == ".." and document["entries"][0]["path"] == MODELS[1]
    baseline = load_baseline(project / "ci" / "b.json")
    assert baseline.filter(audit_file(MODELS[1]))[1] == 1
    assert relative_path(project / MODELS[1], baseline.root) == MODELS[1]


# ----------------------------------------------------------------------------- a repository's CI gate


def _library_gate(args: list[str]) -> int:
    """The `check` loop as the CLI runs it, through the library: discover, policy per model,
    audit, apply, baseline (or write one), exit code. Flags: paths, --fail-on, --write-baseline."""
    from initaudit.policy import CliPolicy, PolicyResolver

    paths = [a for a in args if not a.startswith("--")]
    fail_on = Severity.parse(args[args.index("--fail-on") + 1]) if "--fail-on" in args else None
    write = Path(args[args.index("--write-baseline") + 1]) if "--write-baseline" in args else None
    paths = [p for p in paths if p not in {str(fail_on), str(write)}]
    try:
        resolver = PolicyResolver(CliPolicy(fail_on=fail_on))
        results, failed = [], False
        for path in resolver.discover(paths):
            policy = resolver.policy_for(path)
            result = audit_file(path)
            result = resolver.judge(policy, result) if write is None else _apply(policy, result)
            failed |= result.fails(policy.fail_on)
            results.append(result)
        if write is not None:
            write_baseline(results, write)
            return 0
    except UsageError:
        return 2
    return int(failed)


def _apply(policy, result):
    from initaudit.policy import apply

    return apply(policy, result)


def _cli_gate(args: list[str]) -> int:
    from initaudit.cli import main

    return main(["check", *args])


@pytest.mark.parametrize("gate", [_library_gate, _cli_gate], ids=["library", "cli"])
def test_a_repository_gate_accepts_the_baseline_and_fails_on_new_findings(gate, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "models" / "legacy").mkdir(parents=True)
    (repo / "scratch").mkdir()
    (repo / "pyproject.toml").write_text(
        "[project]\nname = 'my-models'\n\n[tool.initaudit]\n"
        'baseline = "initaudit-baseline.json"\n'
        'per-file-ignores = { "models/legacy/**" = ["IA101"] }\n'
        'extend-exclude = ["scratch"]\n'
    )
    shutil.copy(SAMPLES / "residual_mlp_unscaled.onnx", repo / "models" / "residual.onnx")  # IA301 error
    shutil.copy(SAMPLES / "wide_he_mlp.onnx", repo / "models" / "good.onnx")
    shutil.copy(SAMPLES / "deep_narrow_he_mlp.onnx", repo / "scratch" / "wip.onnx")  # excluded
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    monkeypatch.chdir(repo)

    assert gate(["."]) == 2  # the configured baseline does not exist yet: a usage error, not a pass
    assert gate([".", "--write-baseline", "initaudit-baseline.json"]) == 0
    entries = json.loads((repo / "initaudit-baseline.json").read_text())["entries"]
    assert [(e["code"], e["path"]) for e in entries] == [("IA301", "models/residual.onnx")]
    assert gate(["."]) == 0  # accepted
    monkeypatch.chdir(repo / "models")
    assert gate(["."]) == 0  # from anywhere in the repository
    monkeypatch.chdir(repo)

    # A legacy model: IA101 is ignored for it, its 20 IA103 warnings stay below the default gate.
    shutil.copy(SAMPLES / "deep_xavier_mlp.onnx", repo / "models" / "legacy" / "xavier.onnx")
    assert gate(["."]) == 0
    assert gate([".", "--fail-on", "warning"]) == 1

    # A new failing model fails the gate, the accepted finding still does not.
    shutil.copy(SAMPLES / "deep_narrow_he_mlp.onnx", repo / "models" / "narrow.onnx")
    assert gate(["."]) == 1
    assert gate(["models/residual.onnx", "models/good.onnx"]) == 0
