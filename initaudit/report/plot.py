"""Signal-propagation plots: per tap, the predicted mean and median of M_j/M_0 on a log axis,
the Monte Carlo band when it ran, residual joins and normalization resets marked, and the
FM1 warning/error bounds as guides (the plots of Brock et al., THEORY.md section 6).

``.png``/``.svg`` are drawn by matplotlib (the optional ``plot`` extra, imported lazily, Agg
canvas, no pyplot state); ``.html`` is a self-contained page with an SVG drawn here, so it
needs nothing beyond initaudit. Files are written atomically: rendered in memory, written to
a temporary file beside the target, then renamed over it.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from initaudit.atomic import write_bytes
from initaudit.errors import UsageError
from initaudit.rules import Thresholds

if TYPE_CHECKING:
    from initaudit.audit import AuditResult

SUFFIXES = (".png", ".svg", ".html")
INSTALL_HINT = "pip install 'initaudit[plot]'"


@dataclass
class SignalSeries:
    """The per-tap numbers a strip or a plot draws, in tap order (x = 1..L)."""

    names: list[str]
    mean: list[float]  # predicted E[M_j] / M_ref
    median: list[float]  # predicted median of M_j / M_ref
    joins: list[int]  # 1-based taps that are residual joins
    resets: list[int]  # 1-based taps that start a new segment (after a normalization)
    measured_mean: list[float] | None = None  # NaN where the tap was not measured
    measured_mean_se: list[float] | None = None
    measured_median: list[float] | None = None
    measured_median_se: list[float] | None = None

    @property
    def depth(self) -> int:
        return len(self.names)

    @property
    def x(self) -> list[int]:
        return list(range(1, self.depth + 1))


def signal_series(result: AuditResult) -> SignalSeries:
    """The taps of ``result``'s prediction (main-path activations and residual joins), with
    the Monte Carlo estimates beside them when it ran."""
    rows = [row for row in result.prediction.layers if row.tap]
    blocks = {block.add for block in result.prediction.blocks}
    series = SignalSeries(
        names=[row.name for row in rows],
        mean=[row.mean for row in rows],
        median=[row.median for row in rows],
        joins=[j for j, row in enumerate(rows, start=1) if row.name in blocks],
        resets=[j for j, row in enumerate(rows, start=1) if j > 1 and row.segment != rows[j - 2].segment],
    )
    measured = result.prediction.measured
    if measured is not None and getattr(measured, "taps", None):
        estimates = [measured.taps.get(row.name) for row in rows]

        def column(attr: str) -> list[float]:
            return [float(getattr(e, attr)) if e is not None else math.nan for e in estimates]

        series.measured_mean = column("mean")
        series.measured_mean_se = column("mean_se")
        series.measured_median = column("median")
        series.measured_median_se = column("median_se")
    return series


def verdict_line(result: AuditResult) -> str:
    if not result.computable:
        return "FM1/FM2 not computed"
    return f"FM1 {result.verdict('fm1')}, FM2 {result.verdict('fm2')}"


def render_plot(
    result: AuditResult | Sequence[AuditResult], path: Path | str, thresholds: Thresholds | None = None
) -> None:
    """Draw the signal-propagation plot of ``result`` (or of several, stacked) to ``path``:
    the suffix picks the format (.png, .svg: matplotlib; .html: self-contained)."""
    path = Path(path)
    results = [result] if not isinstance(result, Sequence) else list(result)
    if not results:
        raise UsageError("--plot: no model to plot")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"--plot {path}: unsupported format {suffix or '(none)'!r}; use .png, .svg or .html")
    th = thresholds or Thresholds()
    if suffix == ".html":
        data = html_page(results, th).encode("utf-8")
    else:
        data = _matplotlib_bytes(results, th, suffix[1:], path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--plot {path}: directory {parent} does not exist")
    write_bytes(path, data)


# matplotlib ---------------------------------------------------------------------------------


def _matplotlib_bytes(results: list[AuditResult], th: Thresholds, fmt: str, path: Path) -> bytes:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            f"--plot {path}: .{fmt} plots need matplotlib: {INSTALL_HINT} (or use .html, which needs nothing)"
        ) from None
    fig = Figure(figsize=(9.0, 4.6 * len(results)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, result in zip(axes, results, strict=True):
        _draw(ax, result, th)
    buffer = io.BytesIO()
    metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buffer, format=fmt, metadata=metadata)
    return buffer.getvalue()


def _tex_safe(text: str) -> str:
    """Model names are text, not mathtext: a ``$`` would start a formula."""
    return text.replace("$", r"\$")


def _positive(values: Sequence[float]) -> list[float]:
    """Log axes drop zeros and negatives: draw them as gaps."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def _draw(ax: Any, result: AuditResult, th: Thresholds) -> None:
    from matplotlib.ticker import MaxNLocator

    title = f"{_tex_safe(result.path)}: {verdict_line(result)}"
    ax.set_title(title, fontsize=11, loc="left")
    series = signal_series(result)
    if not result.computable or series.depth == 0:
        ax.text(0.5, 0.5, _tex_safe(result.not_computed_reason or "nothing to plot"), ha="center",
                va="center", wrap=True, transform=ax.transAxes)  # fmt: skip
        ax.set_axis_off()
        return
    x = series.x
    ax.set_yscale("log")
    ax.axhline(1.0, color="0.55", lw=0.8)
    for bound, color, label in (
        (th.fm1_warning, "#e69f00", f"FM1 warning (x{th.fm1_warning:g})"),
        (th.fm1_error, "#d55e00", f"FM1 error (x{th.fm1_error:g})"),
    ):
        ax.axhline(bound, color=color, ls="--", lw=1, label=label)
        ax.axhline(1 / bound, color=color, ls="--", lw=1)
    if series.joins:
        ax.axvspan(series.joins[0] - 0.5, series.joins[-1] + 0.5, color="0.5", alpha=0.08, lw=0,
                   label=f"residual stream ({len(series.joins)} joins)")  # fmt: skip
    for j, reset in enumerate(series.resets):
        ax.axvline(
            reset - 0.5, color="0.4", ls=":", lw=1, label="normalization (length reset)" if j == 0 else None
        )
    marker = "o" if series.depth <= 60 and not series.joins else None
    ax.plot(x, _positive(series.mean), color="#0072b2", lw=1.8, marker=marker, ms=3,
            label="predicted E[$M_j$]/$M_0$")  # fmt: skip
    ax.plot(x, _positive(series.median), color="#0072b2", lw=1.4, ls="--", label="predicted median")
    if series.joins:
        ax.plot(series.joins, _positive([series.mean[j - 1] for j in series.joins]), ls="none", marker="D",
                ms=3.5, color="#0072b2", mfc="white", label="residual join")  # fmt: skip
    if series.measured_mean is not None:
        mean, se = series.measured_mean, series.measured_mean_se or [math.nan] * series.depth
        low = [m - 2 * s if m - 2 * s > 0 else m / 10 for m, s in zip(mean, se, strict=True)]
        high = [m + 2 * s for m, s in zip(mean, se, strict=True)]
        ax.fill_between(x, _positive(low), _positive(high), color="#cc79a7", alpha=0.25, lw=0,
                        label="measured mean ± 2 se")  # fmt: skip
        ax.plot(x, _positive(mean), ls="none", marker="o", ms=3.5, color="#cc79a7", label="measured mean")
        ax.plot(x, _positive(series.measured_median or []), ls="none", marker="x", ms=4, color="#009e73",
                label="measured median")  # fmt: skip
    ax.set_xlim(0.5, series.depth + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = _log_range(series, th)
    ax.set_ylim(10**lo, 10**hi)
    ax.set_xlabel("tap j (post-activation or residual join on the main path)")
    ax.set_ylabel("$M_j/M_0$")
    ax.grid(True, which="major", axis="y", color="0.9", lw=0.6)
    s = result.prediction.summary
    numbers = f"E[$M_L$]/$M_0$ = {_g(s.mean_ratio)}   median = {_g(s.median)}   Var ln = {_g(s.log_var)}"
    ax.text(0.01, 0.02, f"{numbers}   L = {s.depth}", transform=ax.transAxes, fontsize=8, color="0.3")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _g(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def _log_range(series: SignalSeries, th: Thresholds) -> tuple[float, float]:
    """The log10 y-range: every drawn value and both FM1 bounds, with a margin."""
    values = [*series.mean, *series.median, *(series.measured_mean or []), *(series.measured_median or [])]
    logs = [math.log10(v) for v in values if math.isfinite(v) and v > 0]
    bound = math.log10(th.fm1_error)
    lo = min([*logs, -bound])
    hi = max([*logs, bound])
    return lo - 0.15 * (hi - lo) - 0.1, hi + 0.1 * (hi - lo) + 0.1


# HTML / hand-drawn SVG ------------------------------------------------------------------------

_W, _H = 820, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 20, 48
_BLUE, _PINK, _GREEN, _ORANGE, _RED = "#0072b2", "#cc79a7", "#009e73", "#e69f00", "#d55e00"


def html_page(results: list[AuditResult], th: Thresholds) -> str:
    """A self-contained page: per model, its verdicts, the SVG plot and the numbers in a table."""
    sections = "\n".join(_html_section(result, th) for result in results)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>initaudit: signal propagation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
h2 {{ font-size: 1.1em; margin-bottom: 0.2em; }}
.verdict {{ margin-top: 0; }}
.pass {{ color: #1a7f37; }} .warning {{ color: #9a6700; }} .error {{ color: #cf222e; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
td, th {{ padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }}
td:first-child, th:first-child {{ text-align: left; }}
svg text {{ font-family: system-ui, sans-serif; }}
</style>
</head>
<body>
<h1>initaudit: signal propagation at initialization</h1>
{sections}
</body>
</html>
"""


def _html_section(result: AuditResult, th: Thresholds) -> str:
    name = html.escape(result.path)
    if result.computable:
        fm1, fm2 = result.verdict("fm1"), result.verdict("fm2")
        verdicts = f'FM1 <span class="{fm1}">{fm1}</span>, FM2 <span class="{fm2}">{fm2}</span>'
    else:
        verdicts = "FM1/FM2 not computed: " + html.escape(result.not_computed_reason or "")
    return (
        f'<section>\n<h2>{name}</h2>\n<p class="verdict">{verdicts}</p>\n{svg_plot(result, th)}\n'
        f"{_table(result)}\n</section>"
    )


def _table(result: AuditResult) -> str:
    series = signal_series(result)
    if not series.depth:
        return ""
    head = ["tap", "layer", "predicted E[M]/M0", "predicted median"]
    if series.measured_mean is not None:
        head += ["measured E[M]/M0", "measured median"]
    rows = []
    for i, name in enumerate(series.names):
        cells = [str(i + 1), html.escape(name), _g(series.mean[i]), _g(series.median[i])]
        if series.measured_mean is not None:
            se = series.measured_mean_se or [math.nan] * series.depth
            cells += [f"{_g(series.measured_mean[i])} ± {_g(se[i])}", _g((series.measured_median or [])[i])]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    body = "\n".join(rows)
    return f"<details><summary>per-tap numbers</summary>\n<table>\n{header}\n{body}\n</table>\n</details>"


def svg_plot(result: AuditResult, th: Thresholds) -> str:
    """The plot as a standalone SVG element (well-formed XML)."""
    series = signal_series(result)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
        f'role="img" aria-label="signal propagation of {html.escape(result.path, quote=True)}">',
        f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="white"/>',
    ]
    if not result.computable or series.depth == 0:
        reason = html.escape(result.not_computed_reason or "nothing to plot")
        out.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" font-size="14">{reason}</text>')
        out.append("</svg>")
        return "\n".join(out)
    lo, hi = _log_range(series, th)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(j: float) -> float:
        return _LEFT + (j - 0.5) / series.depth * plot_w

    def py(value: float) -> float:
        return _TOP + (hi - math.log10(value)) / (hi - lo) * plot_h

    # Frame, decade grid and labels.
    step = max(1, math.ceil((math.floor(hi) - math.ceil(lo) + 1) / 12))
    for k in range(math.ceil(lo), math.floor(hi) + 1, step):
        y = py(10.0**k)
        out.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        label = f"{10.0**k:g}" if -3 <= k <= 3 else f"1e{k}"
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>')
    xstep = max(1, math.ceil(series.depth / 12))
    for j in range(1, series.depth + 1, xstep):
        out.append(
            f'<text x="{px(j):.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle" font-size="11">{j}</text>'
        )
    out.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{_H - 8}" text-anchor="middle" font-size="12">'
        "tap j (post-activation or residual join)</text>"
    )
    out.append(
        f'<text x="16" y="{_TOP + plot_h / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {_TOP + plot_h / 2})">M_j / M_0 (log scale)</text>'
    )
    # Residual stream, normalization resets, FM1 guides.
    if series.joins:
        x0, x1 = px(series.joins[0] - 0.5), px(series.joins[-1] + 0.5)
        out.append(
            f'<rect x="{x0:.1f}" y="{_TOP}" width="{x1 - x0:.1f}" height="{plot_h}" fill="#888" '
            f'fill-opacity="0.08"><title>residual stream: {len(series.joins)} joins</title></rect>'
        )
    for reset in series.resets:
        x = px(reset - 0.5)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#666" '
            'stroke-dasharray="2,3"><title>normalization: the length resets</title></line>'
        )
    out.append(_hline(py(1.0), "#999", "", "M_0"))
    for bound, color, word in ((th.fm1_warning, _ORANGE, "warning"), (th.fm1_error, _RED, "error")):
        for value in (bound, 1 / bound):
            out.append(_hline(py(value), color, "6,4", f"FM1 {word} bound {value:.3g}"))
    # Measured band and points.
    if series.measured_mean is not None:
        se = series.measured_mean_se or [math.nan] * series.depth
        mean = series.measured_mean
        upper = [(px(j), py(m + 2 * s)) for j, m, s in zip(series.x, mean, se, strict=True) if _ok(m + 2 * s)]
        lower = [
            (px(j), py(m - 2 * s if m - 2 * s > 0 else m / 10))
            for j, m, s in zip(series.x, mean, se, strict=True)
            if _ok(m + 2 * s) and _ok(m)
        ]
        if len(upper) >= 2 and len(upper) == len(lower):
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in [*upper, *reversed(lower)])
            out.append(f'<polygon points="{points}" fill="{_PINK}" fill-opacity="0.25" stroke="none"/>')
        for j, name, m, s in zip(series.x, series.names, mean, se, strict=True):
            if _ok(m):
                out.append(
                    f'<circle cx="{px(j):.1f}" cy="{py(m):.1f}" r="3" fill="{_PINK}">'
                    f"<title>{html.escape(name)}: measured E[M]/M0 = {_g(m)} ± {_g(s)}</title></circle>"
                )
        for j, name, m in zip(series.x, series.names, series.measured_median or [], strict=True):
            if _ok(m):
                x, y = px(j), py(m)
                out.append(
                    f'<path d="M{x - 3:.1f},{y - 3:.1f}L{x + 3:.1f},{y + 3:.1f}M{x - 3:.1f},{y + 3:.1f}'
                    f'L{x + 3:.1f},{y - 3:.1f}" stroke="{_GREEN}" stroke-width="1.5">'
                    f"<title>{html.escape(name)}: measured median = {_g(m)}</title></path>"
                )
    # Predicted lines (gaps where a value is zero or not finite).
    out.extend(_polylines(series.mean, px, py, f'stroke="{_BLUE}" stroke-width="2"'))
    out.extend(
        _polylines(series.median, px, py, f'stroke="{_BLUE}" stroke-width="1.5" stroke-dasharray="6,3"')
    )
    for j, name, m, med in zip(series.x, series.names, series.mean, series.median, strict=True):
        if _ok(m):
            join = j in series.joins
            shape = "rect" if join else "circle"
            geometry = (
                f'x="{px(j) - 3:.1f}" y="{py(m) - 3:.1f}" width="6" height="6"'
                if join
                else f'cx="{px(j):.1f}" cy="{py(m):.1f}" r="{2.5 if series.depth <= 60 else 1.2}"'
            )
            fill = "white" if join else _BLUE
            out.append(
                f'<{shape} {geometry} fill="{fill}" stroke="{_BLUE}"><title>{html.escape(name)}'
                f"{' (residual join)' if join else ''}: predicted E[M]/M0 = {_g(m)}, median = {_g(med)}"
                f"</title></{shape}>"
            )
    out.extend(_legend(series))
    out.append("</svg>")
    return "\n".join(out)


def _ok(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _hline(y: float, color: str, dash: str, title: str) -> str:
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}"{dashed}>'
        f"<title>{html.escape(title)}</title></line>"
    )


def _polylines(
    values: list[float], px: Callable[[float], float], py: Callable[[float], float], style: str
) -> list[str]:
    runs: list[list[str]] = [[]]
    for j, value in enumerate(values, start=1):
        if _ok(value):
            runs[-1].append(f"{px(j):.1f},{py(value):.1f}")
        elif runs[-1]:
            runs.append([])
    return [f'<polyline points="{" ".join(run)}" fill="none" {style}/>' for run in runs if len(run) >= 2]


def _legend(series: SignalSeries) -> list[str]:
    line = '<line x1="0" x2="22" y1="0" y2="0" '
    entries = [
        (f'{line}stroke="{_BLUE}" stroke-width="2"/>', "predicted E[M_j]/M_0"),
        (f'{line}stroke="{_BLUE}" stroke-width="1.5" stroke-dasharray="6,3"/>', "predicted median"),
        (f'{line}stroke="{_ORANGE}" stroke-dasharray="6,3"/>', "FM1 warning"),
        (f'{line}stroke="{_RED}" stroke-dasharray="6,3"/>', "FM1 error"),
    ]
    if series.joins:
        entries.append(
            (f'<rect x="8" y="-3" width="6" height="6" fill="white" stroke="{_BLUE}"/>', "residual join")
        )
    if series.measured_mean is not None:
        entries.append(
            (
                f'<rect x="0" y="-5" width="22" height="10" fill="{_PINK}" fill-opacity="0.35"/>',
                "measured ± 2 se",
            )
        )
        entries.append((f'<circle cx="11" cy="0" r="3" fill="{_PINK}"/>', "measured mean"))
        entries.append(
            (f'<path d="M8,-3L14,3M8,3L14,-3" stroke="{_GREEN}" stroke-width="1.5"/>', "measured median")
        )
    out = []
    x0, y0 = _W - _RIGHT - 190, _TOP + 14
    out.append(
        f'<rect x="{x0 - 8}" y="{y0 - 12}" width="186" height="{16 * len(entries) + 6}" fill="white" '
        'fill-opacity="0.85" stroke="#ccc"/>'
    )
    for i, (glyph, label) in enumerate(entries):
        y = y0 + 16 * i
        out.append(f'<g transform="translate({x0} {y})">{glyph}</g>')
        out.append(f'<text x="{x0 + 30}" y="{y + 4}" font-size="11">{html.escape(label)}</text>')
    return out
