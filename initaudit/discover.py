"""Which files to audit: paths, directories and globs, with ruff-style excludes.

- A file named on the command line is audited whatever its suffix (the format is sniffed from its
  bytes), and excludes do not apply to it unless ``force_exclude``: pre-commit passes every staged
  file by name, and ``--force-exclude`` is how the project's excludes still hold there.
- A directory is walked recursively for :data:`MODEL_SUFFIXES`, skipping excluded directories.
  ``.bin`` and ``.ckpt`` are not walked: the names are too generic (any binary blob, any trainer's
  checkpoint); name such files explicitly or glob for them.
- A sharded checkpoint's index (``*.safetensors.index.json``, ``*.bin.index.json``) is walked too,
  and audits its shards as one model: a shard that an index found in the same run lists, in the
  same directory, is not audited again on its own. A shard named without its index is audited
  alone (weights only).
- A glob (``models/**/*.onnx``) is expanded here too, so a quoted pattern works where no shell
  expands it (a GitHub Action input, Windows). Its matches are treated like walked files.
- Paths git ignores are skipped while walking (ruff's ``respect-gitignore``, on by default): a
  checkpoint folder or ``*.fixed.onnx`` listed in ``.gitignore`` is not a model the repository
  ships. Git itself answers, in one ``git ls-files`` call per walked directory (and one per nested
  repository), so nested ``.gitignore`` files, negations, ``.git/info/exclude`` and the global
  excludes file all count exactly as git counts them; a tracked file is never ignored (git's rule,
  where ruff's matcher goes by patterns alone). Without ``git`` on PATH, or outside a work tree,
  nothing is filtered, silently. A file named on the command line is audited even when ignored,
  unless ``force_exclude``; a directory named on the command line that git ignores as a whole is
  walked whole (naming it is asking for it).
- Nothing to audit is an error (exit 2), unlike ruff's warning and exit 0: a CI gate whose models
  folder was moved should go red, not green forever. The exception is pre-commit's case, where
  every named file was excluded by ``force_exclude``: then the list is simply empty.

Patterns (``exclude``, ``per-file-ignores``) are matched against paths relative to a root, the
directory of the config that holds them. A pattern without ``/`` matches a file or directory name
at any depth (``build``, ``*.tmp.onnx``); one with ``/`` matches the path from the root
(``models/legacy``, ``models/**/draft_*.onnx``; a leading ``/`` is allowed). A pattern that
matches a directory matches everything under it. ``*`` and ``?`` stay within one path segment,
``**`` crosses segments, ``[abc]`` and ``{a,b}`` work as in ruff's globs.
"""

from __future__ import annotations

import functools
import glob as globlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from initaudit.errors import UsageError
from initaudit.frontends.shards import INDEX_SUFFIXES, is_index_name, listed_shards

#: Suffixes a directory walk picks up (with the index names of :data:`INDEX_SUFFIXES`); the
#: pre-commit hook's ``files:`` regex lists the same.
MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".pt2", ".safetensors")

#: ruff's default excludes, less the Python-only ones, plus the caches ML repositories grow.
DEFAULT_EXCLUDE = (
    ".bzr",
    ".direnv",
    ".eggs",
    ".git",
    ".git-rewrite",
    ".hg",
    ".ipynb_checkpoints",
    ".mypy_cache",
    ".nox",
    ".pants.d",
    ".pytest_cache",
    ".pytype",
    ".ruff_cache",
    ".svn",
    ".tox",
    ".venv",
    "__pypackages__",
    "__pycache__",
    "_build",
    "buck-out",
    "build",
    "dist",
    "node_modules",
    "site-packages",
    "venv",
)

_GLOB_CHARS = re.compile(r"[*?\[{]")


@functools.lru_cache(maxsize=512)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regular expression for ``pattern`` matched against a whole POSIX path (see the module
    docstring). Raises ValueError for an unbalanced ``[`` or ``{``."""
    text = pattern.strip().replace("\\", "/").removeprefix("./").lstrip("/").rstrip("/")
    out: list[str] = []
    i, braces = 0, 0
    while i < len(text):
        c = text[i]
        if text.startswith("**", i):
            start = i == 0 or text[i - 1] == "/"
            end = i + 2 == len(text) or text[i + 2] == "/"
            if not (start and end):
                raise ValueError(f"glob {pattern!r}: '**' must be a whole path segment")
            if i + 2 == len(text):
                out.append(".*")
                i += 2
            else:
                out.append("(?:[^/]+/)*")
                i += 3
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            close = text.find("]", i + 2 if text[i + 1 : i + 2] in ("!", "]") else i + 1)
            if close < 0:
                raise ValueError(f"glob {pattern!r}: unclosed '['")
            body = text[i + 1 : close]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = close + 1
            continue
        elif c == "{":
            braces += 1
            out.append("(?:")
        elif c == "}" and braces:
            braces -= 1
            out.append(")")
        elif c == "," and braces:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    if braces:
        raise ValueError(f"glob {pattern!r}: unclosed '{{'")
    return re.compile("".join(out))


def matches(pattern: str, path: Path, root: Path, below: Path | None = None) -> bool:
    """Whether ``pattern`` matches ``path`` or a directory above it, relative to ``root``.

    Directories at or above ``below`` are not considered: a directory named on the command line
    is walked even when its own name is excluded (as in ruff), only what lies under it is judged.
    """
    return _matches(pattern, _Split.of(path, root, below))


def is_excluded(path: Path, patterns: Iterable[str], root: Path, below: Path | None = None) -> bool:
    split = _Split.of(path, root, below)  # once per path: it resolves directories
    return any(_matches(p, split) for p in patterns)


class _Split(NamedTuple):
    """A path as patterns see it: its components below the root (None outside it), the first
    of them that may match, and the names a pattern without ``/`` may match (``inside``: they
    are the components below ``below`` or the root, not just the file's own name)."""

    relative: tuple[str, ...] | None
    start: int
    names: tuple[str, ...]
    inside: bool

    @classmethod
    def of(cls, path: Path, root: Path, below: Path | None) -> _Split:
        relative = _parts(path, root)
        skip = _parts(below, root) if below is not None else ()
        start = len(skip) if relative is not None and skip and relative[: len(skip)] == skip else 0
        names = _parts(path, below) if below is not None else relative
        if names is not None:
            return cls(relative, start, names, True)
        if relative is not None:
            return cls(relative, start, relative, True)
        return cls(relative, start, (absolute_path(path).name,), False)

    def child(self, name: str) -> _Split:
        """The split of an entry in this directory, without touching the file system."""
        relative = None if self.relative is None else (*self.relative, name)
        return _Split(relative, self.start, (*self.names, name) if self.inside else (name,), self.inside)


def _matches(pattern: str, split: _Split) -> bool:
    regex = compile_glob(pattern)
    if "/" in pattern.strip().replace("\\", "/").rstrip("/").removeprefix("./"):  # anchored
        relative = split.relative
        if relative is None:  # outside the root: a path pattern cannot match
            return False
        return any(regex.fullmatch("/".join(relative[: n + 1])) for n in range(split.start, len(relative)))
    return any(regex.fullmatch(name) for name in split.names)


def discover(
    paths: Sequence[str | Path],
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    extend_exclude: Sequence[str] = (),
    force_exclude: bool = False,
    root: Path | None = None,
    warn: Callable[[str], None] | None = None,
    respect_gitignore: bool = True,
) -> list[Path]:
    """The model files to audit, sorted and without duplicates (see the module docstring).

    ``exclude`` replaces the defaults, ``extend_exclude`` adds to them (ruff's semantics);
    patterns are relative to ``root`` (the working directory by default). ``respect_gitignore``
    skips what git ignores while walking (and in named paths with ``force_exclude``). ``warn``
    hears about a directory or glob that contributed nothing while others did. Raises
    :class:`UsageError` for a path that does not exist, a glob that matches nothing, or when
    nothing at all is left.
    """
    root = (root or Path.cwd()).absolute()
    patterns = (*exclude, *extend_exclude)
    found: dict[Path, Path] = {}  # identity -> the path as it will be shown
    empty: list[str] = []
    named_excluded = 0
    git = GitIgnore() if respect_gitignore else None
    git_named: set[Path] = set()
    if git is not None and force_exclude:
        git_named = git.ignored_paths([Path(p) for p in paths if Path(p).exists()])

    def add(path: Path) -> None:
        found.setdefault(_identity(path), path)

    for given in paths:
        text = str(given)
        path = Path(given)
        if path.is_file():
            if force_exclude and (absolute_path(path) in git_named or is_excluded(path, patterns, root)):
                named_excluded += 1
            else:
                add(path)
        elif path.is_dir():
            if force_exclude and (absolute_path(path) in git_named or is_excluded(path, patterns, root)):
                named_excluded += 1
                continue
            scope = git.scope(path) if git is not None else None
            files = list(_walk(path, patterns, root, below=path, git=git, scope=scope))
            if not files:
                empty.append(f"no model files under {text}")
            for file in files:
                add(file)
        elif _GLOB_CHARS.search(text):
            if not globlib.glob(text, recursive=True):
                raise UsageError(f"{text}: no files match this pattern")
            files = list(_expand(text, patterns, root, git))
            if not files:
                empty.append(f"no model files match {text}")
            for file in files:
                add(file)
        elif path.exists() or path.is_symlink():
            raise UsageError(f"{text}: not a file or directory (a broken link?)")
        else:
            raise UsageError(f"{text}: no such file or directory")

    if not found:
        if empty or not named_excluded:
            what = "; ".join(empty) or "no paths given"
            looked = ", ".join("*" + s for s in (*MODEL_SUFFIXES, *INDEX_SUFFIXES))
            raise UsageError(f"{what} (looked for {looked})")
        return []
    for message in empty:
        if warn is not None:
            warn(message)
    return sorted(_without_indexed_shards(found.values()), key=lambda p: p.as_posix())


def _without_indexed_shards(paths: Iterable[Path]) -> list[Path]:
    """``paths`` less the shards that an index among them lists in its own directory: auditing
    the index audits them, as one model."""
    paths = list(paths)
    covered: set[Path] = set()
    for index in paths:
        if is_index_name(index.name):
            directory = absolute_path(index).parent
            covered.update(directory / name for name in listed_shards(index))
    if not covered:
        return paths
    return [path for path in paths if absolute_path(path) not in covered]


def _walk(
    top: Path,
    patterns: Sequence[str],
    root: Path,
    below: Path,
    git: GitIgnore | None = None,
    scope: _Scope | None = None,
) -> Iterable[Path]:
    """Model files under ``top``, pruning excluded directories and, with ``git``, what git ignores
    (``scope`` places ``top`` in a listing; None where git has nothing to say)."""
    splits = {top: _Split.of(top, root, below)}  # one resolve per walk, then by name
    scopes = {top: scope}
    for directory, dirnames, filenames in os.walk(top):
        here = Path(directory)
        split = splits.pop(here)
        scope = scopes.pop(here)
        if git is not None and here != top and (".git" in dirnames or ".git" in filenames):
            scope = git.scope(here)  # a nested repository or submodule: its own ignore rules
        kept = []
        for name in sorted(dirnames):
            child = split.child(name)
            inner = scope.child(name) if scope is not None else None
            if not any(_matches(p, child) for p in patterns) and not (inner is not None and inner.ignored):
                kept.append(name)
                splits[here / name] = child
                scopes[here / name] = inner
        dirnames[:] = kept
        for name in sorted(filenames):
            if (
                (Path(name).suffix.lower() in MODEL_SUFFIXES or is_index_name(name))
                and not any(_matches(p, split.child(name)) for p in patterns)
                and not (scope is not None and scope.child(name).ignored)
            ):
                yield here / name


def _expand(
    pattern: str, patterns: Sequence[str], root: Path, git: GitIgnore | None = None
) -> Iterable[Path]:
    """A glob's matches: model files (or files with the pattern's own literal suffix, as in
    ``weights/*.bin``), and model files under matched directories. Excludes apply below the
    pattern's literal base (``build/*.onnx`` names ``build`` as explicitly as ``build/`` does)."""
    wanted = Path(pattern).suffix.lower()
    suffixes = MODEL_SUFFIXES if not wanted or _GLOB_CHARS.search(wanted) else (*MODEL_SUFFIXES, wanted)
    first = _GLOB_CHARS.search(pattern)
    base = Path(pattern[: first.start() if first else len(pattern)].rpartition("/")[0] or ".")
    found = [Path(m) for m in sorted(globlib.glob(pattern, recursive=True))]
    found = [path for path in found if not is_excluded(path, patterns, root, base)]
    scopes: dict[Path, _Scope | None] = dict.fromkeys(found)
    ignored: set[Path] = set()
    if git is not None and base.is_dir():
        # The base's listing answers for its own work tree; a match in a nested repository is
        # asked of that repository (check-ignore, batched), as a walk would.
        listing, tree = git.scope(base), git.work_tree(absolute_path(base))
        nested = {path for path in found if git.work_tree(_container(path)) != tree}
        hits = git.ignored_paths(sorted(nested)) if nested else set()
        for path in found:
            if path not in nested:
                scope = listing.at(os.path.relpath(path, base)) if listing is not None else None
                if scope is not None and scope.ignored:
                    ignored.add(path)
                scopes[path] = scope
            elif absolute_path(path) in hits:
                ignored.add(path)
            elif path.is_dir():
                scopes[path] = git.scope(path)
    for path, scope in scopes.items():
        if path in ignored:
            continue
        if path.is_dir():
            yield from _walk(path, patterns, root, below=base, git=git, scope=scope)
        elif path.is_file() and (path.suffix.lower() in suffixes or is_index_name(path.name)):
            yield path


def _container(path: Path) -> Path:
    """The directory whose work tree decides about ``path``: a directory's own, a file's parent."""
    absolute = absolute_path(path)
    return absolute if path.is_dir() else absolute.parent


# ----------------------------------------------------------------------------- git

#: Variables that point git at another repository or index; a hook (pre-commit) may set them
#: relative to its own directory, which would misplace a query run from a model's directory.
_GIT_LOCATION_VARS = frozenset(
    {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR", "GIT_PREFIX"}
)


class _Scope(NamedTuple):
    """A directory's place in a git listing: the paths git ignores below the listing's base,
    and this directory's path relative to that base ("" for the base itself)."""

    files: frozenset[str]
    dirs: frozenset[str]
    rel: str

    def child(self, name: str) -> _Scope:
        return self._replace(rel=f"{self.rel}/{name}" if self.rel else name)

    def at(self, relative: str) -> _Scope | None:
        """The scope of a path below this one, given relative to it; None outside it."""
        relative = Path(relative).as_posix()
        if relative == ".":
            return self
        if relative == ".." or relative.startswith("../"):
            return None
        return self._replace(rel=f"{self.rel}/{relative}" if self.rel else relative)

    @property
    def ignored(self) -> bool:
        """Whether git ignores this path or a directory between it and the base (the walk prunes
        ignored directories, but a glob's match may lie deep below one)."""
        if self.rel in self.files or self.rel in self.dirs:
            return True
        parts = self.rel.split("/")
        return any("/".join(parts[:n]) in self.dirs for n in range(1, len(parts)))


class GitIgnore:
    """Asks git which paths it ignores, once per directory walked (see the module docstring)."""

    def __init__(self) -> None:
        self.git = shutil.which("git")
        self._trees: dict[Path, Path | None] = {}

    def _run(self, args: list[str], cwd: Path, stdin: bytes | None = None) -> bytes | None:
        """git's stdout, or None when git is missing or fails (not a work tree, a repository owned
        by someone else, ...). The one setting in a repository's own config that would make these
        commands run a program, the fsmonitor hook, is switched off, and no pager starts."""
        if self.git is None:
            return None
        env = {key: value for key, value in os.environ.items() if key not in _GIT_LOCATION_VARS}
        try:
            done = subprocess.run(
                [self.git, "--no-pager", "-c", "core.fsmonitor=false", *args],
                cwd=cwd,
                input=stdin,
                capture_output=True,
                env=env,
                check=False,
            )
        except OSError:
            return None
        # check-ignore exits 1 when nothing is ignored; anything else non-zero is a failure.
        ok = done.returncode == 0 or (args[0] == "check-ignore" and done.returncode == 1)
        return done.stdout if ok else None

    def scope(self, directory: Path) -> _Scope | None:
        """What git ignores below ``directory``; None without git, outside a work tree, or when
        git ignores ``directory`` itself (a directory named explicitly is walked whole)."""
        out = self._run(
            ["ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory"], directory
        )
        if out is None:
            return None
        files: set[str] = set()
        dirs: set[str] = set()
        for entry in out.split(b"\0"):
            text = os.fsdecode(entry)
            if text == "./":
                return None
            if text.endswith("/"):
                dirs.add(text.rstrip("/"))
            elif text:
                files.add(text)
        return _Scope(frozenset(files), frozenset(dirs), "")

    def ignored_paths(self, paths: Sequence[Path]) -> set[Path]:
        """Which of ``paths`` git ignores, as :func:`absolute_path` gives them: one ``git check-ignore``
        per work tree they lie in."""
        groups: dict[Path, list[Path]] = {}
        for path in paths:
            absolute = absolute_path(path)
            tree = self.work_tree(absolute.parent)
            if tree is not None:
                groups.setdefault(tree, []).append(absolute)
        ignored: set[Path] = set()
        for tree, members in groups.items():
            relative = [os.path.relpath(member, tree) for member in members]
            out = self._run(
                ["check-ignore", "-z", "--stdin"], tree, b"".join(os.fsencode(r) + b"\0" for r in relative)
            )
            if out:
                hits = {os.fsdecode(entry) for entry in out.split(b"\0") if entry}
                ignored.update(m for m, r in zip(members, relative, strict=True) if r in hits)
        return ignored

    def work_tree(self, directory: Path) -> Path | None:
        """The innermost directory at or above ``directory`` holding ``.git`` (a folder, or the
        file of a submodule or worktree), found on disk without running git."""
        visited = []
        found: Path | None = None
        for here in (directory, *directory.parents):
            if here in self._trees:
                found = self._trees[here]
                break
            visited.append(here)
            if (here / ".git").exists():
                found = here
                break
        for here in visited:
            self._trees[here] = found
        return found


def _parts(path: Path, root: Path) -> tuple[str, ...] | None:
    """``path``'s components below ``root`` (empty for the root itself), or None outside it."""
    absolute = absolute_path(path)
    for base in (root.absolute(), absolute_path(root)):
        try:
            return absolute.relative_to(base).parts
        except ValueError:
            continue
    return None


def absolute_path(path: Path) -> Path:
    """Absolute, with symlinked directories resolved but the file's own name kept."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent.resolve() / absolute.name if absolute.name else absolute.resolve()


def _identity(path: Path) -> Path:
    return path.resolve()
