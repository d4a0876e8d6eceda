"""GitHub Actions workflow commands: one annotation per finding, on the model file.

``::error file=PATH,title=initaudit IA101::message``, escaped as the actions toolkit does
(``@actions/core``'s ``escapeData`` and ``escapeProperty``): in the message ``%``, CR and LF;
in properties also ``:`` and ``,``. The message keeps its line breaks (escaped), so the
annotation shows the finding, the tensor or node, and the fix on separate lines. There is no
``line=``: a model file is binary, so the annotation belongs to the file.
"""

from __future__ import annotations

from collections.abc import Sequence

from initaudit.report.common import Entry
from initaudit.report.model_error import ModelError
from initaudit.rules import RULES, Severity

COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    """A command's message, as ``escapeData`` in ``@actions/core``."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A property value (``file``, ``title``), as ``escapeProperty`` in ``@actions/core``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str, **properties: str) -> str:
    """One workflow command line (without the newline)."""
    props = ",".join(f"{key}={escape_property(value)}" for key, value in properties.items())
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


def render_github(results: Sequence[Entry], fail_on: str = "error") -> str:
    """One workflow command per finding (``error``, ``warning`` or ``notice`` by severity) and
    one ``::error`` per model that could not be audited. ``fail_on`` is accepted so every
    renderer takes the same arguments; the job's exit code, not the annotation level, gates."""
    lines: list[str] = []
    for entry in results:
        if isinstance(entry, ModelError):
            lines.append(command("error", entry.message, file=entry.path, title="initaudit: cannot audit"))
            continue
        for finding in entry.findings:
            parts = [f"{RULES[finding.code].name}: {finding.message}"]
            if finding.location:
                parts.append(f"at: {finding.location}")
            if finding.fix:
                parts.append(f"fix: {finding.fix}")
            lines.append(
                command(
                    COMMAND[finding.severity],
                    "\n".join(parts),
                    file=entry.path,
                    title=f"initaudit {finding.code}",
                )
            )
    return "".join(line + "\n" for line in lines)
