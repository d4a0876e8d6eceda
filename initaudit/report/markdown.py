"""GitHub-flavoured markdown for the job summary (``$GITHUB_STEP_SUMMARY``) or a PR comment.

A verdict table with one row per model (and one per model that could not be audited), then a
findings table per model. GitHub refuses a step summary over 1 MiB, so the text is cut, at a
line, to stay under ``limit`` bytes of UTF-8, and a last line says how many findings and
models were cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from initaudit import __version__
from initaudit.audit import AuditResult
from initaudit.report.common import (
    Entry,
    audits,
    errors,
    fmt,
    last_tap,
    measured_at,
    one_line,
    threshold,
    visible_controls,
)
from initaudit.report.model_error import ModelError
from initaudit.rules import RULES, Severity

#: Under GitHub's 1 MiB cap on a step summary, with room for other steps' summaries.
DEFAULT_LIMIT = 1_000_000
_SEVERITY = {Severity.ERROR: "❌ error", Severity.WARNING: "⚠️ warning", Severity.INFO: "ℹ️ info"}
_VERDICT = {"pass": "✅ pass", "warning": "⚠️ warning", "error": "❌ error", "not computed": "➖ not computed"}


def code(text: str) -> str:
    """``text`` as an inline code span that is safe in a table cell (pipes escaped, the fence
    longer than any run of backticks inside)."""
    text = visible_controls(one_line(text)).replace("|", "\\|")
    if not text:
        return ""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(text: str) -> str:
    """Plain text for a table cell: one line, pipes escaped, no raw HTML."""
    return visible_controls(one_line(text)).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _number(x: float, computable: bool) -> str:
    return fmt(x) if computable and isinstance(x, int | float) and not math.isnan(x) else "-"


def _measured(result: AuditResult, field: str) -> str:
    estimate = measured_at(result, last_tap(result))
    if estimate is None:
        return "-"
    return f"{fmt(getattr(estimate, field))} ± {fmt(getattr(estimate, field + '_se'))}"


def _lines(results: Sequence[Entry], fail_on: str) -> list[tuple[str, str | None]]:
    """Every line of the full document, each tagged with what cutting it loses: a "model"
    row, a "finding" row, or None (structure)."""
    gate = threshold(fail_on)
    done = audits(results)
    failed = [r for r in done if r.fails(gate)]
    broken = errors(results)
    mc = any(r.prediction.measured is not None for r in done)
    headline = f"{len(failed)} of {len(done)} audited model(s) fail at `--fail-on {gate}`"
    if broken:
        headline += f"; {len(broken)} could not be audited"
    accepted = sum(r.suppressed for r in done)
    if accepted:
        headline += f"; {accepted} finding(s) accepted by the baseline"
    out: list[tuple[str, str | None]] = [(f"## initaudit {__version__}: {headline}", None), ("", None)]

    header = ["model", "FM1", "FM2", "E[M_L]/M_0", "median M_L/M_0", "beta"]
    if mc:
        header += ["MC E[M_L]/M_0", "MC median"]
    header += ["errors", "warnings", "info", "result"]
    out.append(("| " + " | ".join(header) + " |", None))
    out.append(("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header) - 1)) + "|---|", None))
    for entry in results:
        if isinstance(entry, ModelError):
            blank = [""] * (len(header) - 2)
            row = [code(entry.path), *blank, f"💥 cannot audit: {cell(entry.message)}"]
        else:
            s, ok, counts = entry.prediction.summary, entry.computable, entry.counts()
            row = [
                code(entry.path),
                _VERDICT.get(entry.verdict("fm1"), entry.verdict("fm1")),
                _VERDICT.get(entry.verdict("fm2"), entry.verdict("fm2")),
                _number(s.mean_ratio, ok),
                _number(s.median, ok),
                _number(s.beta, ok),
            ]
            if mc:
                row += [_measured(entry, "mean"), _measured(entry, "median")]
            row += [str(counts["error"]), str(counts["warning"]), str(counts["info"])]
            row.append("❌ fail" if entry.fails(gate) else "✅ pass")
        out.append(("| " + " | ".join(row) + " |", "model"))

    for entry in done:
        if not entry.findings and entry.computable:
            continue
        out += [
            ("", None),
            (f"### {'❌' if entry.fails(gate) else '✅'} {code(entry.path)}", None),
            ("", None),
        ]
        if entry.not_computed_reason:
            out += [(f"FM1/FM2 not computed: {cell(entry.not_computed_reason)}", None), ("", None)]
        if not entry.findings:
            continue
        out.append(("| severity | rule | location | message | fix |", None))
        out.append(("|---|---|---|---|---|", None))
        for f in entry.findings:
            marker = " **(fails)**" if f.severity >= gate else ""
            rule = f"{f.code} {code(RULES[f.code].name)}"
            row = [_SEVERITY[f.severity] + marker, rule, code(f.location), cell(f.message), cell(f.fix)]
            out.append(("| " + " | ".join(row) + " |", "finding"))
    return out


def _note(findings: int, models: int, limit: int) -> str:
    return (
        f"*initaudit: cut to stay under {limit} bytes: {findings} finding row(s) and {models} "
        "model row(s) not shown; the JSON or SARIF report has everything.*"
    )


def render_markdown(results: Sequence[Entry], fail_on: str = "error", limit: int = DEFAULT_LIMIT) -> str:
    """The summary as markdown, at most ``limit`` bytes of UTF-8 (cut at a line, with a last
    line saying what was cut)."""
    lines = _lines(results, fail_on)
    text = "".join(line + "\n" for line, _ in lines)
    if len(text.encode("utf-8")) <= limit:
        return text
    total = {tag: sum(t == tag for _, t in lines) for tag in ("finding", "model")}
    # The note with the totals is at least as long as the note with what is actually cut.
    reserve = len(("\n" + _note(total["finding"], total["model"], limit) + "\n").encode("utf-8"))
    kept, size = 0, 0
    for line, _ in lines:
        cost = len(line.encode("utf-8")) + 1
        if size + cost + reserve > limit:
            break
        kept, size = kept + 1, size + cost
    rest = lines[kept:]
    note = _note(sum(t == "finding" for _, t in rest), sum(t == "model" for _, t in rest), limit)
    out = "".join(line + "\n" for line, _ in lines[:kept]) + "\n" + note + "\n"
    data = out.encode("utf-8")
    # Only a limit smaller than the note itself gets here: keep what fits.
    return out if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")
