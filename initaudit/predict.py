"""`initaudit predict`: the theory for an architecture that has no file yet, and the design
questions users ask of it (how wide for this depth, how deep for this width, what weight
scale, what eta for this many blocks).

:func:`build_graph` turns command-line facts (``--widths 64x50 --activation relu --init
xavier``) into the same :class:`~initaudit.graph.LayerGraph` a model file gives, so
``audit_graph`` predicts and judges it with the report and formats of ``check``.
:func:`design_answers` answers the questions, each by the closed form of THEORY.md as a
first guess and then by re-predicting the modified network with the same rules and
thresholds: an answer marked ``checked`` passes, and the next step past it does not.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from initaudit.design import (
    MAX_DEPTH,
    MAX_WIDTH,
    FM2Design,
    fm2_design_for,
    largest_float,
    next_up,
    round_down,
)
from initaudit.errors import UsageError
from initaudit.graph import ACTIVATIONS, LayerGraph
from initaudit.rules import Thresholds
from initaudit.synthetic import init_law, plain_mlp, residual_mlp
from initaudit.theory.activations import get_activation
from initaudit.theory.propagate import Prediction

if TYPE_CHECKING:
    from initaudit.audit import AuditResult, Selection
    from initaudit.montecarlo.measure import MCOptions, Progress

#: More layers than this is a typo (``64x50000``), and would take minutes to predict.
MAX_LAYERS = 10_000
NORMS = ("batch", "layer")
ACTIVATION_ALIASES = {
    "swish": "silu",
    "linear": "identity",
    "none": "identity",
    "leakyrelu": "leaky_relu",
    "lrelu": "leaky_relu",
}
_RUN = re.compile(r"\s*(\d+)\s*(?:[x×*]\s*(\d+)\s*)?")
_ETA_SQRT = re.compile(r"([0-9.eE+-]*)\s*/\s*sqrt\(\s*([0-9.eE+-]*)\s*\*?\s*L\s*\)")


def parse_widths(text: str) -> list[int]:
    """Hidden widths from ``64x50`` (50 layers of width 64), ``10,20,30,40`` or a mix such as
    ``784,256x10,10``."""
    if not text or not text.strip():
        raise UsageError("--widths is empty: give widths like 64x50 or 10,20,30,40")
    widths: list[int] = []
    for part in text.split(","):
        match = _RUN.fullmatch(part)
        if match is None:
            raise UsageError(
                f"--widths {text!r}: cannot read {part.strip()!r}; use WIDTH or WIDTHxCOUNT, "
                "separated by commas (784,256x10,10)"
            )
        width, count = int(match.group(1)), int(match.group(2) or 1)
        if width < 1 or count < 1:
            raise UsageError(f"--widths {text!r}: widths and counts must be positive ({part.strip()!r})")
        if len(widths) + count > MAX_LAYERS:
            raise UsageError(f"--widths {text!r}: more than {MAX_LAYERS} layers")
        widths.extend([width] * count)
    return widths


def format_widths(widths: list[int] | tuple[int, ...]) -> str:
    """The shortest ``parse_widths`` text for ``widths``: runs written ``WIDTHxCOUNT``."""
    parts: list[str] = []
    i = 0
    while i < len(widths):
        j = i
        while j < len(widths) and widths[j] == widths[i]:
            j += 1
        parts.append(f"{widths[i]}x{j - i}" if j - i > 1 else str(widths[i]))
        i = j
    return ",".join(parts)


def parse_eta(value: float | str | None, blocks: int) -> float:
    """The branch scale: a number, or ``1/sqrt(L)``-style text (``0.5/sqrt(L)``,
    ``1/sqrt(2L)``) with L the number of blocks. None is an unscaled branch (1)."""
    if value is None:
        return 1.0
    if isinstance(value, int | float):
        eta = float(value)
    else:
        text = value.strip().replace(" ", "")
        match = _ETA_SQRT.fullmatch(text)
        try:
            if match:
                numerator = float(match.group(1) or 1.0)
                factor = float(match.group(2) or 1.0)
                eta = numerator / math.sqrt(factor * blocks)
            else:
                eta = float(text)
        except (ValueError, ZeroDivisionError):
            eta = math.nan
    if not math.isfinite(eta) or eta < 0:
        raise UsageError(f"--eta {value!r}: use a non-negative number or 1/sqrt(L) (also c/sqrt(kL))")
    return eta


def _activation(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ACTIVATION_ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise UsageError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}")
    return key


@dataclass(frozen=True)
class NetSpec:
    """An architecture described by its options: what ``build_graph`` built, and what the design
    answers vary. ``gain`` multiplies every weight's variance (a suggested fix, applied)."""

    widths: tuple[int, ...]
    activation: str = "relu"
    init: str = "he"
    bias_std: float = 0.0
    residual: int | None = None
    eta: float = 1.0
    eta_text: str = "1"
    branch_depth: int = 2
    input_width: int | None = None
    norm: str | None = None
    gain: float = 1.0

    @property
    def depth(self) -> int:
        """Hidden layers of a plain net; blocks of a residual one."""
        return self.residual if self.residual is not None else len(self.widths)

    @property
    def first_width(self) -> int:
        return self.input_width or self.widths[0]

    def describe(self) -> str:
        text = f"{format_widths(self.widths)} {self.activation} {self.init}"
        if self.gain != 1.0:
            text += f" x{_num(self.gain)} variance"
        if self.bias_std:
            text += f" bias-std {_num(self.bias_std)}"
        if self.norm:
            text += f" {self.norm}-norm"
        if self.residual is not None:
            text += f" residual {self.residual} eta {self.eta_text}"
        return text

    def graph(self) -> LayerGraph:
        if self.residual is None:
            graph = plain_mlp(
                self.first_width, list(self.widths), activation=self.activation, init=self.init,
                bias_std=self.bias_std, gain=self.gain, norm=self.norm,
            )  # fmt: skip
        else:
            graph = residual_mlp(
                self.widths[-1], self.residual, eta=self.eta, branch_depth=self.branch_depth,
                init=self.init, activation=self.activation, stem=list(self.widths[:-1]),
                input_width=self.input_width, bias_std=self.bias_std, gain=self.gain, norm=self.norm,
            )  # fmt: skip
        graph.source = f"predict {self.describe()}"
        # Monte Carlo's shortcut engine runs plain chains; anything else has no program to run.
        graph.meta["extraction"] = "initaudit predict (Monte Carlo runs its plain nets without normalization)"
        graph.meta["_spec"] = self  # private: reports leave it out, design_answers reads it
        return graph

    def but(self, **changes: Any) -> NetSpec:
        """This spec with some fields changed (``eta`` also resets ``eta_text``)."""
        if "eta" in changes and "eta_text" not in changes:
            changes["eta_text"] = _num(changes["eta"])
        return replace(self, **changes)


def make_spec(
    widths: list[int] | tuple[int, ...] | str,
    *,
    activation: str = "relu",
    init: str = "he",
    bias_std: float = 0.0,
    residual: int | None = None,
    eta: float | str | None = None,
    branch_depth: int = 2,
    input_width: int | None = None,
    norm: str | None = None,
    gain: float = 1.0,
) -> NetSpec:
    """Validate the options (a UsageError says what is wrong) and return their NetSpec."""
    if isinstance(widths, str):
        widths = parse_widths(widths)
    if not widths or any(int(w) < 1 for w in widths):
        raise UsageError("--widths needs at least one positive width")
    init_law(init)  # raises with the known names
    if not math.isfinite(bias_std) or bias_std < 0:
        raise UsageError(f"--bias-std {bias_std}: must be a non-negative number")
    if not math.isfinite(gain) or gain <= 0:
        raise UsageError(f"gain {gain}: must be a positive number")
    if input_width is not None and input_width < 1:
        raise UsageError(f"--input-width {input_width}: must be positive")
    if norm is not None:
        norm = norm.strip().lower().removesuffix("norm").removesuffix("_")
        if norm not in NORMS:
            raise UsageError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if residual is not None:
        if residual < 1 or residual * branch_depth + len(widths) > MAX_LAYERS:
            raise UsageError(f"--residual {residual}: use 1 to {MAX_LAYERS // max(branch_depth, 1)} blocks")
        if branch_depth < 1:
            raise UsageError(f"branch depth {branch_depth}: must be at least 1")
    elif eta is not None:
        raise UsageError("--eta scales residual branches: give --residual N with it")
    value = parse_eta(eta, residual or 1)
    text = str(eta).replace(" ", "") if isinstance(eta, str) else _num(value)
    return NetSpec(
        widths=tuple(int(w) for w in widths),
        activation=_activation(activation),
        init=init,
        bias_std=float(bias_std),
        residual=residual,
        eta=value,
        eta_text=text,
        branch_depth=branch_depth,
        input_width=input_width,
        norm=norm,
        gain=float(gain),
    )


def build_graph(
    widths: list[int],
    *,
    activation: str = "relu",
    init: str = "he",
    bias_std: float = 0.0,
    residual: int | None = None,
    eta: float | str | None = None,
    branch_depth: int = 2,
    input_width: int | None = None,
    norm: str | None = None,
) -> LayerGraph:
    """The layer graph of an architecture given by its options.

    Plain: input (``input_width``, default the first width) -> [dense -> (norm) -> activation]
    per width. Residual (``residual`` = N blocks): the last width is the stream's; the widths
    before it form a plain stem, then a linear projection where the width changes, then N
    blocks ``y + eta F(y)`` with F = [activation -> dense] x ``branch_depth`` (pre-norm with
    ``norm``). ``eta`` is a number or ``1/sqrt(L)``. Weights follow ``init``
    (:func:`initaudit.synthetic.init_law`: he, xavier, lecun, pytorch, ... or std=S).
    """
    spec = make_spec(
        widths, activation=activation, init=init, bias_std=bias_std, residual=residual, eta=eta,
        branch_depth=branch_depth, input_width=input_width, norm=norm,
    )  # fmt: skip
    return spec.graph()


# Design answers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One design question answered: ``value`` is the number, ``text`` the sentence, and
    ``checked`` whether re-predicting confirmed it (passes, and one step past fails)."""

    key: str
    question: str
    text: str
    value: float | int | None = None
    checked: bool = False


@dataclass
class DesignAnswers:
    answers: list[Answer] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{a.question} {a.text}" for a in self.answers]

    def to_dict(self) -> dict[str, Any]:
        """For the JSON report: each answer by key."""
        return {
            a.key: {"question": a.question, "answer": a.text, "value": a.value, "checked": a.checked}
            for a in self.answers
        }

    def __getitem__(self, key: str) -> Answer:
        return next(a for a in self.answers if a.key == key)

    def __contains__(self, key: object) -> bool:
        return any(a.key == key for a in self.answers)


def _num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


class _Judge:
    """Re-predicts variants of a spec and returns their FM1/FM2 verdicts (cached)."""

    def __init__(self, spec: NetSpec, thresholds: Thresholds) -> None:
        self.spec = spec
        self.thresholds = thresholds
        self._cache: dict[NetSpec, tuple[str, str, Prediction]] = {}

    def run(self, spec: NetSpec) -> tuple[str, str, Prediction]:
        if spec not in self._cache:
            from initaudit.audit import audit_graph

            result = audit_graph(spec.graph(), thresholds=self.thresholds)
            self._cache[spec] = (result.verdict("fm1"), result.verdict("fm2"), result.prediction)
        return self._cache[spec]

    def seed(self, spec: NetSpec, graph: LayerGraph, prediction: Prediction) -> None:
        """Judge an already predicted graph of ``spec`` without predicting it again."""
        from initaudit.audit import AuditResult
        from initaudit.rules import evaluate

        result = AuditResult("", graph, prediction, evaluate(graph, prediction, self.thresholds))
        self._cache[spec] = (result.verdict("fm1"), result.verdict("fm2"), prediction)

    def fm1(self, spec: NetSpec) -> str:
        return self.run(spec)[0]

    def fm2(self, spec: NetSpec) -> str:
        return self.run(spec)[1]


def _passes(verdict: str) -> bool:
    return verdict in ("pass", "info")


def _not_error(verdict: str) -> bool:
    return verdict != "error"


def design_answers(
    graph_or_spec: LayerGraph | NetSpec,
    prediction: Prediction | None = None,
    thresholds: Thresholds | None = None,
) -> DesignAnswers:
    """Answer the design questions for ``graph_or_spec`` under ``thresholds`` (rules.py's).

    How wide and how deep come from :func:`initaudit.design.fm2_design_for`, the numbers of
    IA201's fix text and of the fix plan, re-predicted on constant-width chains. A spec (or a
    graph that ``build_graph`` made) also gets its weight scale and branch scale re-predicted
    with the same rules; a residual graph from a model file gets THEORY.md's closed forms
    for eta.
    """
    th = thresholds or Thresholds()
    spec = graph_or_spec if isinstance(graph_or_spec, NetSpec) else graph_or_spec.meta.get("_spec")
    if spec is None:
        assert isinstance(graph_or_spec, LayerGraph)
        from initaudit.theory.propagate import predict

        return _file_answers(graph_or_spec, prediction or predict(graph_or_spec), th)
    judge = _Judge(spec, th)
    if prediction is None:
        prediction = judge.run(spec)[2]
    elif isinstance(graph_or_spec, LayerGraph):
        judge.seed(spec, graph_or_spec, prediction)
    if spec.residual is not None:
        return DesignAnswers(_residual_answers(spec, prediction, judge))
    graph = graph_or_spec if isinstance(graph_or_spec, LayerGraph) else spec.graph()
    return DesignAnswers(_plain_answers(spec, graph, prediction, judge))


def _plain_answers(spec: NetSpec, graph: LayerGraph, pred: Prediction, judge: _Judge) -> list[Answer]:
    th = judge.thresholds
    answers: list[Answer] = []
    if spec.norm:
        answers.append(
            Answer(
                "normalized",
                "How wide, how deep?",
                f"{spec.norm} normalization resets the length at every layer: neither the mean (FM1) "
                "nor the spread (FM2) of the length builds up with depth, at any width.",
            )
        )
        return answers
    answers.extend(_fm2_answers(fm2_design_for(graph, pred, th), pred))
    answers.append(_scale_answer(spec, pred, judge))
    if _fm1_depth_text(pred, th):
        answers.append(
            Answer(
                "fm1_depth", f"How deep with {spec.init}?", _fm1_depth_text(pred, th), _fm1_depth(pred, th)
            )
        )
    return answers


_TEST = "max(beta, Var ln(M_L/M_0) / 5)"


def _fm2_answers(design: FM2Design, pred: Prediction) -> list[Answer]:
    """How wide for this depth and how deep for this width, at both FM2 levels: the numbers
    of IA201's fix text and of the fix plan (:func:`initaudit.design.fm2_design`)."""
    depth, width = design.depth, design.width
    beta = pred.summary.beta
    constant = beta > 0 and math.isclose(depth / beta, width, rel_tol=1e-9)
    where = f"at width {width}" if constant else f"at the harmonic-mean width {width}"
    widths, depths = [], []
    for suffix, level, word in (("", "warning", "warning"), ("_error", "error", "error")):
        bound = design.bounds[level]
        n = design.min_width[level]
        if n is None:
            text = (
                f"no constant width up to {MAX_WIDTH} keeps FM2 below the {word} threshold at depth {depth}"
            )
            widths.append(Answer("min_width" + suffix, "How wide for this depth?", text))
        else:
            text = (
                f"at depth {depth}, a constant width of at least {n} keeps FM2 below the {word} threshold "
                f"({_TEST} <= {_num(bound)}, beta = {depth}/{n} = {_num(depth / n)}; "
                f"beta alone would allow {design.closed_width[level]})"
            )
            widths.append(
                Answer("min_width" + suffix, "How wide for this depth?", text, n, design.width_checked(level))
            )
        most = design.max_depth[level]
        value: int | None = most
        if most >= MAX_DEPTH:
            text = f"{where}, {MAX_DEPTH} or more layers stay below the FM2 {word} threshold"
            value = None
        elif most == 0:
            text = f"{where}, even one layer exceeds the FM2 {word} threshold"
        else:
            layers = f"{most} layer keeps" if most == 1 else f"{most} layers keep"
            text = (
                f"{where}, at most {layers} FM2 below the {word} threshold ({_TEST} <= {_num(bound)}, "
                f"beta = {most}/{width} = {_num(most / width)})"
            )
        depths.append(Answer("max_depth" + suffix, "How deep for this width?", text, value, True))
    return widths + depths


def _scale_answer(spec: NetSpec, pred: Prediction, judge: _Judge) -> Answer:
    """The weight variance that fixes FM1: 1/E[phi(z)^2] per fan-in (2 for ReLU), and what to
    multiply the chosen init's variance by to reach it."""
    right = get_activation(spec.activation).right_gain()
    law, _ = init_law(spec.init)
    fans = [spec.first_width, *spec.widths]
    multipliers = [right / (spec.gain * law(fan_in, fan_out)) for fan_in, fan_out in itertools.pairwise(fans)]
    lo, hi = min(multipliers), max(multipliers)
    fixed = spec.but(init="lecun", gain=right)
    verdict = judge.fm1(fixed)
    current = judge.fm1(spec)
    ratio = judge.run(fixed)[2].summary.mean_ratio
    target = f"variance {_num(right)}/fan-in ({'He' if spec.activation == 'relu' else spec.activation})"
    if hi / lo < 1.05:
        how = f"multiply {spec.init}'s variance by {_num(lo)} (std by {_num(math.sqrt(lo))})"
        value: float = lo
    else:
        how = f"multiply {spec.init}'s variance by {_num(lo)} to {_num(hi)} depending on the layer's fan-in"
        value = math.sqrt(lo * hi)
    if abs(math.log(hi)) < math.log(1.05) and abs(math.log(lo)) < math.log(1.05):
        text = f"{spec.init} already gives {target}: FM1 {current}"
    else:
        text = f"use {target}: {how}; re-predicted E[M_L]/M_0 = {_num(ratio)}, FM1 {verdict}"
    if spec.bias_std and verdict != "pass":
        text += f" (the biases, std {_num(spec.bias_std)}, also set a floor: zero them)"
    return Answer("variance_multiplier", "What weight scale fixes FM1?", text, value, _passes(verdict))


def _fm1_depth(pred: Prediction, th: Thresholds) -> int | None:
    """The first tap (1-based) where E[M_j]/M_0 leaves the FM1 warning band, or None."""
    taps = [row for row in pred.layers if row.tap]
    for j, row in enumerate(taps, start=1):
        if not (1 / th.fm1_warning <= row.mean <= th.fm1_warning):
            return j
    return None


def _fm1_depth_text(pred: Prediction, th: Thresholds) -> str:
    taps = [row for row in pred.layers if row.tap]
    first = _fm1_depth(pred, th)
    if first is None:
        return ""
    error = next(
        (j for j, row in enumerate(taps, start=1) if not (1 / th.fm1_error <= row.mean <= th.fm1_error)), None
    )
    text = f"E[M_j]/M_0 leaves [1/{_num(th.fm1_warning)}, {_num(th.fm1_warning)}] at layer {first}"
    if error is not None:
        text += f" and [1/{_num(th.fm1_error)}, {_num(th.fm1_error)}] at layer {error}"
    return text + f" (E[M_L]/M_0 = {_num(pred.summary.mean_ratio)} at L = {len(taps)})"


def _residual_answers(spec: NetSpec, pred: Prediction, judge: _Judge) -> list[Answer]:
    th = judge.thresholds
    blocks = spec.residual or 1
    gains = [b.gain for b in pred.blocks]
    g = sum(gains) / len(gains) if gains else 1.0
    answers = []
    for key, bound, ok_verdict, word in (
        ("max_eta", th.fm1_warning, _passes, "warning"),
        ("max_eta_error", th.fm1_error, _not_error, "error"),
    ):
        # THEORY: E[M_L]/M_0 = prod (1 + g eta^2) for linear-terminated branches.
        closed = math.sqrt((bound ** (1 / blocks) - 1) / g) if g > 0 else math.inf

        def ok(eta: float, ok_verdict: Callable[[str], bool] = ok_verdict) -> bool:
            return ok_verdict(judge.fm1(spec.but(eta=eta)))

        eta = largest_float(ok, closed if math.isfinite(closed) else 1.0)
        question = "What eta for this many blocks?"
        if eta is None:
            text = f"no branch scale keeps FM1 below the {word} threshold: the stem fails on its own"
            answers.append(Answer(key, question, text))
            continue
        if math.isinf(eta):
            text = f"any eta keeps FM1 below the {word} threshold"
            if spec.norm:
                text += " (pre-norm branches add a fixed amount per block: linear growth, a warning at most)"
            answers.append(Answer(key, question, text, eta, True))
            continue
        checked = ok(eta) and not ok(next_up(eta, 3))  # cached: the search evaluated both
        text = (
            f"eta <= {_num(eta)} keeps E[M_L]/M_0 within [1/{_num(bound)}, {_num(bound)}] "
            f"over {blocks} blocks (FM1 {word} bound"
        )
        if not spec.norm and math.isfinite(closed):
            text += f"; prod(1 + g eta^2) = {_num(bound)} with g = {_num(g)} gives {_num(closed)}"
        answers.append(Answer(key, question, text + ")", eta, checked))
    recommended = 1 / math.sqrt(blocks)
    fm1, _, rec_pred = judge.run(spec.but(eta=recommended))
    text = f"eta = 1/sqrt(L) = {_num(recommended)} gives E[M_L]/M_0 = {_num(rec_pred.summary.mean_ratio)}"
    if spec.norm:
        text += f" (pre-norm: 1 + L eta^2 g', linear in depth), FM1 {fm1}"
    else:
        text += f" (about e^g = {_num(math.exp(g))}), FM1 {fm1}"
        if abs(g - 1) > 0.05 and g > 0:
            text += f"; 1/sqrt(L g) = {_num(1 / math.sqrt(blocks * g))} for this branch gain"
    answers.append(Answer("eta_recommended", "And the usual choice?", text, recommended, _passes(fm1)))
    s = pred.summary
    text = (
        f"with sum eta^2 bounded, the blocks cannot build up FM2 at any width: Var ln(M_L/M_0) = "
        f"{_num(s.log_var)} here (sum eta^2 = {_num(s.sum_eta2)}), FM2 {judge.fm2(spec)}"
    )
    stem = spec.widths[:-1]
    if stem and not spec.norm:
        beta = sum(1 / w for w in stem)
        text += (
            f"; the plain stem {format_widths(stem)} adds about 5 beta = {_num(5 * beta)} of it "
            "(widen it as for a plain net)"
        )
    answers.append(Answer("residual_fm2", "How wide?", text, s.log_var))
    return answers


def _file_answers(graph: LayerGraph, pred: Prediction, th: Thresholds) -> DesignAnswers:
    """Answers for a graph with no spec (a model file): width and depth as for a spec, eta
    by THEORY's closed form, unchecked."""
    s = pred.summary
    answers: list[Answer] = []
    if not pred.layers or not s.depth:
        return DesignAnswers(answers)
    if not s.residual:
        return DesignAnswers(_fm2_answers(fm2_design_for(graph, pred, th), pred))
    blocks = len(pred.blocks)
    g = sum(b.gain for b in pred.blocks) / blocks
    for key, bound in (("max_eta", th.fm1_warning), ("max_eta_error", th.fm1_error)):
        if g > 0:
            eta = round_down(math.sqrt((bound ** (1 / blocks) - 1) / g), 3)
            text = (
                f"eta <= {_num(eta)} keeps prod(1 + g eta^2) <= {_num(bound)} over {blocks} blocks "
                f"(g = {_num(g)})"
            )
            answers.append(Answer(key, "What eta for this many blocks?", text, eta))
    eta = 1 / math.sqrt(blocks * g) if g > 0 else 1 / math.sqrt(blocks)
    answers.append(
        Answer("eta_recommended", "And the usual choice?", f"eta = 1/sqrt(L g) = {_num(eta)}", eta)
    )
    return DesignAnswers(answers)


def audit_design(
    graph: LayerGraph,
    thresholds: Thresholds | None = None,
    selection: Selection | None = None,
    mc: MCOptions | None = None,
    progress: Progress | None = None,
) -> tuple[AuditResult, DesignAnswers]:
    """``audit_graph`` and :func:`design_answers` together: what ``initaudit predict`` prints."""
    from initaudit.audit import audit_graph

    result = audit_graph(graph, thresholds=thresholds, selection=selection, mc=mc, progress=progress)
    return result, design_answers(graph, result.prediction, thresholds)
