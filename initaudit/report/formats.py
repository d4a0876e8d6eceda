"""The machine formats by name: one place that maps ``--format`` and the file sinks to renderers.

Every renderer takes the run's entries (audits and :class:`ModelError` rows) and returns plain
text; none goes through rich (it wraps lines and eats ``[...]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

from initaudit.audit import AuditResult
from initaudit.report.model_error import ModelError

#: name -> (module, function); imported on use so a run pays only for what it writes.
RENDERERS = {
    "json": ("initaudit.report.json_report", "render_json"),
    "sarif": ("initaudit.report.sarif", "render_sarif"),
    "github": ("initaudit.report.github", "render_github"),
    "junit": ("initaudit.report.junit", "render_junit"),
    "markdown": ("initaudit.report.markdown", "render_markdown"),
}


def render(
    name: str, entries: Sequence[AuditResult | ModelError], fail_on: str, root: Path | None = None
) -> str:
    """The report ``name`` of ``entries``. SARIF makes its URIs relative to ``root``."""
    module, function = RENDERERS[name]
    renderer = getattr(import_module(module), function)
    if name == "sarif":
        return renderer(entries, fail_on, root=root)
    return renderer(entries, fail_on)
