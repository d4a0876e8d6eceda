"""Policy: config keys, where each comes from, flags over config, severities, per-file ignores."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from initaudit.audit import AuditResult, audit_file
from initaudit.config import load_config, read_config
from initaudit.errors import UsageError
from initaudit.policy import CliPolicy, Policy, PolicyResolver, apply, policy_for
from initaudit.rules import Severity

# deep_xavier_mlp: 20 hidden ReLU layers with Xavier weights (half He's variance, sample_models/
# README.md): one IA101 error for the vanishing mean, one IA103 warning per hidden weight.
XAVIER_LAYERS = 20


@pytest.fixture(scope="module")
def xavier(tmp_path_factory: pytest.TempPathFactory) -> AuditResult:
    return audit_file(Path(__file__).parent.parent / "sample_models" / "deep_xavier_mlp.onnx")


def _codes(result: AuditResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in result.findings:
        counts[f.code] = counts.get(f.code, 0) + 1
    return counts


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_sample_has_what_the_policy_tests_rely_on(xavier):
    assert _codes(xavier) == {"IA101": 1, "IA103": XAVIER_LAYERS}
    assert xavier.verdict("fm1") == "error" and xavier.fails(Severity.ERROR)


# ----------------------------------------------------------------------------- config keys


def test_policy_keys_parse(tmp_path):
    config = read_config(
        _write(
            tmp_path / "pyproject.toml",
            """
[tool.initaudit]
select = ["ia1", "IA2"]
ignore = ["IA103"]
per-file-ignores = { "legacy/*.onnx" = ["IA101"], "draft_*" = ["IA5", "IA9"] }
severity = { IA103 = "Error", IA9 = "off" }
fail-on = "warning"
exclude = ["build"]
extend-exclude = ["scratch/**"]
force-exclude = true
respect-gitignore = false
baseline = "ci/baseline.json"
""",
        )
    )
    assert (config.select, config.ignore) == (["IA1", "IA2"], ["IA103"])
    assert config.per_file_ignores == {"legacy/*.onnx": ["IA101"], "draft_*": ["IA5", "IA9"]}
    assert config.severity == {"IA103": "error", "IA9": "off"}
    assert (config.fail_on, config.exclude, config.extend_exclude) == ("warning", ["build"], ["scratch/**"])
    assert config.force_exclude is True and config.respect_gitignore is False
    assert read_config(_write(tmp_path / "empty.toml", "[tool.initaudit]\n")).respect_gitignore is None
    assert config.baseline == tmp_path / "ci" / "baseline.json"  # relative to the config file
    assert config.warnings == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('select = "IA1"', "must be a list of rule codes"),
        ('ignore = ["IA777"]', "unknown rule code or prefix 'IA777'"),
        ('severity = { IA103 = "fatal" }', "expected one of error, warning, info, off"),
        ('severity = { XX1 = "error" }', "unknown rule code"),
        ('fail-on = "critical"', 'must be "info", "warning" or "error"'),
        ('per-file-ignores = { "a/[b" = ["IA1"] }', "unclosed"),
        ('per-file-ignores = ["IA1"]', "must be a table"),
        ("force-exclude = 1", "must be true or false"),
        ('respect-gitignore = "yes"', "must be true or false"),
        ("baseline = 3", "must be a path"),
        ('exclude = "build"', "must be a list of globs"),
    ],
)
def test_policy_key_errors_name_the_file_and_key(tmp_path, line, message):
    path = _write(tmp_path / "pyproject.toml", f"[tool.initaudit]\n{line}\n")
    with pytest.raises(UsageError, match=message) as raised:
        read_config(path)
    assert str(path) in str(raised.value) and line.split(" ")[0] in str(raised.value)


def test_unknown_policy_spelling_is_a_warning_with_a_hint(tmp_path):
    config = read_config(_write(tmp_path / "pyproject.toml", '[tool.initaudit]\nfail_on = "info"\n'))
    assert config.fail_on is None and "did you mean 'fail-on'" in config.warnings[0]


# ----------------------------------------------------------------------------- where config comes from


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A project with a root config, a sub-package pyproject without a table, a sub-project with
    its own config (granting itself trust), and a working directory elsewhere."""
    root = tmp_path / "repo"
    _write(
        root / "pyproject.toml",
        '[tool.initaudit]\nignore = ["IA9"]\nfail-on = "warning"\ntrust-model = true\n'
        'per-file-ignores = { "models/legacy/**" = ["IA101"] }\nbaseline = "baseline.json"\n'
        "input-shape = [1, 64]\n",
    )
    _write(root / "pkg" / "pyproject.toml", "[project]\nname = 'pkg'\n")
    _write(
        root / "sub" / "pyproject.toml",
        '[tool.initaudit]\nselect = ["IA1"]\ntrust-model = true\nmodel = "evil:build"\n'
        'severity = { IA103 = "info" }\n',
    )
    return root


def test_each_model_gets_the_nearest_config_with_a_table(repo, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resolver = PolicyResolver()
    assert resolver.project.source is None  # no config above the working directory
    top = resolver.policy_for(repo / "models" / "m.onnx")
    assert top.source == repo / "pyproject.toml" and top.fail_on is Severity.WARNING
    assert top.input_shape == (1, 64) and top.baseline == repo / "baseline.json"
    # pkg/pyproject.toml has no [tool.initaudit]: it does not hide the project's config.
    assert resolver.policy_for(repo / "pkg" / "deep" / "m.onnx").source == repo / "pyproject.toml"
    sub = resolver.policy_for(repo / "sub" / "m.onnx")
    assert sub.source == repo / "sub" / "pyproject.toml" and sub.fail_on is Severity.ERROR  # own defaults
    assert sub.selection.select == ["IA1"] and sub.severity == {"IA103": Severity.INFO}


def test_a_model_without_config_above_uses_the_projects(repo, tmp_path, monkeypatch):
    outside = tmp_path / "downloads" / "m.onnx"
    monkeypatch.chdir(repo)
    assert PolicyResolver().policy_for(outside).source == repo / "pyproject.toml"
    monkeypatch.chdir(tmp_path)
    assert PolicyResolver().policy_for(outside) == Policy()  # nothing anywhere: defaults


def test_trust_beside_a_model_is_ignored_with_one_warning(repo, tmp_path, monkeypatch):
    heard: list[str] = []
    monkeypatch.chdir(tmp_path)
    resolver = PolicyResolver(warn=heard.append)
    for name in ("a.onnx", "b.onnx", "deeper/c.onnx"):
        resolver.policy_for(repo / "sub" / name)
    resolver.policy_for(repo / "models" / "m.onnx")
    assert resolver.project.trust_model is None and resolver.project.model is None
    assert len(heard) == 2, heard  # once per file that tried
    sub_warning = next(w for w in heard if "sub" in w)
    assert str(repo / "sub" / "pyproject.toml") in sub_warning
    assert "trust-model and model ignored" in sub_warning and "--config" in sub_warning
    # Run from the project, its own trust is the project's: no warning for it.
    heard.clear()
    monkeypatch.chdir(repo)
    inside = PolicyResolver(warn=heard.append)
    inside.policy_for(repo / "models" / "m.onnx")
    assert inside.project.trust_model is True and heard == []


def test_an_explicit_config_decides_for_every_model(repo, tmp_path, monkeypatch):
    explicit = _write(tmp_path / "ci.toml", 'select = ["IA2"]\nfail-on = "info"\n')
    monkeypatch.chdir(repo)
    resolver = PolicyResolver(explicit_config=explicit)
    for model in (repo / "sub" / "m.onnx", repo / "models" / "m.onnx", tmp_path / "x.onnx"):
        policy = resolver.policy_for(model)
        assert policy.source == explicit and policy.selection.select == ["IA2"]
        assert policy.fail_on is Severity.INFO and policy.baseline is None
    assert load_config(explicit).source == explicit


def test_flags_replace_the_configs_values(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = CliPolicy(select=["IA2"], ignore=[], fail_on=Severity.ERROR, baseline=Path("other.json"))
    policy = PolicyResolver(cli).policy_for(repo / "models" / "m.onnx")
    assert (policy.selection.select, policy.selection.ignore) == (["IA2"], [])  # config's IA9 gone
    assert policy.fail_on is Severity.ERROR and policy.baseline == tmp_path / "other.json"
    # Per-file ignores have no flag: they still hold.
    legacy = PolicyResolver(cli).policy_for(repo / "models" / "legacy" / "x" / "m.onnx")
    assert legacy.file_ignores == ("IA101",)


def test_per_file_ignores_are_relative_to_the_config_not_the_working_directory(repo, monkeypatch):
    (repo / "models").mkdir()
    for cwd in (repo, repo / "models", repo.parent):
        monkeypatch.chdir(cwd)
        resolver = PolicyResolver()
        legacy = Path("models/legacy/v1/m.onnx") if cwd == repo else repo / "models/legacy/v1/m.onnx"
        assert resolver.policy_for(legacy).file_ignores == ("IA101",), cwd
        assert resolver.policy_for(repo / "models" / "m.onnx").file_ignores == ()
        assert resolver.policy_for(repo / "legacy" / "models" / "m.onnx").file_ignores == ()


def test_policy_for_is_the_resolver_in_one_call(repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert policy_for(repo / "sub" / "m.onnx") == PolicyResolver().policy_for(repo / "sub" / "m.onnx")


# ----------------------------------------------------------------------------- applying a policy


def test_ignored_and_per_file_ignored_codes_are_dropped(xavier):
    assert _codes(apply(Policy(file_ignores=("IA101",)), xavier)) == {"IA103": XAVIER_LAYERS}
    kept = apply(Policy(file_ignores=("IA1",)), xavier)
    assert kept.findings == [] and kept.verdict("fm1") == "pass" and not kept.fails(Severity.INFO)
    assert xavier.findings and _codes(xavier)["IA103"] == XAVIER_LAYERS  # the input is not changed


def test_severity_overrides_change_verdicts_and_the_gate_consistently(xavier):
    softened = apply(Policy(severity={"IA101": Severity.WARNING}), xavier)
    assert softened.verdict("fm1") == "warning"
    assert not softened.fails(Severity.ERROR) and softened.fails(Severity.WARNING)
    assert softened.counts() == {"error": 0, "warning": XAVIER_LAYERS + 1, "info": 0}
    assert xavier.findings[0].severity is Severity.ERROR  # copies were changed, not the findings
    # A warning promoted to an error fails the default gate even with IA101 ignored.
    strict = apply(Policy(file_ignores=("IA101",), severity={"IA103": Severity.ERROR}), xavier)
    assert strict.fails(Severity.ERROR) and strict.counts()["error"] == XAVIER_LAYERS
    assert strict.verdict("fm1") == "pass"  # IA103 is not a verdict rule


def test_the_most_specific_severity_key_wins_and_off_drops(xavier):
    policy = Policy(severity={"IA1": Severity.INFO, "IA103": Severity.ERROR})
    result = apply(policy, xavier)
    assert [(f.code, str(f.severity)) for f in result.findings[:1]] == [("IA103", "error")]
    assert result.findings[-1].code == "IA101" and result.findings[-1].severity is Severity.INFO
    assert [f.severity for f in result.findings] == sorted(
        (f.severity for f in result.findings), reverse=True
    )
    off = apply(Policy(severity={"IA103": None}), xavier)
    assert _codes(off) == {"IA101": 1}


def test_a_config_policy_applied_end_to_end(tmp_path, samples, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "proj"
    shutil.copy(samples / "deep_xavier_mlp.onnx", _write(root / "models" / "legacy" / "x.onnx", ""))
    _write(
        root / "pyproject.toml",
        '[tool.initaudit]\nper-file-ignores = { "models/legacy" = ["IA101"] }\n'
        'severity = { IA103 = "info" }\n',
    )
    resolver = PolicyResolver()
    (model,) = resolver.discover([root])
    policy = resolver.policy_for(model)
    result = resolver.judge(policy, audit_file(model))
    assert _codes(result) == {"IA103": XAVIER_LAYERS}
    assert {str(f.severity) for f in result.findings} == {"info"} and not result.fails(policy.fail_on)
    assert result.fails(Severity.INFO)


def test_discovery_uses_the_project_and_the_models_excludes(repo, monkeypatch):
    monkeypatch.chdir(repo)
    for name in ("models/a.onnx", "models/scratch/b.onnx", "sub/c.onnx", "sub/drafts/d.onnx"):
        _write(repo / name, "x")
    _write(repo / "pyproject.toml", '[tool.initaudit]\nextend-exclude = ["scratch"]\n')
    _write(repo / "sub" / "pyproject.toml", '[tool.initaudit]\nextend-exclude = ["drafts"]\n')
    found = PolicyResolver().discover(["."])
    assert [p.as_posix() for p in found] == ["models/a.onnx", "sub/c.onnx"]
    # Named explicitly, a file is audited unless --force-exclude.
    named = ["sub/drafts/d.onnx", "models/scratch/b.onnx"]
    assert len(PolicyResolver().discover(named)) == 2
    assert PolicyResolver(CliPolicy(force_exclude=True)).discover(named) == []


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_respect_gitignore_from_the_project_config_and_the_flag(tmp_path, monkeypatch):
    """On by default; the project's ``respect-gitignore = false`` turns it off; the flag wins."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.chdir(tmp_path)
    for name in ("models/a.onnx", "checkpoints/step_1.pt"):
        _write(tmp_path / name, "x")
    _write(tmp_path / ".gitignore", "checkpoints/\n")
    subprocess.run(["git", "init", "-q", "."], check=True)
    every = ["checkpoints/step_1.pt", "models/a.onnx"]

    def found(cli: CliPolicy | None = None) -> list[str]:
        return [p.as_posix() for p in PolicyResolver(cli).discover(["."])]

    assert found() == ["models/a.onnx"]
    _write(tmp_path / "pyproject.toml", "[tool.initaudit]\nrespect-gitignore = false\n")
    assert found() == every
    assert found(CliPolicy(respect_gitignore=True)) == ["models/a.onnx"]
    _write(tmp_path / "pyproject.toml", "[tool.initaudit]\n")
    assert found(CliPolicy(respect_gitignore=False)) == every
    # With --force-exclude a named ignored file goes too (pre-commit passes files by name).
    named = ["checkpoints/step_1.pt"]
    assert [p.as_posix() for p in PolicyResolver().discover(named)] == named
    assert PolicyResolver(CliPolicy(force_exclude=True)).discover(named) == []
