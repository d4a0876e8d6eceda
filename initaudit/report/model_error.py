"""A model that could not be audited, as the reports show it beside the audits that ran.

A multi-model run keeps going past a file it cannot read: the renderers take a list whose
elements are :class:`~initaudit.audit.AuditResult` or :class:`ModelError`, and every
format shows the error where it would have shown the model (a SARIF tool-execution
notification, a JUnit ``<error>``, a GitHub ``::error``, a markdown row, a JSON ``errors``
entry).
"""

from __future__ import annotations

from dataclasses import dataclass

from initaudit.errors import InitauditError, LoadError


@dataclass(frozen=True)
class ModelError:
    """``path``: the model path as the reports show it (see ``audit.display_path``);
    ``message``: one line saying what went wrong, without the path."""

    path: str
    message: str

    @classmethod
    def from_exception(cls, path: str, error: BaseException) -> ModelError:
        """The error the CLI would print for ``path``: a LoadError's problem as it stands,
        anything else prefixed with its type (an internal error is a bug to report)."""
        if isinstance(error, LoadError):
            message = error.problem
        elif isinstance(error, InitauditError | ValueError):
            message = str(error)
        else:
            message = f"internal error: {type(error).__name__}: {error}"
        return cls(path=path, message=message or type(error).__name__)
