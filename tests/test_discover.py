"""Discovery: files, directories and globs; ruff-style excludes; pre-commit's explicit lists."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from initaudit.discover import DEFAULT_EXCLUDE, compile_glob, discover, matches
from initaudit.errors import UsageError


def _tree(root: Path, files: list[str]) -> None:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


FILES = [
    "models/a.onnx",
    "models/b.PT",  # suffixes are case-insensitive
    "models/sub/c.safetensors",
    "models/sub/d.pt2",
    "models/sub/e.pth",
    "models/notes.txt",
    "models/weights.bin",  # too generic to walk
    "models/last.ckpt",
    "models/.venv/lib/f.onnx",
    "models/build/g.onnx",
    "models/node_modules/h.onnx",
    ".git/objects/i.onnx",
    "legacy/old.onnx",
    "legacy/keep/new.onnx",
]
WALKED = ["models/a.onnx", "models/b.PT", "models/sub/c.safetensors", "models/sub/d.pt2", "models/sub/e.pth"]


def _posix(paths: list[Path]) -> list[str]:
    return [p.as_posix() for p in paths]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _tree(tmp_path, FILES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_directory_walk_finds_model_suffixes_and_skips_default_excludes(tree):
    assert _posix(discover(["models"])) == WALKED
    # From the root: .git is excluded by default; legacy/ is an ordinary directory.
    assert _posix(discover(["."])) == ["legacy/keep/new.onnx", "legacy/old.onnx", *WALKED]


def test_sorted_and_deduplicated_however_a_file_is_reached(tree):
    found = discover(["models/sub/e.pth", "models", "./models/a.onnx", str(tree / "models" / "a.onnx")])
    assert _posix(found) == WALKED  # each file once, in path order
    assert all(not p.is_absolute() for p in found)  # shown as typed, relative


def test_explicit_files_are_audited_whatever_their_suffix_or_excludes(tree):
    named = ["models/weights.bin", "models/last.ckpt", "models/build/g.onnx", "models/.venv/lib/f.onnx"]
    assert _posix(discover(named)) == sorted(named)
    # --force-exclude (pre-commit passes staged files by name) applies the excludes to them too.
    assert _posix(discover(named, force_exclude=True)) == ["models/last.ckpt", "models/weights.bin"]


def test_everything_force_excluded_is_an_empty_run_not_an_error(tree):
    assert discover(["models/build/g.onnx"], force_exclude=True) == []


def test_an_explicit_directory_is_walked_even_when_its_name_is_excluded(tree):
    assert _posix(discover(["models/build"])) == ["models/build/g.onnx"]
    # Forced, the named directory is excluded like a named file: an empty run, not an error.
    assert discover(["models/build"], force_exclude=True) == []


def test_exclude_replaces_the_defaults_and_extend_exclude_adds(tree):
    assert "models/build/g.onnx" in _posix(discover(["models"], exclude=[]))
    assert "models/.venv/lib/f.onnx" in _posix(discover(["models"], exclude=["build"]))
    extended = _posix(discover(["."], extend_exclude=["legacy"]))
    assert extended == WALKED
    # An anchored pattern (with a slash) is relative to the root; a directory covers its contents.
    anchored = _posix(discover(["."], extend_exclude=["legacy/keep", "models/sub/*.pt2"]))
    assert anchored == ["legacy/old.onnx", *[w for w in WALKED if not w.endswith(".pt2")]]


def test_patterns_are_relative_to_the_root_not_the_working_directory(tree, monkeypatch):
    monkeypatch.chdir(tree / "models")
    found = discover(["."], extend_exclude=["models/sub"], root=tree)
    assert _posix(found) == ["a.onnx", "b.PT"]
    # The same pattern relative to models/ itself names nothing.
    assert len(discover(["."], extend_exclude=["models/sub"], root=tree / "models")) == 5


def test_globs_are_expanded_with_excludes_applied_below_their_base(tree):
    assert _posix(discover(["models/**/*.onnx"])) == ["models/a.onnx"]  # .venv, build, node_modules out
    assert _posix(discover(["models/*.bin"])) == ["models/weights.bin"]  # the pattern's own suffix
    assert _posix(discover(["models/*"])) == WALKED  # matched dirs walked; notes.txt is not a model
    # build/*.onnx names build/ as explicitly as `build/` does.
    assert _posix(discover(["models/build/*.onnx"])) == ["models/build/g.onnx"]


def test_missing_paths_and_empty_directories_are_usage_errors(tree):
    with pytest.raises(UsageError, match=r"nope\.onnx: no such file"):
        discover(["models/a.onnx", "nope.onnx"])
    with pytest.raises(UsageError, match=r"\*\.nothing: no files match"):
        discover(["*.nothing"])
    (tree / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no model files under empty \(looked for \*\.onnx"):
        discover(["empty"])
    with pytest.raises(UsageError, match="no paths given"):
        discover([])


def test_an_empty_directory_beside_models_is_a_warning(tree):
    (tree / "empty").mkdir()
    heard: list[str] = []
    assert _posix(discover(["models/a.onnx", "empty"], warn=heard.append)) == ["models/a.onnx"]
    assert heard == ["no model files under empty"]


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_a_symlinked_directory_loop_does_not_hang_and_links_dedupe(tree):
    (tree / "models" / "loop").symlink_to(tree / "models", target_is_directory=True)
    (tree / "alias.onnx").symlink_to(tree / "models" / "a.onnx")
    found = _posix(discover(["models", "alias.onnx"]))
    assert found == WALKED  # os.walk does not follow the loop; the alias is the same file


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("build", "build", True),
        ("build", "a/build/x.onnx", True),  # a name at any depth, and what is under it
        ("build", "a/builder/x.onnx", False),
        ("*.tmp.onnx", "a/b/m.tmp.onnx", True),
        ("models/*.onnx", "models/a.onnx", True),
        ("models/*.onnx", "models/sub/a.onnx", False),  # * stays in one segment
        ("models/**/*.onnx", "models/sub/deep/a.onnx", True),
        ("models/**/*.onnx", "models/a.onnx", True),  # ** matches zero segments
        ("/models", "models/a.onnx", True),  # a leading slash anchors, as a slash anywhere does
        ("/models", "x/models/a.onnx", False),
        ("**/draft_?.pt", "x/y/draft_1.pt", True),
        ("draft_[0-9].pt", "draft_7.pt", True),
        ("draft_[!0-9].pt", "draft_7.pt", False),
        ("{legacy,old}/*", "old/m.onnx", True),
        ("{legacy,old}/*", "new/m.onnx", False),
        ("a.b", "axb", False),  # regex characters are literal
    ],
)
def test_glob_semantics(tmp_path, pattern, path, expected):
    assert matches(pattern, tmp_path / path, tmp_path) is expected


def test_malformed_globs_are_reported():
    for bad in ("models/[ab", "{a,b", "models/**x"):
        with pytest.raises(ValueError, match="glob"):
            compile_glob(bad)


def test_the_default_excludes_cover_the_usual_environments():
    assert {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", ".tox"} <= set(
        DEFAULT_EXCLUDE
    )


@pytest.mark.parametrize("top", [".", "models", "models/build"])
def test_the_walk_agrees_with_judging_each_file_on_its_own(tree, top):
    """The walk judges entries by name as it descends; is_excluded resolves each path. Same answer."""
    from initaudit.discover import MODEL_SUFFIXES, is_excluded

    patterns = (*DEFAULT_EXCLUDE, "legacy/keep", "*.pt2")
    walked = set(_posix(discover([top], exclude=patterns)))
    candidates = [p for p in Path(top).rglob("*") if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES]
    judged = {p.as_posix() for p in candidates if not is_excluded(p, patterns, tree, below=Path(top))}
    assert walked == judged and walked


# ----------------------------------------------------------------------------- .gitignore

GIT = shutil.which("git") or "git"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

GIT_FILES = [
    "models/a.onnx",
    "models/a.fixed.onnx",  # *.fixed.onnx: fix's output, ignored
    "models/sub/best.onnx",  # models/sub/* ignored, but negated back
    "models/sub/epoch_3.onnx",
    "checkpoints/run1/step_100.pt",  # a whole ignored directory
    "checkpoints/run1/step_200.pt",
    "vendor/keep.pt",  # vendor/.gitignore: *.pt, !keep.pt
    "vendor/other.pt",
    "forced/tracked.onnx",  # forced/ is ignored, but this file is tracked (git add -f)
    "forced/untracked.onnx",
    "nested/.git",  # placeholder, replaced by a repository below
]
GITIGNORE = "*.fixed.onnx\nmodels/sub/*\n!models/sub/best.onnx\ncheckpoints/\nforced/\n"
GIT_KEPT = ["forced/tracked.onnx", "models/a.onnx", "models/sub/best.onnx", "vendor/keep.pt"]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run([GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def git_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git work tree with a root .gitignore (a directory, a suffix, a negation), a nested
    .gitignore with its own negation, a tracked file inside an ignored directory, and a nested
    repository whose .gitignore only it knows. The user's global git config is kept out."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    _tree(tmp_path, [f for f in GIT_FILES if not f.startswith("nested/")])
    (tmp_path / ".gitignore").write_text(GITIGNORE)
    (tmp_path / "vendor" / ".gitignore").write_text("*.pt\n!keep.pt\n")
    _git(tmp_path, "init", "-q", ".")
    _git(tmp_path, "add", "-f", "forced/tracked.onnx")
    nested = tmp_path / "nested"
    _tree(nested, ["inner.onnx", "scratch/tmp.onnx"])
    (nested / ".gitignore").write_text("scratch/\n")
    _git(nested, "init", "-q", ".")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _ignored_one_by_one(repo: Path, files: list[str]) -> set[str]:
    """What git says about each file on its own, in the repository that holds it: the walk's
    batched answer must agree."""
    out = set()
    for name in files:
        path = repo / name
        top = next(p for p in path.parents if (p / ".git").exists())
        done = subprocess.run([GIT, "check-ignore", "-q", os.path.relpath(path, top)], cwd=top)
        assert done.returncode in (0, 1)
        if done.returncode == 0:
            out.add(name)
    return out


@needs_git
def test_a_walk_skips_what_git_ignores(git_tree):
    found = _posix(discover(["."]))
    assert found == [*GIT_KEPT[:3], "nested/inner.onnx", GIT_KEPT[3]]
    everything = _posix(discover(["."], respect_gitignore=False))
    assert len(everything) == 12  # 10 model files in the tree, plus the nested repository's two
    assert set(everything) - set(found) == _ignored_one_by_one(git_tree, everything)
    # From a subdirectory, and through a glob, the same rules hold.
    assert _posix(discover(["models"])) == ["models/a.onnx", "models/sub/best.onnx"]
    assert _posix(discover(["**/*.onnx"])) == [p for p in found if p.endswith(".onnx")]
    assert _posix(discover(["models/sub/*"])) == ["models/sub/best.onnx"]
    assert _posix(discover(["*"])) == found  # matched directories walked, the nested one by its rules
    assert _posix(discover(["nested/*"])) == ["nested/inner.onnx"]


@needs_git
def test_one_git_call_per_walk_and_per_nested_repository(git_tree, monkeypatch):
    calls: list[list[str]] = []
    run = subprocess.run

    def spy(args, *rest, **kwargs):
        calls.append(list(args))
        return run(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    discover(["."])
    listing = ["ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory"]
    assert [c[-6:] for c in calls] == [listing, listing]  # the tree's, then the nested repository's
    calls.clear()
    discover(["models", "vendor"])
    assert len(calls) == 2


@needs_git
def test_a_named_ignored_file_is_audited_unless_force_exclude(git_tree):
    named = ["checkpoints/run1/step_100.pt", "models/a.fixed.onnx", "models/a.onnx"]
    assert _posix(discover(named)) == sorted(named)
    assert _posix(discover(named, force_exclude=True)) == ["models/a.onnx"]
    assert discover(["checkpoints/run1/step_100.pt"], force_exclude=True) == []  # pre-commit's empty run
    assert _posix(discover(named, force_exclude=True, respect_gitignore=False)) == sorted(named)
    # A tracked file is never ignored, named or walked; nor is a file of a nested repository.
    assert _posix(discover(["forced/tracked.onnx", "nested/inner.onnx"], force_exclude=True)) == [
        "forced/tracked.onnx",
        "nested/inner.onnx",
    ]
    assert discover(["nested/scratch/tmp.onnx"], force_exclude=True) == []


@needs_git
def test_a_named_ignored_directory_is_walked_whole_unless_force_exclude(git_tree):
    steps = ["checkpoints/run1/step_100.pt", "checkpoints/run1/step_200.pt"]
    assert _posix(discover(["checkpoints"])) == steps
    assert _posix(discover(["checkpoints/run1"])) == steps
    assert discover(["checkpoints"], force_exclude=True) == []


def test_without_a_repository_or_without_git_nothing_is_filtered(tree, monkeypatch):
    (tree / ".gitignore").write_text("models/\n")  # not a work tree: git's rules do not apply
    assert _posix(discover(["models"])) == WALKED
    monkeypatch.setenv("PATH", str(tree / "no-such-bin"))  # no git at all
    assert _posix(discover(["."], force_exclude=True)) == ["legacy/keep/new.onnx", "legacy/old.onnx", *WALKED]


@needs_git
def test_without_git_on_path_a_repository_is_walked_unfiltered(git_tree, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(git_tree / "no-such-bin"))
    assert len(discover(["."])) == 12
    assert capsys.readouterr() == ("", "")  # silently


@needs_git
def test_a_repositorys_fsmonitor_hook_does_not_run(git_tree):
    """``core.fsmonitor`` in a repository's config names a program that plain ``git ls-files``
    and ``git check-ignore`` run; a model repository unpacked from an archive could set it."""
    marker = git_tree / "hook-ran"
    hook = git_tree / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch '{marker}'\n")
    hook.chmod(0o755)
    _git(git_tree, "config", "core.fsmonitor", str(hook))
    _git(git_tree, "add", ".gitignore")  # an index for the hook to be asked about
    subprocess.run([GIT, "ls-files", "--others"], cwd=git_tree, capture_output=True, check=True)
    assert marker.exists()  # the hazard is real: plain git runs it
    marker.unlink()
    assert len(discover(["."])) == 5
    assert _posix(discover(["models/a.fixed.onnx", "models/a.onnx"], force_exclude=True)) == ["models/a.onnx"]
    assert not marker.exists()
