"""SARIF 2.1.0 for code scanning (GitHub, Azure DevOps, any SARIF viewer).

Conventions for a binary model file (DESIGN.md): the artifact URI is relative to the
repository root (``%SRCROOT%``), there is no text region, the tensor or node a finding
concerns is a logical location, and every result carries ``partialFingerprints`` (the
finding's stable fingerprint: rule, path, tensor, or for a finding without a tensor its message
with the numbers blanked) so code scanning tracks it across runs and keeps two notes apart.
A model that could not be audited is a tool-execution notification of a failed invocation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from initaudit import __version__
from initaudit.audit import relative_path
from initaudit.report.common import (
    Entry,
    audits,
    blocking,
    errors,
    location_kind,
    tensor_names,
)
from initaudit.report.json_report import json_ready
from initaudit.rules import RULES, Severity

SARIF_VERSION = "2.1.0"
#: The OASIS schema's id (errata 01), which GitHub and the SARIF validators recognize.
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFORMATION_URI = "https://pypi.org/project/initaudit/"
#: The key of the fingerprint in ``partialFingerprints``: bump the version if located findings'
#: fingerprints ever change. (Findings without a location later gained their message: their alerts
#: reopen once under the new value, and keeping the key spares every located alert that churn.)
FINGERPRINT_KEY = "initaudit/v1"
SRCROOT = "%SRCROOT%"
LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
#: Logical-location kinds: a weight is a member of the model, a node an object in its graph.
LOGICAL_KIND = {"tensor": "member", "node": "object"}


def _uri(path: str, root: Path | None) -> tuple[str, bool]:
    """A URI reference for the artifact: percent-encoded and relative to ``root`` when the
    file lies beneath it, else an absolute ``file:`` URI."""
    relative, inside = relative_path(path, root)
    if inside:
        return quote(relative, safe="/"), True
    return Path(relative).as_uri(), False


def _artifact_location(uri: str, inside: bool, index: int | None = None) -> dict[str, Any]:
    location: dict[str, Any] = {"uri": uri}
    if inside:
        location["uriBaseId"] = SRCROOT
    if index is not None:
        location["index"] = index
    return location


def _rule(code: str) -> dict[str, Any]:
    rule = RULES[code]
    return {
        "id": code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.explanation},
        "help": {
            "text": f"{rule.explanation}\n\nMore: `initaudit explain {code}`.",
            "markdown": f"**{code} {rule.name}**: {rule.summary}\n\n```\n{rule.explanation}\n```\n\n"
            f"More: `initaudit explain {code}`.",
        },
        "defaultConfiguration": {"level": LEVEL[rule.severity]},
        "properties": {"tags": ["initaudit", code[:3]]},
    }


def sarif_dict(results: Sequence[Entry], fail_on: str = "error", root: Path | None = None) -> dict[str, Any]:
    """The SARIF log as a dict (see :func:`render_sarif`)."""
    codes = list(RULES)
    artifacts: list[dict[str, Any]] = []
    sarif_results: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []
    any_inside = False

    for result in audits(results):
        uri, inside = _uri(result.path, root)
        any_inside |= inside
        index = len(artifacts)
        artifacts.append(
            {
                "location": _artifact_location(uri, inside),
                "roles": ["analysisTarget"],
                "properties": {
                    "format": result.graph.format,
                    "audit": result.audit_kind,
                    "verdicts": {"fm1": result.verdict("fm1"), "fm2": result.verdict("fm2")},
                    "verdictReason": result.not_computed_reason,
                    "counts": result.counts(),
                    "suppressed": result.suppressed,
                },
            }
        )
        tensors = tensor_names(result)
        # Relative to the root, like the URI, so the fingerprint does not depend on the working
        # directory (it equals the JSON report's when the root is the working directory).
        key_path = relative_path(result.path, root)[0]
        for finding in result.findings:
            location: dict[str, Any] = {
                "physicalLocation": {"artifactLocation": _artifact_location(uri, inside, index)}
            }
            kind = location_kind(result, finding.location, tensors)
            if kind:
                location["logicalLocations"] = [
                    {
                        "name": finding.location,
                        "fullyQualifiedName": finding.location,
                        "kind": LOGICAL_KIND[kind],
                    }
                ]
            text = finding.message
            if finding.fix:
                text += f"{'' if text.endswith(('.', '!', '?')) else '.'} Fix: {finding.fix}"
            sarif_results.append(
                {
                    "ruleId": finding.code,
                    "ruleIndex": codes.index(finding.code),
                    "level": LEVEL[finding.severity],
                    "message": {"text": text},
                    "locations": [location],
                    "partialFingerprints": {FINGERPRINT_KEY: finding.fingerprint(key_path)},
                    "properties": {
                        "severity": str(finding.severity),
                        "blocking": blocking(finding, fail_on),
                        "location": finding.location,
                        "locationKind": kind or "model",
                        "fix": finding.fix,
                        "evidence": json_ready(finding.evidence),
                    },
                }
            )

    for error in errors(results):
        uri, inside = _uri(error.path, root)
        any_inside |= inside
        artifacts.append({"location": _artifact_location(uri, inside), "roles": ["analysisTarget"]})
        notifications.append(
            {
                "level": "error",
                "message": {"text": f"{error.path}: {error.message}"},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": _artifact_location(uri, inside, len(artifacts) - 1)
                        }
                    }
                ],
                "descriptor": {"id": "load-error"},
            }
        )

    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "initaudit",
                "version": __version__,
                "semanticVersion": __version__,
                "informationUri": INFORMATION_URI,
                "rules": [_rule(code) for code in codes],
            }
        },
        "invocations": [
            {
                "executionSuccessful": not notifications,
                "toolExecutionNotifications": notifications,
                "properties": {"failOn": str(fail_on)},
            }
        ],
        "artifacts": artifacts,
        "results": sarif_results,
    }
    if any_inside:
        base = (root or Path.cwd()).absolute().as_uri().rstrip("/") + "/"
        run["originalUriBaseIds"] = {SRCROOT: {"uri": base}}
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def render_sarif(results: Sequence[Entry], fail_on: str = "error", root: Path | None = None) -> str:
    """A SARIF 2.1.0 log of one run over every model: a result per finding, located at the
    model file (URI relative to ``root``, default the working directory) and at the tensor
    or node it names. Pure: touches no file and no console."""
    return (
        json.dumps(sarif_dict(results, fail_on, root), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )
