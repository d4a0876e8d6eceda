"""The rich console report: layer table, residual blocks, verdicts, findings."""

from __future__ import annotations

import itertools
import math

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from initaudit.audit import AuditResult
from initaudit.graph import Kind
from initaudit.report.common import fmt
from initaudit.report.json_report import layer_rows
from initaudit.rules import Severity, Thresholds
from initaudit.theory.propagate import Summary

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_VERDICT = {"pass": "bold green", "warning": "bold yellow", "error": "bold red"}
#: Above this many rows, tables show the first and last rows only (``-v`` shows all).
MAX_ROWS = 40


def _elide(rows: list, verbose: bool) -> tuple[list, int]:
    if verbose or len(rows) <= MAX_ROWS + 5:  # hiding a handful of rows saves nothing
        return rows, 0
    half = MAX_ROWS // 2
    return [*rows[:half], None, *rows[-half:]], len(rows) - 2 * half


def layer_table(result: AuditResult, verbose: bool = False) -> Table:
    table = Table(title="Layers", title_justify="left", expand=False, header_style="bold")
    for column, justify in [
        ("layer", "left"),
        ("op", "left"),
        ("fan-in", "right"),
        ("width", "right"),
        ("weight std", "right"),
        ("std / right", "right"),
        ("E[M]/M0", "right"),
        ("rel. spread", "right"),
    ]:
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    measured = result.prediction.measured
    if measured is not None:
        table.add_column("MC E[M]/M0", justify="right")
        table.add_column("MC median", justify="right")
    shown = [
        row
        for row in layer_rows(result)
        if row[1] is not None
        and (
            verbose or row[0].is_linear or row[1].tap or row[0].kind in (Kind.NORM, Kind.UNMODELED, Kind.POOL)
        )
    ]
    rows, hidden = _elide(shown, verbose)
    for row in rows:
        if row is None:
            table.add_row(f"... {hidden} more", *[""] * (len(table.columns) - 1), style="dim")
            continue
        layer, pred, ratio = row
        op = layer.activation or layer.op
        ratio_text = Text(fmt(ratio))
        if ratio is not None and (ratio > math.sqrt(2) or ratio < 1 / math.sqrt(2)):
            ratio_text.stylize("yellow")
        mean_text = Text(fmt(pred.mean))
        if pred.tap and (pred.mean > 3 or pred.mean < 1 / 3):
            mean_text.stylize("red")
        table.add_row(
            layer.name,
            op,
            fmt(layer.fan_in) if layer.fan_in else "",
            str(pred.width),
            fmt(layer.weight.std) if layer.weight is not None else "",
            ratio_text,
            mean_text,
            fmt(math.sqrt(pred.spread)),
            *(_measured_cells(measured.taps.get(layer.name)) if measured is not None else []),
        )
    return table


def _measured_cells(estimate: object | None) -> list[str]:
    """Monte Carlo mean and median with their standard errors; blank where not measured."""
    if estimate is None:
        return ["", ""]
    e = estimate
    return [f"{fmt(e.mean)} ± {fmt(e.mean_se, 2)}", f"{fmt(e.median)} ± {fmt(e.median_se, 2)}"]  # type: ignore[attr-defined]


WEIGHTS_ONLY_LABEL = "weights-only audit: no architecture (pass --model pkg.module:factory for FM1/FM2)"
_STATUS = {
    "he": ("He", ""),
    "lecun": ("LeCun", ""),
    "off": ("off", "yellow"),
    "non-finite": ("NaN/Inf", "red"),
}


def weights_only_banner() -> Panel:
    """The label a weights-only report opens with: no reader should take it for a full audit."""
    return Panel(
        Text.assemble(
            (WEIGHTS_ONLY_LABEL, "bold yellow"),
            "\n",
            "Each weight is checked against the init its fan-in implies: He 2/fan-in (before a ReLU) "
            "or LeCun 1/fan-in (linear, tanh-like, normalized); within 2x of either passes.",
        ),
        expand=False,
        border_style="yellow",
    )


def tensor_table(result: AuditResult, verbose: bool = False) -> Table:
    """The per-tensor table of a weights-only audit, in place of the layer table."""
    from initaudit.rules import scale_rows

    table = Table(title="Weights (weights-only audit)", title_justify="left", header_style="bold")
    for column, justify in [
        ("tensor", "left"),
        ("shape", "left"),
        ("fan-in", "right"),
        ("std", "right"),
        ("scheme", "left"),
        ("var / He", "right"),
        ("near", "left"),
    ]:
        # Only tensor names fold: a narrow terminal should not split "pytorch_default" in two.
        table.add_column(column, justify=justify, overflow="fold", no_wrap=column != "tensor")  # type: ignore[arg-type]
    rows, hidden = _elide(scale_rows(result.graph), verbose)
    for row in rows:
        if row is None:
            table.add_row(f"... {hidden} more", *[""] * 6, style="dim")
            continue
        word, style = _STATUS.get(row.status, (row.status, "red"))
        table.add_row(
            row.weight.name,
            "x".join(map(str, row.weight.shape)),
            str(row.fan_in),
            fmt(row.weight.std),
            row.scheme,
            Text(fmt(row.vs_he), style=style),
            Text(word, style=style),
        )
    return table


def skipped_text(result: AuditResult, verbose: bool = False) -> Text | Table | None:
    """What a weights-only audit did not check: one line, or every tensor with ``-v``."""
    rows = [row for row in result.graph.meta.get("skipped", []) if isinstance(row, dict)]
    if not rows:
        return None
    if verbose:
        table = Table(title=f"Not checked ({len(rows)})", title_justify="left", header_style="bold")
        for column in ("tensor", "shape", "reason"):
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(row["name"], "x".join(map(str, row["shape"])) or "scalar", row["reason"])
        return table
    names = ", ".join(row["name"] for row in rows[:3]) + (", ..." if len(rows) > 3 else "")
    return Text(f"Not checked: {len(rows)} tensors ({names}; -v lists them with the reason)", style="dim")


def block_table(result: AuditResult, verbose: bool = False) -> Table | None:
    blocks = result.prediction.blocks
    if not blocks:
        return None
    table = Table(title=f"Residual blocks ({len(blocks)})", title_justify="left", header_style="bold")
    for column in ("join", "branch layers", "eta", "gate", "folded", "gain g", "E[M] factor", "ends in"):
        table.add_column(column, justify="left" if column in ("join", "ends in") else "right")
    rows, hidden = _elide(blocks, verbose)
    for b in rows:
        if b is None:
            table.add_row(f"... {hidden} more", *[""] * 7, style="dim")
            continue
        ends = b.terminal + (" (normalized)" if b.normalized else "")
        table.add_row(
            b.add,
            str(b.branch_length),
            fmt(b.eta),
            fmt(b.gate),
            fmt(b.folded),
            fmt(b.gain),
            fmt(b.factor),
            ends,
        )
    return table


#: Columns of the signal strip: every depth is resampled to this many cells.
STRIP_COLUMNS = 40
_LEVELS = "▁▂▃▄▅▆▇█"
_DEAD = "×"  # a zero length (the signal died): no logarithm to draw


def _strip_cells(logs: list[float], columns: int) -> list[float]:
    """Resample log10 values to ``columns`` cells: a short net stretches each tap over several
    cells, a deep one puts several taps in a cell and keeps the one farthest from M_0 (so a
    spike survives). NaN is a gap; -inf (zero length) wins any cell it is in."""
    count = len(logs)
    cells = []
    for c in range(columns):
        start = c * count // columns
        stop = max((c + 1) * count // columns, start + 1)
        chunk = logs[start:stop]
        if any(v == -math.inf for v in chunk):
            cells.append(-math.inf)
            continue
        finite = [v for v in chunk if math.isfinite(v)]
        cells.append(max(finite, key=abs) if finite else math.nan)
    return cells


def _log10(x: float) -> float:
    if x is None or math.isnan(x):
        return math.nan
    return math.log10(x) if x > 0 else -math.inf


def signal_strip(
    result: AuditResult, columns: int = STRIP_COLUMNS, thresholds: Thresholds | None = None
) -> Text | None:
    """The signal-propagation strip: one line per series (predicted E[M_j]/M_0 and median,
    and the Monte Carlo ones when measured), a block character per cell on one shared log10
    scale, coloured by distance from M_0 (green within the FM1 warning bound, yellow within
    the error bound, red beyond), with the first and last tap's values after it. None when
    there are fewer than two taps to draw."""
    from initaudit.report.plot import signal_series

    if not result.computable:
        return None
    series = signal_series(result)
    if series.depth < 2:
        return None
    th = thresholds or Thresholds()
    rows = [("E[M]/M0", series.mean), ("median", series.median)]
    if series.measured_mean is not None:
        rows += [("MC E[M]", series.measured_mean), ("MC median", series.measured_median or [])]
    logs = {label: [_log10(v) for v in values] for label, values in rows}
    finite = [v for values in logs.values() for v in values if math.isfinite(v)]
    lo, hi = min([*finite, 0.0]), max([*finite, 0.0])
    if hi - lo < 1.0:  # at least one decade, so that noise-sized wiggles do not fill the scale
        mid = (hi + lo) / 2
        lo, hi = mid - 0.5, mid + 0.5
    warn, error = math.log10(th.fm1_warning), math.log10(th.fm1_error)
    label_width = max(len(label) for label, _ in rows)
    text = Text.assemble(
        ("Signal ", "bold"),
        f"log10 M_j/M_0 over {series.depth} taps"
        + (f", {series.depth / columns:.3g} per cell" if series.depth > columns else "")
        + f":  {_LEVELS[0]} {lo:.2g} … {_LEVELS[-1]} {hi:.2g}",
    )
    for label, values in rows:
        cells = _strip_cells(logs[label], columns)
        line = Text("\n  " + label.ljust(label_width) + "  ")
        for v in cells:
            if math.isnan(v):
                line.append(" ")
            elif v == -math.inf:
                line.append(_DEAD, style="bold red")
            else:
                level = round((v - lo) / (hi - lo) * (len(_LEVELS) - 1))
                style = "green" if abs(v) <= warn else ("yellow" if abs(v) <= error else "red")
                line.append(_LEVELS[min(max(level, 0), len(_LEVELS) - 1)], style=style)
        measured = [v for v in values if v is not None and not math.isnan(v)]
        ends = f"  {fmt(measured[0])} → {fmt(measured[-1])}" if measured else ""
        line.append(ends)
        text.append_text(line)
    return text


def summary_panel(result: AuditResult) -> Panel:
    s = result.prediction.summary
    fm1, fm2 = result.verdict("fm1"), result.verdict("fm2")
    reason = result.not_computed_reason
    if reason is not None:
        style = "bold yellow" if result.weights_only else "bold red"
        return Panel(
            Text.assemble(("FM1/FM2 NOT COMPUTED", style), f": {reason}"),
            title="Verdict",
            title_align="left",
            expand=False,
        )
    table = Table.grid(padding=(0, 2))
    table.add_column(justify="left")
    table.add_column(justify="left")
    table.add_row(
        Text("FM1 mean length", style="bold"),
        Text.assemble((fm1.upper(), _VERDICT[fm1]), "  ", _fm1_numbers(result)),
    )
    table.add_row(
        Text("FM2 length variance", style="bold"),
        Text.assemble(
            (fm2.upper(), _VERDICT[fm2]),
            f"  {_beta_text(s)}Var ln(M_L/M0) = {fmt(s.log_var)}   "
            f"E[M_L^2]/E[M_L]^2 = {fmt(s.second_ratio)}   median M_L/M0 = {fmt(s.median)}   "
            f"E[Var^[M]] = {fmt(s.var_hat)}",
        ),
    )
    if s.residual:
        table.add_row(
            Text("Residual", style="bold"),
            f"{len(result.prediction.blocks)} blocks, sum eta^2 = {fmt(s.sum_eta2)}",
        )
    measured = result.prediction.measured
    if measured is not None:
        table.add_row(Text("Monte Carlo", style="bold"), _measured_text(result))
    return Panel(table, title="Verdict", title_align="left", expand=False)


def _measured_text(result: AuditResult) -> str:
    """The measured last tap beside the predicted one, and how the run went."""
    m, s = result.prediction.measured, result.prediction.summary
    last = next((row.name for row in reversed(result.prediction.layers) if row.tap), None)
    e = m.taps.get(last) if last else None
    head = f"{m.samples} samples ({m.resample}, {m.engine}, {m.device}, {m.seconds:.2g} s)"
    if e is None:
        return head
    text = (
        f"{head}   E[M_L]/M0 = {fmt(e.mean)} ± {fmt(e.mean_se, 2)} (predicted {fmt(s.mean_ratio)})   "
        f"median = {fmt(e.median)} ± {fmt(e.median_se, 2)} (predicted {fmt(s.median)})   "
        f"Var ln = {fmt(e.log_var)} ± {fmt(e.log_var_se, 2)} (predicted {fmt(s.log_var)})   "
        f"E[Var^[M]] = {fmt(m.var_hat[0])} ± {fmt(m.var_hat[1], 2)}"
    )
    c = m.curvature
    if c is not None and hasattr(c, "top_eigenvalue"):
        text += f"\ncurvature: top Hessian eigenvalue {fmt(c.top_eigenvalue)}, trace {fmt(c.trace)} (medians)"
    return text


def _beta_text(s: Summary) -> str:
    # beta = sum 1/n_j describes plain stretches; a residual stream's spread is Var ln M alone.
    return "" if s.residual else f"beta = sum 1/n_j = {fmt(s.beta)}   "


def _fm1_numbers(result: AuditResult) -> str:
    s = result.prediction.summary
    text = f"E[M_L]/M0 = {fmt(s.mean_ratio)} over L = {s.depth}"
    if (
        s.worst_layer
        and abs(math.log(max(s.worst_ratio, 1e-300))) > abs(math.log(max(s.mean_ratio, 1e-300))) + 1e-9
    ):
        text += f"   (worst {fmt(s.worst_ratio)} at {s.worst_layer})"
    if s.normalized:
        text += "   (since the last normalization)"
    return text


#: Above this many findings of one rule the console shows the first two and the last, and
#: counts the rest (-v shows all; machine formats always carry every one).
REPEAT_LIMIT = 4


def findings_group(result: AuditResult, verbose: bool = False) -> Group:
    lines: list[Text] = []
    for code, run in itertools.groupby(result.findings, key=lambda f: (f.code, f.severity)):
        group = list(run)
        shown = group if verbose or len(group) <= REPEAT_LIMIT else [*group[:2], None, group[-1]]
        for f in shown:
            if f is None:
                hidden = group[2:-1]
                names = ", ".join(f"`{h.location}`" for h in hidden[:3] if h.location)
                lines.append(
                    Text(
                        f"[... {len(hidden)} more {code[0]} {code[1]}s like these"
                        + (f" ({names}{', ...' if len(hidden) > 3 else ''})" if names else "")
                        + "; -v shows all ...]",
                        style="dim",
                    )
                )
                continue
            line = Text.assemble(
                (f"{f.code} ", "bold"), (f"{f.severity}", _STYLE[f.severity]), "  ", f.message
            )
            lines.append(line)
            if f.fix:
                lines.append(Text.assemble("       fix: ", (f.fix, "green")))
    if not lines:
        lines.append(Text("No findings.", style="green"))
    return Group(*lines)


def render_console(result: AuditResult, console: Console, verbose: bool = False, quiet: bool = False) -> None:
    graph = result.graph
    if not quiet:
        meta = ", ".join(f"{k} {v}" for k, v in graph.meta.items() if k in ("opset", "producer") and v)
        unit = "weight tensors" if result.weights_only else "layers"
        console.print(
            Text.assemble(("initaudit ", "bold"), result.path, f"  ({graph.format}, {len(graph)} {unit}"),
            Text(f", {meta})" if meta else ")"),
            sep="",
        )
        if result.weights_only:
            console.print(weights_only_banner())
            console.print(tensor_table(result, verbose))
            skipped = skipped_text(result, verbose)
            if skipped is not None:
                console.print(skipped)
        else:
            console.print(layer_table(result, verbose))
            blocks = block_table(result, verbose)
            if blocks is not None:
                console.print(blocks)
            strip = signal_strip(result)
            if strip is not None:
                console.print(strip, soft_wrap=True)
        console.print(summary_panel(result))
    findings = result.findings if not quiet else [f for f in result.findings if f.severity > Severity.INFO]
    if quiet:
        if result.weights_only:  # a quiet pass must not read as a full audit's pass
            console.print(Text.assemble(f"{result.path}: ", (WEIGHTS_ONLY_LABEL, "yellow")), soft_wrap=True)
        for f in findings:
            line = Text.assemble(f"{result.path}: ", (f"{f.code} ", "bold"), f"{f.severity}: {f.message}")
            console.print(line, soft_wrap=True)
        return
    console.print(Text("Findings", style="bold"))
    console.print(findings_group(result, verbose))
    counts = result.counts()
    console.print(
        Text.assemble(
            (_plural(counts["error"], "error"), "red" if counts["error"] else ""),
            ", ",
            (_plural(counts["warning"], "warning"), "yellow" if counts["warning"] else ""),
            f", {counts['info']} info",
        )
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
