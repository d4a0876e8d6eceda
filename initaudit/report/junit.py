"""JUnit XML for test dashboards (Jenkins, GitLab, Azure DevOps, test-reporter actions).

One ``<testsuite>`` per model and one ``<testcase>`` per rule family (FM1, FM2, residual
branches, Monte Carlo agreement, weight hygiene, modeling notes), so the test names stay the
same from run to run and a dashboard can track them. A family fails when any of its findings
is at or above ``--fail-on``; the ``<failure>`` lists each of them with its tensor or node
and fix, and findings below the threshold go to ``<system-out>``. A family that cannot run on
this model (FM2 in a weights-only audit, Monte Carlo without ``--mc``) is ``<skipped>`` with
the reason. A model that could not be audited is a suite with one ``<error>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from initaudit.audit import AuditResult
from initaudit.report.common import FAMILIES, Entry, blocking, family, visible_controls
from initaudit.report.model_error import ModelError
from initaudit.rules import RULES, Finding


def xml_safe(text: str) -> str:
    """``text`` without the characters XML 1.0 forbids (each shown as ``\\xNN``/``\\uNNNN``)."""
    return visible_controls(text)


def _element(parent: ET.Element | None, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    clean = {key: xml_safe(str(value)) for key, value in attrs.items() if value is not None}
    element = ET.Element(tag, clean) if parent is None else ET.SubElement(parent, tag, clean)
    if text is not None:
        element.text = xml_safe(text)
    return element


def _describe(finding: Finding) -> str:
    head = f"{finding.code} {RULES[finding.code].name} [{finding.severity}]"
    lines = [head + (f" at {finding.location}" if finding.location else ""), f"  {finding.message}"]
    if finding.fix:
        lines.append(f"  fix: {finding.fix}")
    return "\n".join(lines)


def _skip_reason(result: AuditResult, prefix: str) -> str | None:
    """Why a family did not run on this model, or None when it did."""
    runs_without_graph = any(r.weights_only for code, r in RULES.items() if family(code) == prefix)
    graph_rules = prefix in ("IA1", "IA2", "IA3", "IA4")
    if graph_rules and not result.computable and not (result.weights_only and runs_without_graph):
        return result.not_computed_reason
    if prefix == "IA4":
        measured = result.prediction.measured
        if measured is None:
            return "Monte Carlo not run (pass --mc SAMPLES)"
        if measured.resample == "inputs" or not measured.comparable:
            return "Monte Carlo ran, but measurement and prediction are not compared for this model"
    return None


def _suite(root: ET.Element, result: AuditResult, fail_on: str) -> dict[str, int]:
    suite = _element(root, "testsuite", name=result.path)
    properties = _element(suite, "properties")
    for name, value in (
        ("format", result.graph.format),
        ("audit", result.audit_kind),
        ("fm1", result.verdict("fm1")),
        ("fm2", result.verdict("fm2")),
        ("fail_on", fail_on),
        ("suppressed", result.suppressed),
    ):
        _element(properties, "property", name=name, value=value)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for prefix, label in FAMILIES.items():
        findings = [f for f in result.findings if family(f.code) == prefix]
        case = _element(suite, "testcase", classname=result.path, name=f"{prefix}xx {label}")
        counts["tests"] += 1
        failing = [f for f in findings if blocking(f, fail_on)]
        reason = _skip_reason(result, prefix)
        if failing:
            counts["failures"] += 1
            first = failing[0]
            summary = f"{len(failing)} finding(s) at or above {fail_on}: {first.code} {first.message}"
            _element(
                case,
                "failure",
                "\n".join(_describe(f) for f in failing),
                message=" ".join(summary.splitlines()),
                type=first.code,
            )
        elif reason is not None and not findings:
            counts["skipped"] += 1
            _element(case, "skipped", message=reason)
        passing = [f for f in findings if not blocking(f, fail_on)]
        if passing:
            _element(case, "system-out", "\n".join(_describe(f) for f in passing))
    for key, value in counts.items():
        suite.set(key, str(value))
    return counts


def _error_suite(root: ET.Element, error: ModelError) -> dict[str, int]:
    suite = _element(root, "testsuite", name=error.path, tests=1, failures=0, errors=1, skipped=0)
    case = _element(suite, "testcase", classname=error.path, name="load")
    _element(case, "error", error.message, message=" ".join(error.message.splitlines()), type="ModelError")
    return {"tests": 1, "failures": 0, "errors": 1, "skipped": 0}


def render_junit(results: Sequence[Entry], fail_on: str = "error") -> str:
    """A JUnit XML document (``<testsuites>``) for every model of the run."""
    root = _element(None, "testsuites", name="initaudit")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for entry in results:
        counts = _error_suite(root, entry) if isinstance(entry, ModelError) else _suite(root, entry, fail_on)
        for key, value in counts.items():
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
