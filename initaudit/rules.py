"""Rules: predictions -> findings, each with a code, a severity, numbers and a fix.

Codes follow ruff's habit: a family prefix and a number. IA1xx mean length (FM1),
IA2xx length variance (FM2), IA3xx residual branches, IA5xx weight hygiene, IA9xx
load and modeling notes. Thresholds are the documented defaults of DESIGN.md.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

from initaudit.design import MAX_WIDTH, FM2Design, fm2_design_for, fm2_equivalent
from initaudit.frontends.weights_only import WEIGHTS_ONLY
from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.stats import TensorStats, match_scheme
from initaudit.theory.activations import get_activation
from initaudit.theory.propagate import Prediction


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown severity {text!r}: use info, warning or error") from None


@dataclass(frozen=True)
class Thresholds:
    """Where a number becomes a warning or an error (DESIGN.md defaults)."""

    fm1_error: float = 10.0  # E[M_L]/M_0 outside [1/10, 10]
    fm1_warning: float = 3.0  # outside [1/3, 3]
    beta_error: float = 1.0  # sum 1/n_j; Var ln M_L ~ 5 beta
    beta_warning: float = 0.3
    scale_factor: float = 2.0  # a weight's variance off its right value by more than this
    bias_share: float = 0.5  # bias carries more than this share of a pre-activation


@dataclass
class Finding:
    code: str
    severity: Severity
    message: str
    location: str = ""  # tensor or node name
    fix: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def rule(self) -> Rule:
        return RULES[self.code]

    def fingerprint(self, path: str) -> str:
        """Stable across runs and edits elsewhere in the file: rule, path, location. A finding
        without a location (a note, a summary) adds its message with every number outside quotes
        blanked: two notes differ, a note whose count or measurement changed keeps its fingerprint.
        Located findings hash exactly ``code|path|location``, as they always have."""
        key = f"{self.code}|{path}|{self.location}"
        if not self.location:
            # Quoted text ('name', `op`, "x") names something: kept whole. Numbers elsewhere move.
            parts = re.split(r"('[^']*'|`[^`]*`|\"[^\"]*\")", self.message)
            number = r"[-+]?(?:\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?|\b(?:inf|nan)\b)"
            key += "|" + "".join(part if i % 2 else re.sub(number, "#", part) for i, part in enumerate(parts))
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity  # the worst severity it can report
    summary: str
    explanation: str
    check: Callable[[LayerGraph, Prediction, Thresholds], Iterator[Finding]]
    #: Whether the rule means something without an architecture (a weights-only graph).
    weights_only: bool = False


RULES: dict[str, Rule] = {}


def rule(
    code: str, name: str, severity: Severity, summary: str, explanation: str, weights_only: bool = False
):
    def register(check: Callable[[LayerGraph, Prediction, Thresholds], Iterator[Finding]]):
        RULES[code] = Rule(code, name, severity, summary, explanation.strip(), check, weights_only)
        return check

    return register


def evaluate(
    graph: LayerGraph, prediction: Prediction, thresholds: Thresholds | None = None
) -> list[Finding]:
    """Every finding for ``graph``, most severe first, in rule order within a severity.

    Without a propagated prediction (a weights-only graph) only the rules that judge tensors
    on their own run: the others would read an empty summary.
    """
    thresholds = thresholds or Thresholds()
    tensors_only = is_weights_only(graph) or not prediction.layers
    findings = [
        f
        for r in RULES.values()
        if r.weights_only or not tensors_only
        for f in r.check(graph, prediction, thresholds)
    ]
    if graph.meta.get("bn_folded"):
        findings = [_folded_cap(f) for f in findings]
    order = list(RULES)
    return sorted(findings, key=lambda f: (-f.severity, order.index(f.code)))


#: Length rules a folded BatchNorm can fake: the inference graph lost the resets training has.
FOLDED_CAPPED = ("IA101", "IA102", "IA301")


def _folded_cap(finding: Finding) -> Finding:
    """An FM1 error on a graph whose BatchNorm looks folded (IA902) is a warning: the file is
    the inference graph, and training normalizes the length at every BatchNorm the export
    removed, so the error may be an artifact of the export. It still says what it measured."""
    if finding.code not in FOLDED_CAPPED or finding.severity is not Severity.ERROR:
        return finding
    return replace(
        finding,
        severity=Severity.WARNING,
        message=f"{finding.message} (BatchNorm looks folded into the convs, IA902: an error only "
        "if training runs this graph without normalization)",
        evidence={**finding.evidence, "capped_by": "IA902"},
    )


def is_weights_only(graph: LayerGraph) -> bool:
    """A graph of unconnected weight tensors: a state dict audited without its architecture."""
    return graph.meta.get("audit") == WEIGHTS_ONLY


def has_nonfinite(graph: LayerGraph) -> bool:
    return any(not t.finite for layer in graph for t in _tensors(layer)) or any(
        row.get("nonfinite", 0) for row in _skipped(graph)
    )


def _skipped(graph: LayerGraph) -> list[dict[str, Any]]:
    """Tensors a weights-only graph did not audit for scale; NaN in them still counts."""
    rows = graph.meta.get("skipped", []) if is_weights_only(graph) else []
    return [row for row in rows if isinstance(row, dict)]


# Helpers ------------------------------------------------------------------------------


def _tensors(layer: Layer) -> Iterator[TensorStats]:
    # attrs also hold plain numbers under the same keys (SELU's gamma): keep tensors only.
    for tensor in (layer.weight, layer.bias, layer.attrs.get("gamma"), layer.attrs.get("beta")):
        if isinstance(tensor, TensorStats):
            yield tensor


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def right_variance(graph: LayerGraph, layer: Layer) -> float | None:
    """The weight variance times fan-in that keeps the length through this layer and
    the activation it feeds: 1 / E[phi(z)^2] at unit variance (2 for ReLU); None when
    the layer feeds no activation (a norm, a join or the output decide its scale)."""
    consumer = graph.next_activation(layer.name)
    if consumer is None:
        return None
    return get_activation(consumer.activation or "identity", **consumer.attrs).right_gain()


def _branch_last_weights(graph: LayerGraph) -> set[str]:
    return {b.last_weight for b in graph.residual_blocks() if b.last_weight}


def _output_weights(graph: LayerGraph) -> set[str]:
    """Weights of the last linear layer before each output (zero-init heads are deliberate)."""
    names = set()
    for out in graph.outputs:
        stack = [out]
        while stack:
            layer = graph[stack.pop()] if stack[-1] in graph else None
            if layer is None:
                continue
            if layer.is_linear:
                if layer.weight is not None:
                    names.add(layer.weight.name)
                continue
            stack.extend(layer.inputs)
    return names


def scale_factors(graph: LayerGraph, thresholds: Thresholds) -> list[tuple[Layer, float, float]]:
    """(layer, variance ratio to the right init, std multiplier) for mis-scaled weights."""
    skip = _branch_last_weights(graph)
    rows = []
    for layer in graph.linear_layers():
        weight = layer.weight
        if weight is None or not weight.finite or weight.all_zero or not layer.fan_in or weight.name in skip:
            continue
        right = right_variance(graph, layer)
        if right is None:
            continue
        ratio = weight.second_moment * layer.fan_in / right
        # 5% slack so that a scheme exactly 2x off (Xavier for ReLU) is flagged in every layer,
        # not only in the layers whose sample variance happened to land beyond 2x.
        limit = thresholds.scale_factor / 1.05
        if ratio >= limit or ratio <= 1 / limit:
            rows.append((layer, ratio, 1 / math.sqrt(ratio)))
    return rows


# FM1 ----------------------------------------------------------------------------------

_FM1_EXPLANATION = """
FM1 (Hanin & Rolnick 2018): at random init the mean of the normalized activation length
M_j = ||act_j||^2 / n_j is multiplied by sigma_j^2 * E[phi(z)^2] / E[z^2] at every layer
(sigma_j^2 = weight variance x fan-in). For ReLU, variance 2/fan-in ("He") keeps E[M_j]
constant at any depth; Xavier halves it per layer and PyTorch's default nn.Linear init
divides it by six. Over L layers the signal explodes or vanishes exponentially and so do
the gradients. initaudit predicts E[M_j]/M_0 exactly (THEORY.md section 2) at every
post-activation point and residual join, restarting after a normalization layer.
Error outside [0.1, 10], warning outside [1/3, 3].
Fix: rescale each weight to the variance its activation needs (the finding names the
tensor and the factor); `initaudit check --fix` does it.
"""


@rule(
    "IA101",
    "mean-length-vanishing",
    Severity.ERROR,
    "The mean activation length vanishes with depth (FM1).",
    _FM1_EXPLANATION,
)
def _vanishing(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    yield from _fm1(graph, pred, th, vanishing=True)


@rule(
    "IA102",
    "mean-length-exploding",
    Severity.ERROR,
    "The mean activation length explodes with depth (FM1).",
    _FM1_EXPLANATION,
)
def _exploding(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    yield from _fm1(graph, pred, th, vanishing=False)


def _fm1(graph: LayerGraph, pred: Prediction, th: Thresholds, vanishing: bool) -> Iterator[Finding]:
    s = pred.summary
    ratio = s.worst_ratio
    if has_nonfinite(graph) or (ratio < 1) != vanishing:
        return
    if ratio <= 0:
        yield Finding(
            code="IA101",
            severity=Severity.ERROR,
            message=f"the signal is exactly zero at `{s.worst_layer}`: nothing reaches the output",
            location=s.worst_layer,
            fix="initialize the all-zero weights (see IA502) or the zero normalization scale",
            evidence={"ratio": 0.0, "layer": s.worst_layer},
        )
        return
    if s.residual and not vanishing and any(b.factor > 1 + 1e-9 for b in pred.blocks):
        return  # IA301 reports a residual stream that grows, with the right fix
    far = max(ratio, 1 / ratio)
    if far <= th.fm1_warning:
        return
    severity = Severity.ERROR if far > th.fm1_error else Severity.WARNING
    mis = scale_factors(graph, th)
    if mis:
        fix = _rescale_advice(mis) + ", to the variance each activation needs (2/fan-in for ReLU)"
    else:
        fix = "rescale the weights to the variance each activation needs (2/fan-in for ReLU)"
        if vanishing and _bias_dominated(graph, pred, th):
            fix += "; zero the biases, which set the floor the signal collapses to"
    word = "vanishes" if vanishing else "explodes"
    yield Finding(
        code="IA101" if vanishing else "IA102",
        severity=severity,
        message=f"mean activation length {word}: E[M]/M_0 = {_fmt(ratio)} at `{s.worst_layer}`",
        location=s.worst_layer,
        fix=fix,
        evidence={"ratio": ratio, "layer": s.worst_layer, "mis_scaled": len(mis)},
    )


@rule(
    "IA103",
    "weight-scale",
    Severity.WARNING,
    "A weight's variance is more than 2x off the value its activation needs.",
    """
Each dense or conv weight feeding an activation phi keeps the mean length when its
variance is 1 / (fan_in * E[phi(z)^2]) at unit variance: 2/fan-in for ReLU, 2.54/fan-in
for tanh, 2.35/fan-in for GELU (THEORY.md section 2). A tensor off by more than 2x in
variance is reported with the factor to multiply it by. Weights that feed a
normalization, a residual join or the output are not judged here: their scale is set by
the norm, by eta (IA3xx), or by design.
""",
)
def _weight_scale(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    for layer, ratio, mult in scale_factors(graph, th):
        weight = layer.weight
        assert weight is not None
        yield Finding(
            code="IA103",
            severity=Severity.WARNING,
            message=(
                f"`{weight.name}` has variance {_fmt(ratio)}x the right value for its "
                f"{graph.following_activation(layer.name)} (std {_fmt(weight.std)}, fan-in {layer.fan_in})"
            ),
            location=weight.name,
            fix=f"multiply `{weight.name}` by {_fmt(mult)}",
            evidence={"variance_ratio": ratio, "multiplier": mult, "std": weight.std, "fan_in": layer.fan_in},
        )


def _rescale_advice(mis: list[tuple[Layer, float, float]]) -> str:
    """One sentence for many weights: a common factor when they share one (Xavier, PyTorch's
    default), else the three farthest off, in graph order."""
    names = [layer.weight.name for layer, _, _ in mis if layer.weight is not None]
    mults = sorted(mult for _, _, mult in mis)
    median = mults[len(mults) // 2]
    if len(mis) > 1 and all(abs(m / median - 1) < 0.1 for m in mults):
        listed = ", ".join(f"`{n}`" for n in names[:3]) + (", ..." if len(names) > 3 else "")
        return f"multiply each of the {len(mis)} weights {listed} by ~{_fmt(median)}"
    worst = sorted(mis, key=lambda row: abs(math.log(row[1])), reverse=True)[:3]
    worst.sort(key=lambda row: mis.index(row))
    parts = [f"multiply `{layer.weight.name}` by {_fmt(mult)}" for layer, _, mult in worst]  # type: ignore[union-attr]
    return "; ".join(parts) + (f" (and {len(mis) - 3} more)" if len(mis) > 3 else "")


def _bias_dominated(graph: LayerGraph, pred: Prediction, th: Thresholds) -> list[tuple[Layer, float]]:
    rows = []
    for layer in graph.linear_layers():
        if layer.bias is None or not layer.bias.finite or layer.bias.second_moment == 0:
            continue
        state = pred.states.get(layer.name)
        if state is None or state.m2 <= 0:
            continue
        share = layer.bias.second_moment / (state.m2 * pred.unit)  # the bias is absolute, the state in M_0's
        if share > th.bias_share:
            rows.append((layer, share))
    return rows


@rule(
    "IA104",
    "bias-dominated",
    Severity.WARNING,
    "Biases carry most of a pre-activation: the signal has collapsed to the bias floor.",
    """
With E[M_j] = (sigma^2/2) E[M_{j-1}] + v_b/2 (ReLU), a bias of variance v_b sets a floor
the length cannot fall below; when the weights shrink the signal (PyTorch's default
init: factor 1/6 per layer, floor 1/(5n)), deep layers see mostly bias, and the input is
forgotten. Reported when the bias's share of a pre-activation's second moment exceeds
one half. Fix: zero the biases (or scale them down) and fix the weight scale.
""",
)
def _bias(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    rows = _bias_dominated(graph, pred, th)
    if not rows:
        return
    layer, share = max(rows, key=lambda row: row[1])
    names = ", ".join(f"`{row[0].bias.name}`" for row in rows[:3]) + (" ..." if len(rows) > 3 else "")  # type: ignore[union-attr]
    yield Finding(
        code="IA104",
        severity=Severity.WARNING,
        message=f"biases dominate {len(rows)} pre-activations (up to {share:.0%} at `{layer.name}`)",
        location=layer.bias.name if layer.bias else layer.name,
        fix=f"zero the biases {names}",
        evidence={"layers": len(rows), "max_share": share},
    )


# Weights-only audit -----------------------------------------------------------------------

#: The variance x fan-in each fan-in scheme sets: He keeps the length through a ReLU,
#: LeCun through a linear, tanh-like or normalized layer (THEORY.md section 2).
HE_GAIN, LECUN_GAIN = 2.0, 1.0

_WEIGHTS_ONLY_LABEL = "weights-only audit (no architecture)"

# Variance laws of the schemes a mis-scaled tensor can match, for the message.
_SCHEME_LAWS = {
    "pytorch": "PyTorch's nn.Linear/nn.Conv default, variance 1/(3 fan-in)",
    "xavier": "variance 2/(fan-in + fan-out)",
    "he_fan_out": "kaiming mode='fan_out', variance 2/fan-out",
}


@dataclass(frozen=True)
class ScaleRow:
    """One weight of a weights-only graph against the schemes its fan-in implies."""

    layer: Layer
    weight: TensorStats
    fan_in: int
    gain: float  # E[w^2] x fan-in: 2 for He, 1 for LeCun, 1/3 for PyTorch's default
    scheme: str  # what match_scheme says it was drawn from
    status: str  # "he", "lecun" (within the slack of that scheme), "off", "non-finite" or "zeros"

    @property
    def vs_he(self) -> float:
        """Variance over He's 2/fan-in."""
        return self.gain / HE_GAIN

    @property
    def vs_lecun(self) -> float:
        return self.gain / LECUN_GAIN

    @property
    def to_he(self) -> float:
        """What to multiply the tensor by to reach He's variance."""
        return math.sqrt(HE_GAIN / self.gain) if self.gain > 0 else math.inf

    @property
    def to_lecun(self) -> float:
        return math.sqrt(LECUN_GAIN / self.gain) if self.gain > 0 else math.inf


def scale_rows(graph: LayerGraph, thresholds: Thresholds | None = None) -> list[ScaleRow]:
    """Every weight of a weights-only graph, in file order, with its He/LeCun comparison.

    A tensor is fine when its variance is within ``scale_factor`` (2x, with IA103's 5% slack)
    of either scheme; which scheme is right depends on the activation it feeds, which a file
    without an architecture does not say.
    """
    th = thresholds or Thresholds()
    limit = th.scale_factor / 1.05
    rows = []
    for layer in graph.linear_layers():
        weight = layer.weight
        if weight is None or not layer.fan_in:
            continue
        gain = weight.second_moment * layer.fan_in
        if not weight.finite:
            status = "non-finite"
        elif weight.all_zero or gain == 0:
            status = "zeros"
        elif 1 / limit < gain / HE_GAIN < limit or 1 / limit < gain / LECUN_GAIN < limit:
            # Within reach of both (Xavier on a square matrix): name the nearer one in log.
            status = "he" if gain > math.sqrt(HE_GAIN * LECUN_GAIN) else "lecun"
        else:
            status = "off"
        scheme = match_scheme(weight, layer.fan_in, layer.fan_out)
        rows.append(ScaleRow(layer, weight, layer.fan_in, gain, scheme, status))
    return rows


def _scheme_family(scheme: str) -> str:
    """The family of a scheme name: "pytorch_default" and the short "pytorch" are one law."""
    if re.fullmatch(r"[a-z]+(_[a-z]+)*", scheme):
        return scheme.split("_")[0]
    # "normal(std=0.0199)" and "normal(std=0.02)" are one law; the factor tells them apart.
    return scheme.split("(", 1)[0]


def _law(scheme: str) -> str:
    if scheme in _SCHEME_LAWS:
        return _SCHEME_LAWS[scheme]
    return _SCHEME_LAWS.get(_scheme_family(scheme), "")


def _versus(ratio: float, name: str) -> str:
    return f"{_fmt(1 / ratio)}x below {name}" if ratio < 1 else f"{_fmt(ratio)}x above {name}"


@rule(
    "IA105",
    "weights-only-scale",
    Severity.WARNING,
    "Weights-only audit (no architecture): a weight's variance is >2x off both He and LeCun for its fan-in.",
    """
A state dict or safetensors file without its architecture gives no graph to propagate, so
FM1/FM2 cannot be computed. What can still be judged is each weight's scale against the
schemes its fan-in implies (PyTorch layout: a weight is (out, in) or (out, in/groups,
*kernel), fan-in = in x kernel size): He, variance 2/fan-in, is right for a layer feeding a
ReLU; LeCun, 1/fan-in, for one feeding a linear, tanh-like or normalized layer. Which one
applies depends on the activation, which the file does not say, so a tensor within 2x of
either passes. One off both by more than 2x is a warning with the factor to reach He (and
LeCun): PyTorch's default nn.Linear init (variance 1/(3 fan-in)) is 6x below He and shrinks
the mean length ~6x per ReLU layer. Tensors that match the same scheme with the same factor
are reported as one finding listing them (evidence `tensors`): a checkpoint initialized one
way would otherwise repeat the same line for every layer; the report's tensor table keeps
each tensor's numbers. An info finding counts the tensors near each scheme.
Embeddings, normalization parameters, running statistics, integer tensors and parameters not
named `*.weight` are skipped (the report lists them with the reason).
Fix: rescale the named tensors, or pass `--model pkg.module:factory` so initaudit can see
which activation each weight feeds and compute FM1/FM2.
""",
    weights_only=True,
)
def _weights_only_scale(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    if not is_weights_only(graph):
        return
    rows = scale_rows(graph, th)
    judged = [row for row in rows if row.status in ("he", "lecun", "off")]
    off = [row for row in judged if row.status == "off"]
    groups: list[list[ScaleRow]] = []
    for row in off:
        group = next(
            (
                g
                for g in groups
                if _scheme_family(g[0].scheme) == _scheme_family(row.scheme)
                and abs(row.to_he / g[0].to_he - 1) < 0.1
            ),
            None,
        )
        if group is None:
            groups.append([row])
        else:
            group.append(row)
    for group in groups:
        yield _scale_group_finding(group)
    if judged:
        near = {status: sum(row.status == status for row in judged) for status in ("he", "lecun", "off")}
        schemes: dict[str, int] = {}
        for row in judged:
            key = row.scheme if "(" not in row.scheme else _scheme_family(row.scheme)
            schemes[key] = schemes.get(key, 0) + 1
        listed = ", ".join(
            f"{name} {count}" for name, count in sorted(schemes.items(), key=lambda kv: -kv[1])
        )
        yield Finding(
            code="IA105",
            severity=Severity.INFO,
            message=(
                f"{_WEIGHTS_ONLY_LABEL}: {len(judged)} weights checked against the init of their fan-in: "
                f"{near['he']} near He (2/fan-in), {near['lecun']} near LeCun (1/fan-in), "
                f"{near['off']} off both by more than {_fmt(th.scale_factor)}x; schemes: {listed}"
            ),
            location="",
            fix="pass `--model pkg.module:factory` to compute FM1/FM2 with the architecture",
            evidence={"checked": len(judged), **near, "schemes": schemes},
        )


def _scale_group_finding(group: list[ScaleRow]) -> Finding:
    first = group[0]
    to_he = sorted(row.to_he for row in group)[len(group) // 2]
    to_lecun = to_he * math.sqrt(LECUN_GAIN / HE_GAIN)
    vs_he = 1 / to_he**2
    law = _law(first.scheme)
    matched = first.scheme + (f" ({law})" if law else "")
    if any(row.scheme != first.scheme for row in group):
        stds = sorted(row.weight.std for row in group)
        matched = f"{_scheme_family(first.scheme)} (std {_fmt(stds[0])}..{_fmt(stds[-1])})"
    where = f"{_versus(vs_he, 'He (2/fan-in)')} and {_versus(vs_he * 2, 'LeCun (1/fan-in)')}"
    names = [row.weight.name for row in group]
    if len(group) == 1:
        message = (
            f"{_WEIGHTS_ONLY_LABEL}: `{first.weight.name}` (std {_fmt(first.weight.std)}, "
            f"fan-in {first.fan_in}) matches {matched}: variance {_fmt(first.gain)}/fan-in, {where}"
        )
        fix = f"multiply `{first.weight.name}` by {_fmt(to_he)} for He (if it feeds a ReLU)"
    else:
        listed = ", ".join(f"`{n}`" for n in names[:3]) + (", ..." if len(names) > 3 else "")
        fans = sorted({row.fan_in for row in group})
        fan_text = f"fan-in {fans[0]}" if len(fans) == 1 else f"fan-in {fans[0]}..{fans[-1]}"
        message = (
            f"{_WEIGHTS_ONLY_LABEL}: {len(group)} weights {listed} ({fan_text}) match {matched}: "
            f"variance ~{_fmt(HE_GAIN * vs_he)}/fan-in, {where}"
        )
        fix = f"multiply each of the {len(group)} weights by ~{_fmt(to_he)} for He (if they feed ReLUs)"
    about = "~" if len(group) > 1 else ""
    fix += f" or by {about}{_fmt(to_lecun)} for LeCun (if a linear, tanh-like or normalized layer follows)"
    fix += "; --model tells which"
    return Finding(
        code="IA105",
        severity=Severity.WARNING,
        message=message,
        location=first.weight.name,
        fix=fix,
        evidence={
            "tensors": names,
            "scheme": first.scheme,
            "variance_vs_he": vs_he,
            "multiplier": to_he,
            "multiplier_lecun": to_lecun,
            "std": first.weight.std if len(group) == 1 else None,
            "fan_in": first.fan_in if len(group) == 1 else None,
        },
    )


# FM2 ----------------------------------------------------------------------------------


@rule(
    "IA201",
    "length-variance",
    Severity.ERROR,
    "The length of the signal varies wildly between random inits: the net is too narrow for its depth (FM2).",
    """
FM2 (Hanin & Rolnick 2018): even with the mean length preserved, ln M_L is a sum of one
random factor per layer, with Var ln M_L ~ 5 beta for ReLU, beta = sum_j 1/n_j over the
hidden widths (c_phi/n_j for other activations). The typical (median) network shrinks
its signal as exp(-5 beta / 2) while the mean stays put, and the length fluctuates by a
factor exp(sqrt(5 beta)) either way. Weights cannot fix this: width must grow with depth.
Error when beta > 1 (median below ~0.08), warning when beta > 0.3. Normalization layers
and scaled residual branches (sum eta^2 bounded) prevent it.
Fix: widen the hidden layers or cut depth; the finding gives both numbers.
""",
)
def _fm2(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    s = pred.summary
    if has_nonfinite(graph) or (s.residual and s.worst_ratio > th.fm1_warning):
        return  # a residual stream that explodes is IA301's; FM2 is secondary there
    # Var ln M ~ 5 beta for ReLU; compare on the log-variance so other activations count right.
    equivalent = fm2_equivalent(s.beta, s.log_var)
    if equivalent <= th.beta_warning:
        return
    severity = Severity.ERROR if equivalent > th.beta_error else Severity.WARNING
    # The width and depth that pass, by re-predicting a constant-width chain of this net's
    # activation and weight law (the numbers `fix` and `predict` give too).
    design = fm2_design_for(graph, pred, th)
    yield Finding(
        code="IA201",
        severity=severity,
        message=(
            f"length variance grows with depth: beta = {_fmt(s.beta)}, Var ln(M_L/M_0) = {_fmt(s.log_var)}, "
            f"median M_L/M_0 = {_fmt(s.median)} while the mean is {_fmt(s.mean_ratio)}"
        ),
        location=graph.outputs[0] if graph.outputs else "",
        fix=_fm2_fix(design, severity, th),
        evidence={
            "beta": s.beta,
            "log_var": s.log_var,
            "median": s.median,
            "depth": design.depth,
            "width": design.width,
            "width_needed": design.min_width["warning"],
            "depth_allowed": design.max_depth["warning"],
            "width_needed_error": design.min_width["error"],
            "depth_allowed_error": design.max_depth["error"],
        },
    )


def _fm2_fix(design: FM2Design, severity: Severity, th: Thresholds) -> str:
    """IA201's advice: the constant width that passes at this depth and the depth that
    passes at this width, for the finding's level and (for an error) for no warning."""

    def width(level: str) -> str:
        n = design.min_width[level]
        return str(n) if n is not None else f"more than {MAX_WIDTH}"

    test = "max(beta, Var ln(M_L/M_0) / 5)"
    tail = "; or add normalization / scaled residual connections"
    if severity is Severity.ERROR:
        return (
            f"weights cannot fix this: widen the hidden layers to at least {width('error')} (no error) / "
            f"{width('warning')} (no warning) at depth {design.depth}, or cut depth to "
            f"{design.max_depth['error']} (no error) / {design.max_depth['warning']} (no warning) layers "
            f"at width {design.width} ({test} <= {_fmt(th.beta_error)} / {_fmt(th.beta_warning)})" + tail
        )
    return (
        f"weights cannot fix this: widen the hidden layers to at least {width('warning')} at depth "
        f"{design.depth}, or cut depth to {design.max_depth['warning']} layers at width {design.width}, "
        f"for no warning ({test} <= {_fmt(th.beta_warning)})" + tail
    )


# Residual -----------------------------------------------------------------------------


@rule(
    "IA301",
    "residual-branches-unscaled",
    Severity.ERROR,
    "Residual branches are not scaled down: the stream explodes with the number of blocks.",
    """
For y_l = y_{l-1} + eta_l F_l(y_{l-1}) with a linear-terminated branch of gain g,
E[M_L] = M_0 prod_l (1 + g eta_l^2): FM1 is avoided iff sum eta_l^2 stays bounded
(THEORY.md section 4). eta = 1 doubles the stream per block (2^L); eta = 1/sqrt(L)
keeps it below e^g. Error outside [0.1, 10] for the stream after the last block,
warning outside [1/3, 3].
Fix: scale each branch by 1/sqrt(L g) (a scalar gate, LayerScale, or folded into the
branch's last weight); GPT-2 uses 1/sqrt(2 n_layer); Fixup and SkipInit/ReZero start
the branch at zero.
""",
)
def _residual(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    s = pred.summary
    blocks = pred.blocks
    if not blocks or has_nonfinite(graph) or s.worst_ratio <= th.fm1_warning:
        return
    if not any(b.factor > 1 + 1e-9 for b in blocks):
        return
    growing = [b for b in blocks if not b.normalized]
    count = len(blocks)
    gain = sum(b.gain for b in blocks) / count
    target = 1 / math.sqrt(count * max(gain, 1e-12))
    severity = Severity.ERROR if s.worst_ratio > th.fm1_error else Severity.WARNING
    if not growing:  # pre-norm: linear growth, not exponential
        severity = Severity.WARNING
    mean_eta = math.sqrt(sum(b.eta**2 for b in blocks) / count)
    message = (
        f"residual stream grows to E[M]/M_0 = {_fmt(s.worst_ratio)} over {count} blocks: "
        f"sum eta^2 = {_fmt(s.sum_eta2)} (eta ~ {_fmt(mean_eta)}, branch gain g ~ {_fmt(gain)})"
    )
    if not growing:  # a normalized branch adds a fixed amount, whatever the stream's length
        joins = [(b.add, b.skip) for b in graph.residual_blocks() if b.add in pred.states]
        added = [pred.states[add].m2 - pred.states[skip].m2 for add, skip in joins if skip in pred.states]
        per_block = sum(added) / len(added) if added else math.nan
        message = (
            f"pre-norm residual stream grows additively to E[M]/M_0 = {_fmt(s.worst_ratio)} over "
            f"{count} blocks: each normalized branch adds ~{_fmt(per_block)} M_0 (linear in depth, "
            "not exponential)"
        )
    yield Finding(
        code="IA301",
        severity=severity,
        message=message,
        location=s.worst_layer,
        fix=f"scale each of the {count} residual branches by {_fmt(target / max(mean_eta, 1e-12))} "
        f"(eta = 1/sqrt(L g) = {_fmt(target)})",
        evidence={
            "blocks": count,
            "sum_eta2": s.sum_eta2,
            "gain": gain,
            "target_eta": target,
            "ratio": s.worst_ratio,
        },
    )


@rule(
    "IA302",
    "dead-residual-branch",
    Severity.WARNING,
    "A residual branch whose gate and last weight are both zero gets no gradient.",
    """
SkipInit/ReZero zero the branch gate and Fixup zeroes the branch's last weight: either
alone starts the block as the identity and still trains. Zeroing both leaves every
parameter of the branch with zero gradient (THEORY.md section 4).
Fix: keep the gate at zero and re-initialize the last weight, or the reverse.
""",
)
def _dead_branch(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    for block in graph.residual_blocks():
        last = next((graph[n] for n in reversed(block.branch) if graph[n].is_linear), None)
        weight_zero = last is not None and last.weight is not None and last.weight.all_zero
        if block.gate == 0 and weight_zero:
            yield Finding(
                code="IA302",
                severity=Severity.WARNING,
                message=f"residual branch into `{block.add}` has a zero gate and a zero last weight",
                location=block.last_weight or block.add,
                fix=f"re-initialize `{block.last_weight}` (He) and keep the gate at zero",
                evidence={"add": block.add},
            )


@rule(
    "IA303",
    "relu-terminated-branch",
    Severity.INFO,
    "Residual branches end in a ReLU: the stream grows to first order in eta.",
    """
A branch ending in a ReLU adds a non-negative output: the cross term with the stream is
first order in eta, and growth is exp(Theta(sum eta)) rather than prod(1 + g eta^2)
(THEORY.md section 4). Fix: end the branch with a linear layer (pre-activation blocks).
""",
)
def _relu_terminated(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    ending = [b for b in pred.blocks if b.terminal in ("relu", "leaky_relu", "prelu", "softplus", "sigmoid")]
    if ending:
        yield Finding(
            code="IA303",
            severity=Severity.INFO,
            message=f"{len(ending)} residual branches end in {ending[0].terminal}: the stream mean drifts",
            location=ending[0].add,
            fix="end each branch with a linear layer (pre-activation residual blocks)",
            evidence={"blocks": len(ending)},
        )


# Weight hygiene -----------------------------------------------------------------------


#: Beyond this many standard errors, and this far apart in log units, measurement and
#: prediction disagree.
_DISAGREE_Z, _DISAGREE_LOG = 4.0, 0.05


@rule(
    "IA401",
    "prediction-disagrees",
    Severity.WARNING,
    "Monte Carlo disagrees with the analytic prediction beyond its statistical error.",
    """
With --mc, the real graph runs with freshly drawn weights and the length M_j is measured at
every tap. Measurement and prediction are compared where the comparison is sound (THEORY.md's
testing caution): on E ln M and the median everywhere, and on E[M] only where the predicted
relative spread is below 1 (heavier tails make the sample mean biased low). A difference of
more than 4 standard errors and more than 5% is reported at the tap where it is largest. The
measurement runs the actual network, so trust it for the resampled law; the prediction
assumes independent branches, Gaussian-like pre-activations and pass-through for unmodeled
ops, and the finding names which of these the graph strains. With --resample inputs (fixed
weights, random inputs), or with BatchNorm (the measured program normalizes by running
statistics, the prediction as in training), the two answer different questions and are not
compared.
""",
)
def _disagreement(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    measured = pred.measured
    if measured is None or measured.resample == "inputs" or not measured.comparable:
        return
    worst: tuple[float, str, str, float, float, float] | None = None
    for row in pred.layers:
        est = measured.taps.get(row.name)
        if not row.tap or est is None:
            continue
        for quantity, predicted, value, se in _comparisons(row, est):
            if not all(math.isfinite(v) for v in (predicted, value, se)) or se <= 0:
                continue
            z = (value - predicted) / se
            if (
                abs(z) > _DISAGREE_Z
                and abs(value - predicted) > _DISAGREE_LOG
                and (worst is None or abs(z) > abs(worst[0]))
            ):
                worst = (z, row.name, quantity, value, se, predicted)
    if worst is None:
        return
    z, layer, quantity, value, se, predicted = worst
    yield Finding(
        code="IA401",
        severity=Severity.WARNING,
        message=(
            f"Monte Carlo ({measured.samples} samples, {measured.resample}) disagrees at `{layer}`: "
            f"{quantity} measured {_fmt(value)} ± {_fmt(se)}, predicted {_fmt(predicted)} ({z:+.1f} se)"
        ),
        location=layer,
        fix="trust the measurement for this network; the prediction " + _strained_assumptions(graph, pred),
        evidence={
            "layer": layer,
            "quantity": quantity,
            "measured": value,
            "se": se,
            "predicted": predicted,
            "z": z,
        },
    )


def _comparisons(row: Any, est: Any) -> Iterator[tuple[str, float, float, float]]:
    """(quantity, predicted, measured, standard error), all in log units."""
    yield "E ln(M/M0)", row.log_mean, est.log_mean, est.log_mean_se
    if est.median > 0 and row.median > 0:
        yield "ln median(M/M0)", math.log(row.median), math.log(est.median), est.median_se / est.median
    if row.spread < 1 and est.mean > 0 and row.mean > 0:
        yield "ln E[M/M0]", math.log(row.mean), math.log(est.mean), est.mean_se / est.mean


def _strained_assumptions(graph: LayerGraph, pred: Prediction) -> str:
    reasons = []
    if pred.summary.unmodeled:
        reasons.append(f"passes {len(pred.summary.unmodeled)} unmodeled op(s) through unchanged")
    if pred.blocks:
        reasons.append("treats each residual branch as independent of its skip")
    if any(layer.kind is Kind.POOL for layer in graph):
        reasons.append("treats pooled positions as independent")
    if not reasons:
        reasons.append("assumes Gaussian-like pre-activations, which few, wide layers make accurate")
    return "; ".join(reasons)


#: Relative gradients ||dL/dW|| / ||W|| of the hidden layers spanning more than this within one
#: init: one learning rate moves the slowest layer this many times slower than the fastest.
_SPREAD_INFO, _SPREAD_WARNING = 10.0, 100.0


@rule(
    "IA402",
    "gradient-spread",
    Severity.WARNING,
    "At init, hidden layers' gradients span orders of magnitude: one learning rate cannot train them all.",
    """
With --curvature, the squared loss on random targets is differentiated at a few random inits
(THEORY.md section 5). For every hidden layer (a weight feeding an activation) the relative
gradient ||dL/dW|| / ||W|| is the step plain SGD takes on that layer, relative to the layer,
per unit learning rate. In a well-initialized net these agree within a small factor (He:
forward and backward lengths are both preserved, Hanin 2018); when they span orders of
magnitude within one init, a learning rate small enough for the fastest layer leaves the
slowest where it started: exploding/vanishing gradients. The spread is the largest over the
smallest relative gradient within one init, and the finding reports its median over inits:
above 10 it is a note, above 100 (two orders of magnitude) a warning. Deep narrow nets show
it through fluctuations (ln ||dL/dW||^2 is a random walk in depth with variance ~ 5/n per
layer), badly scaled inits or bias floors through a drift (PyTorch's default init: the backward
signal shrinks by 1/6 per layer while the biases hold the forward one up). Fix: the init (He
for ReLU layers) and the width the FM1/FM2 findings ask for; adaptive optimizers (Adam) only
partly compensate.
""",
)
def _gradient_spread(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    curv = _curvature(pred)
    if curv is None:
        return
    keys = _hidden_weight_keys(graph, pred)
    spreads: list[float] = []
    for init in curv.per_init:
        rel = {
            k: init.grad_norms[k] / init.param_norms[k]
            for k in keys
            if init.param_norms.get(k, 0.0) > 0 and k in init.grad_norms
        }
        if len(rel) >= 3 and min(rel.values()) > 0:
            spreads.append(max(rel.values()) / min(rel.values()))
    if not spreads:
        return
    spread = _median(spreads)
    if spread <= _SPREAD_INFO:
        return
    medians = {k: v for k, v in curv.relative_gradients().items() if k in keys}
    slow = min(medians, key=medians.__getitem__) if medians else ""
    fast = max(medians, key=medians.__getitem__) if medians else ""
    names = {key: name for name, key in _tensor_keys(graph, pred).items()}
    severity = Severity.WARNING if spread > _SPREAD_WARNING else Severity.INFO
    yield Finding(
        code="IA402",
        severity=severity,
        message=(
            f"at init the hidden layers' relative gradients ||dL/dW||/||W|| span {_fmt(spread)}x "
            f"(median over {len(spreads)} inits): `{names.get(slow, slow)}` gets the smallest, "
            f"`{names.get(fast, fast)}` the largest"
        ),
        location=names.get(slow, slow),
        fix="use He init (variance 2/fan-in for ReLU) and the width FM2 asks for; the gradient then "
        "reaches every layer at a similar scale",
        evidence={
            "spread": spread,
            "spreads": spreads,
            "slowest": names.get(slow, slow),
            "fastest": names.get(fast, fast),
            "relative_gradients": {names.get(k, k): v for k, v in medians.items()},
        },
    )


def _curvature(pred: Prediction) -> Any:
    measured = pred.measured
    curv = getattr(measured, "curvature", None) if measured is not None else None
    return curv if curv is not None and getattr(curv, "per_init", None) else None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _tensor_keys(graph: LayerGraph, pred: Prediction) -> dict[str, str]:
    """{tensor name in the graph -> state-dict key in the measured program}."""
    names = getattr(pred.measured, "tensor_keys", None) or {}
    return {
        layer.weight.name: names.get(layer.weight.name, layer.weight.name)
        for layer in graph.linear_layers()
        if layer.weight is not None
    }


def _hidden_weight_keys(graph: LayerGraph, pred: Prediction) -> set[str]:
    """Program keys of the weights that feed an activation (hidden layers, not heads)."""
    keys = _tensor_keys(graph, pred)
    return {
        keys[layer.weight.name]
        for layer in graph.linear_layers()
        if layer.weight is not None and graph.following_activation(layer.name) not in (None, "identity")
    }


@rule(
    "IA501",
    "non-finite-weights",
    Severity.ERROR,
    "A tensor holds NaN or Inf.",
    """
Any NaN or Inf in a weight, bias or normalization parameter propagates to every output.
No verdict is computed from such a file. Fix: find where the checkpoint was corrupted
(an overflow in training, a bad cast to float16) and re-export it.
""",
    weights_only=True,
)
def _nonfinite(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    for row in _skipped(graph):  # embeddings, norm scales: not audited for scale, but NaN is NaN
        if row.get("nonfinite"):
            yield Finding(
                code="IA501",
                severity=Severity.ERROR,
                message=f"`{row['name']}` has {row['nonfinite']} non-finite values",
                location=row["name"],
                fix=f"re-export the model; `{row['name']}` is corrupted",
                evidence={"nonfinite": row["nonfinite"]},
            )
    for layer in graph:
        for tensor in _tensors(layer):
            if not tensor.finite:
                yield Finding(
                    code="IA501",
                    severity=Severity.ERROR,
                    message=f"`{tensor.name}` has {tensor.nonfinite} non-finite values of {tensor.count}",
                    location=tensor.name,
                    fix=f"re-export the model; `{tensor.name}` is corrupted",
                    evidence={"nonfinite": tensor.nonfinite, "count": tensor.count},
                )


@rule(
    "IA502",
    "zero-weight",
    Severity.ERROR,
    "A weight tensor is all zeros: the layer passes nothing and gets no useful gradient.",
    """
An all-zero weight outputs only its bias, and all its units get identical gradients, so
they never differ. Exempt: a residual branch's last layer and the output layer, which
Fixup and SkipInit zero on purpose. In a weights-only audit (no architecture) neither can
be recognized, so the finding is a warning there.
Fix: initialize it (He for ReLU layers).
""",
    weights_only=True,
)
def _zero_weight(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    blind = is_weights_only(graph)
    exempt = set() if blind else _branch_last_weights(graph) | _output_weights(graph)
    for layer in graph.linear_layers():
        weight = layer.weight
        if weight is not None and weight.all_zero and weight.name not in exempt:
            yield Finding(
                code="IA502",
                severity=Severity.WARNING if blind else Severity.ERROR,
                message=f"`{weight.name}` is all zeros"
                + (
                    f" ({_WEIGHTS_ONLY_LABEL}: it may be an output layer or a residual branch's last"
                    " layer, zeroed on purpose; --model tells)"
                    if blind
                    else ""
                ),
                location=weight.name,
                fix=f"initialize `{weight.name}` with std {_fmt(math.sqrt(2 / (layer.fan_in or 1)))} (He)",
                evidence={"count": weight.count},
            )


# Modeling notes -----------------------------------------------------------------------


@rule(
    "IA901",
    "unmodeled-op",
    Severity.INFO,
    "An op the theory does not model was treated as pass-through.",
    """
initaudit models dense, conv, activations, normalizations, residual joins, scalar gates,
pools and shape ops. Anything else (attention, gating, custom ops) is assumed to pass
the signal through unchanged, and the prediction is only as good as that assumption.
Monte Carlo (`--mc`) measures what the real op does.
""",
)
def _unmodeled(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    ops: dict[str, list[str]] = {}
    for layer in graph:
        if layer.kind is Kind.UNMODELED:
            ops.setdefault(layer.op, []).append(layer.name)
    for op, names in ops.items():
        yield Finding(
            code="IA901",
            severity=Severity.INFO,
            message=f"{len(names)} `{op}` node(s) not modeled; assumed to pass the signal through",
            location=names[0],
            fix="run with --mc to measure them",
            evidence={"op": op, "count": len(names)},
        )


@rule(
    "IA902",
    "batchnorm-folded",
    Severity.INFO,
    "Convs carry biases and no normalization is present: BatchNorm may have been folded.",
    """
Exporters often fold BatchNorm into the preceding conv for inference, leaving no
normalization node. Training-time BatchNorm resets the length at every layer; a folded
graph hides that reset, so the prediction may call FM1 where training would not see it:
while this note stands, IA101, IA102 and IA301 report at most a warning (their message says
why), so a folded export does not fail a CI gate on an artifact.
Fix: export the training graph (`torch.onnx.export(..., training=TrainingMode.TRAINING,
do_constant_folding=False)`) or audit the PyTorch module.
""",
)
def _folded(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    if graph.meta.get("bn_folded"):
        yield Finding(
            code="IA902",
            severity=Severity.INFO,
            message="the model looks like BatchNorm was folded into its convs; the length reset is invisible",
            location="",
            fix="audit the training graph, where the normalization layers are present",
        )


@rule(
    "IA903",
    "graph-note",
    Severity.INFO,
    "The frontend made an assumption while reading the file.",
    """
Notes from reading the file: a symbolic dimension set to its default, a failed shape
inference, an opset converted, no architecture in the file (a weights-only audit). The
analysis went on; the note says what was assumed.
""",
    weights_only=True,
)
def _notes(graph: LayerGraph, pred: Prediction, th: Thresholds) -> Iterator[Finding]:
    for note in graph.notes:
        yield Finding(code="IA903", severity=Severity.INFO, message=note)
