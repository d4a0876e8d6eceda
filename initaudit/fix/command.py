"""``initaudit fix`` and ``check --fix``: audit, plan, write atomically, re-audit, report.

For each model: audit it; build the plan from the findings; refuse what cannot be done
before anything is written (an existing output without ``--force``, a tensor that cannot be
cast back); write the output atomically; audit the written file with the same options and
show the numbers before and after. ``--dry-run`` writes nothing and judges the audit the plan
predicts. Exit codes: 0 nothing at or above ``--fail-on`` remains, 1 something does
(FM2, which weights cannot fix), 2 an error (raised as LoadError/UsageError).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table
from rich.text import Text

from initaudit.audit import AuditResult, Selection, audit_file, audit_graph, display_path
from initaudit.errors import LoadError, UsageError
from initaudit.fix.plan import FixPlan, TensorChange, build_plan
from initaudit.frontends import TORCH_FORMATS, LoadOptions, sniff
from initaudit.graph import LayerGraph
from initaudit.rules import Severity

SCHEMA = "initaudit.fix/1"
#: Above this many plan rows, the text report shows the first and last ones (``-v``: all).
MAX_ROWS = 30


class Writer(Protocol):
    format: str
    notes: list[str]

    def editable(self, name: str) -> bool: ...
    def default_output(self) -> Path: ...
    def validate(self, plan: FixPlan) -> None: ...
    def write(self, plan: FixPlan, target: Path) -> list[Path]: ...


@dataclass
class FixReport:
    """What happened to one model."""

    path: Path
    plan: FixPlan
    target: Path
    written: list[Path]
    after: AuditResult
    dry_run: bool
    fails: bool
    notes: list[str] = field(default_factory=list)

    @property
    def before(self) -> AuditResult:
        return self.plan.before

    @property
    def after_kind(self) -> str:
        return "written" if self.written else "predicted"


def run_fix(
    paths: list[Path],
    *,
    output: Path | None,
    in_place: bool,
    force: bool,
    dry_run: bool,
    redraw: bool,
    seed: int,
    residual_scale: str,
    fail_on: str,
    output_format: str,
    quiet: bool,
    verbose: bool,
    options: LoadOptions,
    selection: Selection,
) -> int:
    """Fix each model in ``paths``; returns the exit code (errors are raised, for exit 2)."""
    if not paths:
        raise UsageError("no model given")
    if output is not None and len(paths) > 1:
        raise UsageError(
            f"-o names one output, but {len(paths)} models were given: leave -o out (each model gets "
            "<stem>.fixed.<ext> beside it) or fix them one at a time"
        )
    if output is not None and in_place:
        raise UsageError("--in-place writes over the input and -o names another file: choose one")
    if residual_scale not in ("sqrt", "zero"):
        raise UsageError(f"--residual-scale {residual_scale!r}: expected sqrt or zero")
    if output_format not in ("text", "json"):
        raise UsageError(f"--format {output_format!r}: fix writes text or json")
    try:
        threshold = Severity.parse(fail_on)
    except ValueError as exc:
        raise UsageError(f"--fail-on: {exc}") from None
    console = Console(highlight=False)
    reports = []
    for path in paths:
        report = fix_one(
            Path(path),
            output=output,
            in_place=in_place,
            force=force,
            dry_run=dry_run,
            redraw=redraw,
            seed=seed,
            residual_scale=residual_scale,
            threshold=threshold,
            options=options,
            selection=selection,
        )
        reports.append(report)
        if output_format == "text":
            render_text(report, console, verbose=verbose, quiet=quiet)
    code = 1 if any(report.fails for report in reports) else 0
    if output_format == "json":
        sys.stdout.write(render_json(reports, fail_on, code))
        sys.stdout.flush()
    return code


def fix_one(
    path: Path,
    *,
    output: Path | None = None,
    in_place: bool = False,
    force: bool = False,
    dry_run: bool = False,
    redraw: bool = False,
    seed: int = 0,
    residual_scale: str = "sqrt",
    threshold: Severity = Severity.ERROR,
    options: LoadOptions | None = None,
    selection: Selection | None = None,
) -> FixReport:
    options = options or LoadOptions()
    if path.is_file() and sniff(path) == "shard-index":
        raise UsageError(
            f"{display_path(path)}: fix does not write sharded checkpoints yet (the index spreads one "
            "model over several files); run fix on a single-file checkpoint, or on each shard alone"
        )
    before = audit_file(path, selection=selection, options=options)  # a bad file fails here, exit 2
    writer = make_writer(path, options)
    target = _target(path, output, in_place, writer)
    notes: list[str] = []
    extra = getattr(writer, "extra_outputs", lambda target: [])(target)
    if not dry_run:
        _check_target(path, target, in_place, force)
        for other in extra:
            if _lexists(other) and not force:
                raise UsageError(f"{display_path(other)} exists: pass --force to overwrite it")
    else:
        for other in [target, *extra]:
            if _lexists(other) and not force and not (in_place and other == target):
                notes.append(f"{display_path(other)} exists: writing it would need --force")
    plan = build_plan(
        before,
        redraw=redraw,
        seed=seed,
        residual_scale=residual_scale,
        editable=writer.editable,
        selection=selection,
    )
    writer.validate(plan)  # an uncastable tensor is an error before anything is written
    assert plan.predicted is not None
    written: list[Path] = []
    after = plan.predicted
    if plan.changes and not dry_run:
        written = writer.write(plan, target)
        after = _reaudit(writer, target, options, selection)
        if writer.format == "onnx":
            from initaudit.fix.write_onnx import run_random_input

            ran = run_random_input(target)
            if ran is not None:
                notes.append(ran)
    elif not plan.changes:
        notes.append("no file written: the plan changes nothing")
    notes = [*writer.notes, *notes]
    return FixReport(
        path=path,
        plan=plan,
        target=target,
        written=written,
        after=after,
        dry_run=dry_run,
        fails=after.fails(threshold),
        notes=notes,
    )


def make_writer(path: Path, options: LoadOptions) -> Writer:
    fmt = sniff(path)
    if fmt == "onnx":
        from initaudit.fix.write_onnx import OnnxWriter

        return OnnxWriter(path)
    if fmt == "safetensors":
        from initaudit.fix.write_safetensors import SafetensorsWriter

        return SafetensorsWriter(path)
    if fmt in TORCH_FORMATS:
        from initaudit.fix.write_torch import TorchWriter

        return TorchWriter(path, fmt, options)
    raise LoadError(path, f"cannot be fixed: {fmt} files are not written by initaudit")


def _target(path: Path, output: Path | None, in_place: bool, writer: Writer) -> Path:
    if in_place:
        return path.resolve()
    return output if output is not None else writer.default_output()


def _check_target(path: Path, target: Path, in_place: bool, force: bool) -> None:
    same = _same_file(path, target)
    if same and not in_place:
        raise UsageError(f"{display_path(target)} is the input: pass --in-place to overwrite it")
    if target.is_dir():
        raise UsageError(f"{display_path(target)} is a directory: -o names the output file")
    if not in_place and not force and _lexists(target):
        raise UsageError(f"{display_path(target)} exists: pass --force to overwrite it")
    if not target.parent.is_dir():
        raise LoadError(target, "cannot be written: the directory does not exist")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def _lexists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _reaudit(writer: Writer, target: Path, options: LoadOptions, selection: Selection | None) -> AuditResult:
    """The written file, audited as ``check`` would; a module input's state dict is audited in
    the input's architecture (the state dict alone has none)."""
    proof = getattr(writer, "proof_graph", None)
    graph: LayerGraph | None = proof(target) if proof is not None else None
    if graph is not None:
        return audit_graph(graph, str(target), selection=selection)
    return audit_file(target, selection=selection, options=options)


# ----------------------------------------------------------------------------- text


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


_VERDICT = {"pass": "bold green", "warning": "bold yellow", "error": "bold red", "not computed": "yellow"}
_ACTION = {"scale": "", "zero": "zeroed", "redraw": "redrawn"}


def plan_table(plan: FixPlan, verbose: bool = False) -> Table:
    table = Table(
        title=f"Fix plan: {len(plan.changes)} tensor(s)",
        title_justify="left",
        header_style="bold",
        expand=False,
    )
    for column, justify in [
        ("tensor", "left"),
        ("old std", "right"),
        ("new std", "right"),
        ("factor", "right"),
        ("code", "left"),
        ("reason", "left"),
    ]:
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    rows: list[TensorChange | None] = list(plan.changes)
    hidden = 0
    if not verbose and len(rows) > MAX_ROWS + 5:
        half = MAX_ROWS // 2
        hidden = len(rows) - 2 * half
        rows = [*rows[:half], None, *rows[-half:]]
    for change in rows:
        if change is None:
            table.add_row(f"... {hidden} more (-v shows all)", "", "", "", "", "")
            continue
        factor = _ACTION[change.action] or f"x{_fmt(change.factor, 4)}"
        table.add_row(
            change.tensor, _fmt(change.old_std), _fmt(change.new_std), factor, change.code, change.reason
        )
    return table


def _numbers(result: AuditResult) -> list[tuple[str, str]]:
    s = result.prediction.summary
    rows = [
        ("FM1 verdict", result.verdict("fm1")),
        ("E[M_L]/M_0", _fmt(s.mean_ratio)),
        ("worst E[M]/M_0", _fmt(s.worst_ratio)),
        ("median M_L/M_0", _fmt(s.median)),
        ("Var ln(M_L/M_0)", _fmt(s.log_var)),
        ("beta = sum 1/n_j", "-" if s.residual else _fmt(s.beta)),
        ("sum eta^2", _fmt(s.sum_eta2) if s.residual else "-"),
        ("FM2 verdict", result.verdict("fm2")),
    ]
    counts = result.counts()
    rows.append(("findings", f"{counts['error']} error, {counts['warning']} warning, {counts['info']} info"))
    return rows


def comparison_table(report: FixReport) -> Table:
    after = "after (predicted)" if report.after_kind == "predicted" else "after (re-audit)"
    table = Table(title="Before and after", title_justify="left", header_style="bold", expand=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column(after, justify="right")
    for (label, old), (_, new) in zip(_numbers(report.before), _numbers(report.after), strict=True):
        if label.endswith("verdict"):
            table.add_row(
                label, Text(old.upper(), _VERDICT.get(old, "")), Text(new.upper(), _VERDICT.get(new, ""))
            )
        else:
            table.add_row(label, old, new)
    return table


def render_text(report: FixReport, console: Console, *, verbose: bool = False, quiet: bool = False) -> None:
    path = display_path(report.path)
    target = display_path(report.target)
    plan = report.plan
    if quiet:
        where = (
            f"-> {target}"
            if report.written
            else ("(dry run, nothing written)" if report.dry_run else "(nothing written)")
        )
        console.print(
            f"{path}: {len(plan.changes)} tensor(s) changed {where}; "
            f"FM1 {report.before.verdict('fm1')} -> {report.after.verdict('fm1')}, "
            f"FM2 {report.before.verdict('fm2')} -> {report.after.verdict('fm2')}",
            soft_wrap=True,
            markup=False,
        )
        for f in report.after.findings:
            if f.severity > Severity.INFO:
                console.print(f"{path}: {f.code} {f.severity}: {f.message}", soft_wrap=True, markup=False)
        return
    head = "initaudit fix " + path
    head += (
        f"  (dry run: would write {target})"
        if report.dry_run
        else (f"  -> {target}" if report.written else "")
    )
    console.print(Text(head, style="bold"))
    if plan.changes:
        console.print(plan_table(plan, verbose))
    for note in [*plan.notes, *report.notes]:
        console.print(Text.assemble(("  note: ", "cyan"), note), soft_wrap=False)
    console.print(comparison_table(report))
    left = [f for f in report.after.findings if f.severity > Severity.INFO]
    if left:
        console.print(Text("Findings after the fix", style="bold"))
        for f in left:
            console.print(Text.assemble((f"{f.code} ", "bold"), f"{f.severity}  ", f.message))
            if f.fix:
                console.print(Text.assemble("       fix: ", (f.fix, "green")))
    if report.written:
        console.print(Text("wrote " + ", ".join(display_path(p) for p in report.written), style="green"))


# ----------------------------------------------------------------------------- json


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def report_json(report: FixReport, fail_on: str) -> dict[str, Any]:
    from initaudit.report.json_report import report_dict

    return {
        "path": display_path(report.path),
        "output": display_path(report.target) if report.written else None,
        "would_write": display_path(report.target) if report.dry_run and report.plan.changes else None,
        "written": [display_path(p) for p in report.written],
        "dry_run": report.dry_run,
        "plan": report.plan.as_dict(),
        "notes": report.notes,
        "before": report_dict(report.before, fail_on),
        "after": report_dict(report.after, fail_on),
        "after_kind": report.after_kind,
        "fails": report.fails,
    }


def render_json(reports: list[FixReport], fail_on: str, exit_code: int) -> str:
    from initaudit import __version__

    doc = {
        "schema": SCHEMA,
        "version": __version__,
        "fail_on": fail_on,
        "exit_code": exit_code,
        "files": [report_json(report, fail_on) for report in reports],
    }
    return json.dumps(_jsonable(doc), indent=2) + "\n"
