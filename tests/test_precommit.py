"""Integrations: the pre-commit hook through `pre-commit try-repo`, and the GitHub Action's steps.

try-repo installs initaudit into a fresh virtualenv from a git repository (pip, from the package
index), so it tests the hook as users get it. It takes the repository's committed HEAD, so the
test first commits a copy of the working tree: what is tested is what is on disk. Measured on the
development machine: about 10-20 s per run with a warm pip cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # pre-commit depends on PyYAML

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
GIT = [
    "git",
    "-c",
    "user.name=initaudit-test",
    "-c",
    "user.email=test@example.invalid",
    "-c",
    "commit.gpgsign=false",
]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _snapshot(destination: Path) -> Path:
    """Commit a copy of the working tree (tracked and untracked-but-not-ignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # deleted-but-tracked files are listed too
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    _git(destination, "init", "-q")
    _git(destination, "add", "-A")
    _git(destination, "commit", "-q", "-m", "snapshot of the working tree")
    return destination


def test_the_hook_definition_matches_what_discovery_walks():
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    from initaudit.discover import INDEX_SUFFIXES, MODEL_SUFFIXES

    assert hook["id"] == "initaudit" and hook["language"] == "python" and hook["pass_filenames"] is True
    assert hook["entry"].split() == ["initaudit", "check", "--force-exclude"]
    files = re.compile(hook["files"])
    for suffix in (*MODEL_SUFFIXES, *INDEX_SUFFIXES):
        assert files.search(f"models/net{suffix}"), suffix
    others = ("model.onnx.txt", "notes.md", "weights.bin", "train.py", "config.json", "tokenizer.index.json")
    for other in others:
        assert not files.search(other), other


@pytest.mark.skipif(importlib.util.find_spec("pre_commit") is None, reason="pre-commit is not installed")
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_pre_commit_try_repo_runs_the_hook(tmp_path):
    hooks = _snapshot(tmp_path / "initaudit")
    user = tmp_path / "user"
    (user / "models" / "build").mkdir(parents=True)
    shutil.copy(SAMPLES / "wide_he_mlp.onnx", user / "models" / "good.onnx")
    shutil.copy(SAMPLES / "deep_xavier_mlp.onnx", user / "models" / "bad.onnx")
    shutil.copy(SAMPLES / "deep_xavier_mlp.onnx", user / "models" / "build" / "bad.onnx")
    _git(user, "init", "-q")
    _git(user, "add", "-A")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache"), "NO_COLOR": "1"}
    env.pop("PRE_COMMIT", None)

    def try_repo(*files: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pre_commit", "try-repo", str(hooks), "initaudit", "--verbose"]
        return subprocess.run(
            [*command, "--files", *files], cwd=user, env=env, capture_output=True, text=True, timeout=900
        )

    started = time.perf_counter()
    # --force-exclude: the default excludes hold for files pre-commit names (build/ is one).
    good = try_repo("models/good.onnx", "models/build/bad.onnx")
    print(f"pre-commit try-repo (builds the hook's environment): {time.perf_counter() - started:.1f} s")
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"^initaudit\.+Passed$", good.stdout, re.M) and "IA101" not in good.stdout, good.stdout
    bad = try_repo("models/good.onnx", "models/bad.onnx")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"^initaudit\.+Failed$", bad.stdout, re.M) and "IA101" in bad.stdout, bad.stdout


def test_a_commit_of_only_excluded_models_passes_the_hook(tmp_path, monkeypatch, capsys):
    """What pre-commit runs when every staged model lies in an excluded directory."""
    from initaudit.cli import main

    (tmp_path / "build").mkdir()
    shutil.copy(SAMPLES / "deep_xavier_mlp.onnx", tmp_path / "build" / "bad.onnx")
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--force-exclude", "build/bad.onnx"]) == 0, capsys.readouterr().err
    assert "IA101" not in capsys.readouterr().out
    assert main(["check", "build/bad.onnx"]) == 1  # named without --force-exclude, it is audited


# ----------------------------------------------------------------------------- the GitHub Action


@pytest.fixture(scope="module")
def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_the_action_is_a_well_formed_composite_action(action):
    assert action["name"] and action["description"] and action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    for step in steps:
        assert ("run" in step) != ("uses" in step), step
        if "run" in step:
            assert step["shell"] == "bash", step  # composite run steps must name their shell
            for expression in re.findall(r"\$\{\{(.*?)\}\}", step["run"]):
                pytest.fail(f"expression {expression!r} inside a script: pass inputs through env")
    inputs = action["inputs"]
    used = {m for step in steps for m in re.findall(r"inputs\.([\w-]+)", yaml.safe_dump(step))}
    assert used == set(inputs), used ^ set(inputs)
    assert all("description" in spec and "default" in spec for spec in inputs.values())
    outputs = {name: spec["value"] for name, spec in action["outputs"].items()}
    assert outputs == {
        "exit-code": "${{ steps.audit.outputs.exit-code }}",
        "sarif-file": "${{ steps.audit.outputs.sarif-file }}",
    }
    # The gate is the last step and fails only on the saved code, after the reports.
    assert steps[-1]["env"]["CODE"] == "${{ steps.audit.outputs.exit-code }}"
    assert [s.get("uses", "").split("@")[0] for s in steps if "uses" in s] == [
        "actions/setup-python",
        "github/codeql-action/upload-sarif",
    ]


def _render(value: str, context: dict[str, str]) -> str:
    """Substitute ``${{ inputs.x }}`` and ``${{ steps.audit.outputs.x }}`` as the runner would."""
    return re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", lambda m: context[m.group(1)], value)


def _run_step(
    step: dict, context: dict[str, str], cwd: Path, github: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run a composite step's script as the runner does: bash -eo pipefail, env from the step."""
    env = {**os.environ, **github, **{k: _render(str(v), context) for k, v in step.get("env", {}).items()}}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        cwd=cwd / _render(step.get("working-directory", "."), context),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("initaudit") is None, reason="bash, initaudit"
)
def test_the_action_steps_annotate_summarize_and_fail_on_the_saved_code(action, tmp_path):
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    shutil.copy(SAMPLES / "wide_he_mlp.onnx", repo / "models" / "good.onnx")
    shutil.copy(SAMPLES / "residual_mlp_unscaled.onnx", repo / "models" / "bad.onnx")
    steps = {step.get("id", step["name"]): step for step in action["runs"]["steps"]}
    output, summary = tmp_path / "github_output", tmp_path / "summary.md"
    github = {"GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTIONS": "true"}
    context = {f"inputs.{name}": spec["default"] for name, spec in action["inputs"].items()}
    context["inputs.paths"] = "models/*.onnx"  # a quoted glob: initaudit expands it, the shell must not

    ran = _run_step(steps["audit"], context, repo, github)
    assert ran.returncode == 0, ran.stdout + ran.stderr  # the step saves the code, it does not fail
    saved = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert saved["exit-code"] == "1" and saved["sarif-file"] == str(repo / "initaudit.sarif")
    assert "::error file=models/bad.onnx" in ran.stdout and "IA301" in ran.stdout
    assert "IA301" in summary.read_text()
    assert "models/bad.onnx" in (repo / "initaudit.sarif").read_text()
    context.update({f"steps.audit.outputs.{k}": v for k, v in saved.items()})
    gate = _run_step(steps["Fail on findings"], context, repo, github)
    assert gate.returncode == 1 and "initaudit exited with 1" in gate.stderr

    context["inputs.fail-on"], context["inputs.paths"] = "info", "models/good.onnx"
    output.write_text("")
    assert _run_step(steps["audit"], context, repo, github).returncode == 0
    assert output.read_text().splitlines()[0] == "exit-code=0"
    context["steps.audit.outputs.exit-code"] = "0"
    assert _run_step(steps["Fail on findings"], context, repo, github).returncode == 0
