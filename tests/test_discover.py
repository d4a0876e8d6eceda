"""Discovery: files, directories and globs; ruff-style excludes; pre-commit's explicit lists."""

from __future__ import annotations

import os
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
