"""Errors the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

from pathlib import Path


class InitauditError(Exception):
    """Base class: anything the user can fix, reported without a traceback."""


class LoadError(InitauditError):
    """A model file that cannot be read: missing, empty, truncated, malformed or unsafe."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UsageError(InitauditError):
    """Options that do not fit together or do not parse."""
