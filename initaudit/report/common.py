"""What the machine formats share: entries, thresholds, paths, rule families, numbers.

Nothing here imports rich: machine formats are plain text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from initaudit.audit import AuditResult
from initaudit.report.model_error import ModelError
from initaudit.rules import Finding, Severity
from initaudit.stats import TensorStats

#: One element of a run: a model that was audited, or one that could not be.
Entry = AuditResult | ModelError

#: Rule families by code prefix (DESIGN.md's numbering), in report order.
FAMILIES: dict[str, str] = {
    "IA1": "mean length (FM1)",
    "IA2": "length variance (FM2)",
    "IA3": "residual branches",
    "IA4": "Monte Carlo agreement",
    "IA5": "weight hygiene",
    "IA9": "modeling notes",
}


def family(code: str) -> str:
    """The family prefix of a rule code (``IA103`` -> ``IA1``)."""
    return code[:3]


def threshold(fail_on: str | Severity) -> Severity:
    return fail_on if isinstance(fail_on, Severity) else Severity.parse(fail_on)


def blocking(finding: Finding, fail_on: str | Severity) -> bool:
    """Whether the finding is at or above ``--fail-on``: it makes the run exit 1."""
    return finding.severity >= threshold(fail_on)


def audits(entries: Iterable[Entry]) -> list[AuditResult]:
    return [e for e in entries if isinstance(e, AuditResult)]


def errors(entries: Iterable[Entry]) -> list[ModelError]:
    return [e for e in entries if isinstance(e, ModelError)]


def tensor_names(result: AuditResult) -> set[str]:
    """Every tensor name of the graph (weights, biases, norm parameters, skipped tensors):
    a finding's location is one of these or a node name."""
    names: set[str] = set()
    for layer in result.graph:
        for tensor in (layer.weight, layer.bias, layer.attrs.get("gamma"), layer.attrs.get("beta")):
            if isinstance(tensor, TensorStats):
                names.add(tensor.name)
    for row in result.graph.meta.get("skipped", []) or []:
        if isinstance(row, dict) and isinstance(row.get("name"), str):
            names.add(row["name"])
    return names


def location_kind(result: AuditResult, location: str, tensors: set[str] | None = None) -> str:
    """``"tensor"``, ``"node"`` or ``""`` (the whole model)."""
    if not location:
        return ""
    if location in (tensor_names(result) if tensors is None else tensors):
        return "tensor"
    return "node"


def last_tap(result: AuditResult) -> str | None:
    """The last tap's layer name: where the summary's L-th length is judged."""
    taps = [row.name for row in result.prediction.layers if row.tap]
    return taps[-1] if taps else None


def measured_at(result: AuditResult, name: str | None) -> Any:
    """The Monte Carlo estimate at a layer (``montecarlo.estimates.TapEstimate``) or None."""
    measured = result.prediction.measured
    if measured is None or name is None:
        return None
    return measured.taps.get(name)


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for people: 3 significant digits, exponent form outside [1e-3, 1e5)."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if not math.isfinite(x):
        return str(float(x))
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


def one_line(text: str) -> str:
    """Text for a one-line field: line breaks become spaces (the full text stays elsewhere)."""
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


#: C0 controls but tab, LF and CR; DEL; lone surrogates; the XML 1.0 non-characters U+FFFE, U+FFFF.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def visible_controls(text: str) -> str:
    """``text`` with each control character shown as ``\\xNN`` (or ``\\uNNNN``): XML 1.0 cannot
    carry them at all, and in markdown they are invisible."""
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text
    )
