"""The pipeline: file -> layer graph -> predictions -> findings. No rendering here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from initaudit.graph import LayerGraph
from initaudit.rules import (
    RULES,
    WEIGHTS_ONLY,
    Finding,
    Severity,
    Thresholds,
    evaluate,
    has_nonfinite,
    is_weights_only,
)
from initaudit.stats import match_scheme
from initaudit.theory.propagate import Prediction, predict

if TYPE_CHECKING:
    from initaudit.frontends import LoadOptions
    from initaudit.montecarlo.measure import MCOptions, Progress

#: The rules whose findings make up each verdict.
VERDICT_RULES = {"fm1": ("IA101", "IA102", "IA301"), "fm2": ("IA201",)}


@dataclass
class Selection:
    """Which rule codes to report, ruff-style: codes or prefixes (``IA1``, ``IA201``)."""

    select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for code in [*self.select, *self.ignore]:
            if not any(known.startswith(code.upper()) for known in RULES):
                raise ValueError(f"unknown rule code or prefix {code!r} (see `initaudit rules`)")

    def allows(self, code: str) -> bool:
        def matches(prefixes: list[str]) -> int:
            return max((len(p) for p in prefixes if code.startswith(p.upper())), default=-1)

        # ruff's precedence: the more specific code wins, and ignore wins a tie.
        chosen = matches(self.select) if self.select else 0
        return chosen >= 0 and chosen > matches(self.ignore)


@dataclass
class AuditResult:
    path: str
    graph: LayerGraph
    prediction: Prediction
    findings: list[Finding]
    #: Findings a baseline accepted (:meth:`initaudit.baseline.Baseline.filter`): not in
    #: ``findings``, not failing, counted for the report.
    suppressed: int = 0

    @property
    def weights_only(self) -> bool:
        """The file had weights but no architecture: tensors were checked one by one (IA105)."""
        return is_weights_only(self.graph)

    @property
    def audit_kind(self) -> str:
        """What the reports label the audit: "full" or "weights-only"."""
        return WEIGHTS_ONLY if self.weights_only else "full"

    @property
    def not_computed_reason(self) -> str | None:
        """Why FM1/FM2 have no verdict, or None when they have one."""
        if self.weights_only:
            return (
                "weights-only audit: the file has no architecture to propagate through; "
                "pass --model pkg.module:factory"
            )
        if has_nonfinite(self.graph):
            return "the file holds NaN or Inf weights (IA501)"
        if not self.prediction.layers:
            return "nothing to propagate: the graph has no activation and no output"
        return None

    @property
    def computable(self) -> bool:
        """No verdict is computed without an architecture, or from NaN/Inf weights (IA501 says where)."""
        return self.not_computed_reason is None

    def verdict(self, family: str) -> str:
        """The verdict for "fm1" or "fm2": "pass", "warning", "error", or "not computed"
        (:attr:`not_computed_reason` says why; :meth:`fails` still judges the findings)."""
        if not self.computable:
            return "not computed"
        worst = max(
            (f.severity for f in self.findings if f.code in VERDICT_RULES[family]),
            default=None,
        )
        return "pass" if worst is None or worst is Severity.INFO else str(worst)

    def counts(self) -> dict[str, int]:
        return {str(s): sum(f.severity is s for f in self.findings) for s in reversed(Severity)}

    def fails(self, fail_on: Severity) -> bool:
        return any(f.severity >= fail_on for f in self.findings)

    def schemes(self) -> dict[str, str]:
        """The init scheme each weight matches, by tensor name."""
        return {
            layer.weight.name: match_scheme(layer.weight, layer.fan_in, layer.fan_out)
            for layer in self.graph.linear_layers()
            if layer.weight is not None
        }


def audit_graph(
    graph: LayerGraph,
    path: str = "",
    thresholds: Thresholds | None = None,
    selection: Selection | None = None,
    mc: MCOptions | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Predict, measure when ``mc`` asks for samples, and judge. Monte Carlo that cannot run
    leaves the analytic report standing, with a note saying why."""
    prediction = predict(graph)
    if mc is not None and (mc.samples or mc.curvature):
        from initaudit.montecarlo.measure import MonteCarloUnavailable, measure

        try:
            prediction.measured = measure(graph, prediction, mc, progress)
        except MonteCarloUnavailable as why:
            graph.notes.append(f"Monte Carlo not run: {why}")
    findings = evaluate(graph, prediction, thresholds)
    if selection is not None:
        findings = [f for f in findings if selection.allows(f.code)]
    return AuditResult(
        path=display_path(path or graph.source), graph=graph, prediction=prediction, findings=findings
    )


def display_path(path: str | Path) -> str:
    """The path as reports and fingerprints show it: relative to the working directory when
    the file lies beneath it, POSIX separators, so the same file fingerprints the same
    however it was typed."""
    return relative_path(path)[0]


def relative_path(path: str | Path, root: Path | None = None) -> tuple[str, bool]:
    """``path`` in POSIX form relative to ``root`` (default: the working directory), and
    whether it lies beneath it; outside it, the absolute path. A relative ``path`` is taken
    relative to the working directory, as :func:`display_path` writes it."""
    absolute = Path(path).absolute()
    base = (root or Path.cwd()).absolute()
    try:
        return absolute.relative_to(base).as_posix(), True
    except ValueError:
        return absolute.as_posix(), False


def audit_file(
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    thresholds: Thresholds | None = None,
    selection: Selection | None = None,
    options: LoadOptions | None = None,
    mc: MCOptions | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Load ``path`` (see :class:`~initaudit.frontends.LoadOptions` for trust, ``--model``
    and input settings) and audit it. ``input_shape`` overrides ``options.input_shape``."""
    from initaudit.frontends import load_graph

    graph = load_graph(path, options, input_shape=input_shape)
    return audit_graph(graph, str(path), thresholds, selection, mc, progress)
