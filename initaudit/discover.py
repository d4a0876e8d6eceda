"""Which files to audit: paths, directories and globs, with ruff-style excludes.

- A file named on the command line is audited whatever its suffix (the format is sniffed from its
  bytes), and excludes do not apply to it unless ``force_exclude``: pre-commit passes every staged
  file by name, and ``--force-exclude`` is how the project's excludes still hold there.
- A directory is walked recursively for :data:`MODEL_SUFFIXES`, skipping excluded directories.
  ``.bin`` and ``.ckpt`` are not walked: the names are too generic (any binary blob, any trainer's
  checkpoint); name such files explicitly or glob for them.
- A glob (``models/**/*.onnx``) is expanded here too, so a quoted pattern works where no shell
  expands it (a GitHub Action input, Windows). Its matches are treated like walked files.
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from initaudit.errors import UsageError

#: Suffixes a directory walk picks up; the pre-commit hook's ``files:`` regex lists the same.
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
        return cls(relative, start, (_absolute(path).name,), False)

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
) -> list[Path]:
    """The model files to audit, sorted and without duplicates (see the module docstring).

    ``exclude`` replaces the defaults, ``extend_exclude`` adds to them (ruff's semantics);
    patterns are relative to ``root`` (the working directory by default). ``warn`` hears about a
    directory or glob that contributed nothing while others did. Raises :class:`UsageError` for
    a path that does not exist, a glob that matches nothing, or when nothing at all is left.
    """
    root = (root or Path.cwd()).absolute()
    patterns = (*exclude, *extend_exclude)
    found: dict[Path, Path] = {}  # identity -> the path as it will be shown
    empty: list[str] = []
    named_excluded = 0

    def add(path: Path) -> None:
        found.setdefault(_identity(path), path)

    for given in paths:
        text = str(given)
        path = Path(given)
        if path.is_file():
            if force_exclude and is_excluded(path, patterns, root):
                named_excluded += 1
            else:
                add(path)
        elif path.is_dir():
            if force_exclude and is_excluded(path, patterns, root):
                named_excluded += 1
                continue
            files = list(_walk(path, patterns, root, below=path))
            if not files:
                empty.append(f"no model files under {text}")
            for file in files:
                add(file)
        elif _GLOB_CHARS.search(text):
            if not globlib.glob(text, recursive=True):
                raise UsageError(f"{text}: no files match this pattern")
            files = list(_expand(text, patterns, root))
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
            raise UsageError(f"{what} (looked for {', '.join('*' + s for s in MODEL_SUFFIXES)})")
        return []
    for message in empty:
        if warn is not None:
            warn(message)
    return sorted(found.values(), key=lambda p: p.as_posix())


def _walk(top: Path, patterns: Sequence[str], root: Path, below: Path) -> Iterable[Path]:
    splits = {top: _Split.of(top, root, below)}  # one resolve per walk, then by name
    for directory, dirnames, filenames in os.walk(top):
        here = Path(directory)
        split = splits.pop(here)
        kept = []
        for name in sorted(dirnames):
            child = split.child(name)
            if not any(_matches(p, child) for p in patterns):
                kept.append(name)
                splits[here / name] = child
        dirnames[:] = kept
        for name in sorted(filenames):
            if Path(name).suffix.lower() in MODEL_SUFFIXES and not any(
                _matches(p, split.child(name)) for p in patterns
            ):
                yield here / name


def _expand(pattern: str, patterns: Sequence[str], root: Path) -> Iterable[Path]:
    """A glob's matches: model files (or files with the pattern's own literal suffix, as in
    ``weights/*.bin``), and model files under matched directories. Excludes apply below the
    pattern's literal base (``build/*.onnx`` names ``build`` as explicitly as ``build/`` does)."""
    wanted = Path(pattern).suffix.lower()
    suffixes = MODEL_SUFFIXES if not wanted or _GLOB_CHARS.search(wanted) else (*MODEL_SUFFIXES, wanted)
    first = _GLOB_CHARS.search(pattern)
    base = Path(pattern[: first.start() if first else len(pattern)].rpartition("/")[0] or ".")
    for match in sorted(globlib.glob(pattern, recursive=True)):
        path = Path(match)
        if is_excluded(path, patterns, root, base):
            continue
        if path.is_dir():
            yield from _walk(path, patterns, root, below=base)
        elif path.is_file() and path.suffix.lower() in suffixes:
            yield path


def _parts(path: Path, root: Path) -> tuple[str, ...] | None:
    """``path``'s components below ``root`` (empty for the root itself), or None outside it."""
    absolute = _absolute(path)
    for base in (root.absolute(), _absolute(root)):
        try:
            return absolute.relative_to(base).parts
        except ValueError:
            continue
    return None


def _absolute(path: Path) -> Path:
    """Absolute, with symlinked directories resolved but the file's own name kept."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent.resolve() / absolute.name if absolute.name else absolute.resolve()


def _identity(path: Path) -> Path:
    return path.resolve()
