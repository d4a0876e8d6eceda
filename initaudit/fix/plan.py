"""The fix plan: which stored tensors to change, by how much, and why, from an audit.

Pure numpy and theory, no file format: a writer (``write_onnx``, ``write_torch``) applies
the plan to a file, and :func:`apply_to_graph` applies it to the layer graph so that the
outcome is predicted before anything is written (``--dry-run`` exits by that prediction).

What the plan does, by finding (THEORY.md sections 2 and 4):

- IA101/IA102/IA103 (FM1 in plain layers): each dense/conv weight that feeds an activation
  gets the variance that activation needs, 1 / (fan-in E[phi(z)^2]) (2/fan-in for ReLU), by
  multiplying the stored tensor (the shape of its law is kept), or with ``redraw`` by a fresh
  seeded Gaussian draw. With an FM1 error every such weight more than 10% off is rescaled;
  with IA103 alone, the weights it names.
- IA104: the biases that dominate their pre-activations are zeroed.
- IA502: an all-zero weight that should not be is drawn fresh (zeros cannot be rescaled).
- IA301: each residual branch is scaled so that its contribution g eta^2 is 1/L (the
  stream then grows by at most (1 + 1/L)^L < e), through its scalar gate when it has one of
  its own, else through its last layer (weight and bias); ``residual_scale="zero"`` zeroes
  the last layer instead (SkipInit/Fixup), never where the gate is already zero.
- IA201 (FM2) cannot be fixed by weights: the plan says so, with the width (or depth) at
  which the theory passes.

Norm parameters, constant tensors and deliberately zero tensors are left alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from initaudit.audit import AuditResult, Selection, audit_graph
from initaudit.design import bisect_geometric, fm2_design_for
from initaudit.errors import UsageError
from initaudit.graph import Kind, Layer, LayerGraph, ResidualBlock
from initaudit.rules import Thresholds, _bias_dominated, right_variance
from initaudit.stats import TensorStats
from initaudit.theory.propagate import BlockPrediction, predict

#: With an FM1 error, weights this far off their right variance (in std) are rescaled too.
FM1_SLACK = 1.10
#: The stream growth the residual fix aims below: (1 + 1/L)^L < e, under the warning at 3.
RESIDUAL_TARGET = math.e
#: Activations whose output is not zero-mean: a branch ending in one drifts to first order.
_DRIFTING = ("relu", "leaky_relu", "prelu", "softplus", "sigmoid", "elu", "selu", "gelu", "silu")

SCALE, ZERO, REDRAW = "scale", "zero", "redraw"


@dataclass(frozen=True)
class TensorChange:
    """One stored tensor and what happens to it.

    ``old_std``/``new_std`` describe the stored tensor (for a single number, its absolute
    value). ``factor`` multiplies the stored tensor (0 zeroes it; NaN for a fresh draw, whose
    std is ``draw_std``).
    """

    tensor: str
    old_std: float
    new_std: float
    factor: float
    reason: str
    code: str
    action: str = SCALE
    draw_std: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "action": self.action,
            "old_std": self.old_std,
            "new_std": self.new_std,
            "factor": None if math.isnan(self.factor) else self.factor,
            "code": self.code,
            "reason": self.reason,
        }


@dataclass
class FixPlan:
    """The changes, the notes that explain what was not (or cannot be) changed, and the
    audit of the graph with the changes applied (``predicted``)."""

    before: AuditResult
    changes: list[TensorChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predicted: AuditResult | None = None
    redraw: bool = False
    seed: int = 0
    residual_scale: str = "sqrt"
    #: FM2 remedy from the theory: widths and depths that pass (see :func:`fm2_remedy`).
    fm2: dict[str, Any] | None = None

    def by_tensor(self) -> dict[str, TensorChange]:
        return {change.tensor: change for change in self.changes}

    def as_dict(self) -> dict[str, Any]:
        return {
            "changes": [change.as_dict() for change in self.changes],
            "notes": list(self.notes),
            "redraw": self.redraw,
            "seed": self.seed,
            "residual_scale": self.residual_scale,
            "fm2": self.fm2,
        }


# ----------------------------------------------------------------------------- building


def build_plan(
    result: AuditResult,
    *,
    redraw: bool = False,
    seed: int = 0,
    residual_scale: str = "sqrt",
    editable: Callable[[str], bool] | None = None,
    thresholds: Thresholds | None = None,
    selection: Selection | None = None,
) -> FixPlan:
    """The plan for ``result``'s findings. ``editable`` says which tensor names the file
    stores (a weight computed inside the graph cannot be rewritten); None allows all."""
    if residual_scale not in ("sqrt", "zero"):
        raise UsageError(f"--residual-scale {residual_scale!r}: expected sqrt or zero")
    if result.weights_only:
        raise UsageError(
            f"{result.path}: the file holds weights without an architecture, so there is no way to tell "
            "which activation each weight feeds; pass --model pkg.module:factory to fix it"
        )
    th = thresholds or Thresholds()
    plan = FixPlan(before=result, redraw=redraw, seed=seed, residual_scale=residual_scale)
    if not result.computable:
        plan.notes.append(f"nothing can be planned: {result.not_computed_reason}")
        plan.predicted = result
        return plan
    builder = _PlanBuilder(plan, editable or (lambda name: True), th)
    builder.plain_layers()
    graph = apply_to_graph(result.graph, plan.changes)
    if "IA301" in builder.codes:
        builder.residual_branches(graph, predict(graph).blocks)
        graph = apply_to_graph(result.graph, plan.changes)
    plan.predicted = audit_graph(graph, result.path, th, selection)
    builder.remaining(plan.predicted)
    return plan


class _PlanBuilder:
    def __init__(self, plan: FixPlan, editable: Callable[[str], bool], th: Thresholds) -> None:
        self.plan = plan
        self.result = plan.before
        self.graph = plan.before.graph
        self.editable = editable
        self.th = th
        self.codes = {f.code for f in self.result.findings}
        self.located = {(f.code, f.location) for f in self.result.findings}
        self.skipped: list[str] = []

    # ---- helpers

    def add(self, change: TensorChange) -> bool:
        if not self.editable(change.tensor):
            self.plan.notes.append(
                f"`{change.tensor}` is computed inside the graph, not stored in the file: not changed "
                f"(wanted: {change.reason})"
            )
            return False
        existing = self.plan.by_tensor().get(change.tensor)
        if existing is not None:
            if existing.action != change.action or not math.isclose(
                existing.factor, change.factor, rel_tol=0.01, abs_tol=1e-12
            ):
                self.plan.notes.append(
                    f"`{change.tensor}` is shared by several layers that want different changes: "
                    f"kept the first ({existing.reason})"
                )
            return False
        self.plan.changes.append(change)
        return True

    def fm1_code(self) -> str | None:
        return next((code for code in ("IA101", "IA102") if code in self.codes), None)

    # ---- FM1 in plain layers, biases, zero weights

    def plain_layers(self) -> None:
        graph = self.graph
        branch_last = {b.last_weight for b in graph.residual_blocks() if b.last_weight}
        fm1 = self.fm1_code()
        limit = self.th.scale_factor / 1.05  # IA103's own limit
        for layer in graph.linear_layers():
            weight = layer.weight
            if weight is None or not weight.finite or not layer.fan_in or weight.name in branch_last:
                continue
            alpha = abs(float(layer.attrs.get("weight_scale", 1.0)))
            if alpha == 0:
                continue
            if weight.all_zero:
                if ("IA502", weight.name) in self.located:
                    self._redraw_zero(layer, weight, alpha)
                continue
            right = right_variance(graph, layer)
            if right is None:
                continue
            ratio = weight.second_moment * layer.fan_in / right
            if ("IA103", weight.name) in self.located and not (1 / limit < ratio < limit):
                code = "IA103"
            elif fm1 is not None and abs(math.log(ratio)) > 2 * math.log(FM1_SLACK):
                code = fm1
            else:
                continue
            if weight.std == 0:
                self.plan.notes.append(
                    f"`{weight.name}` is constant ({weight.mean:.3g} everywhere): left alone; a constant "
                    "matrix has rank one, re-initialize it"
                )
                continue
            activation = graph.following_activation(layer.name) or "identity"
            gain = "2/fan-in" if activation == "relu" else f"{right:.3g}/fan-in"
            target = math.sqrt(right / layer.fan_in)  # the std the layer should have, as the graph sees it
            if self.plan.redraw:
                self.add(
                    TensorChange(
                        tensor=weight.name,
                        old_std=weight.std / alpha,
                        new_std=target / alpha,
                        factor=math.nan,
                        reason=f"feeds {activation}: variance {ratio:.3g}x of {gain} "
                        f"(fan-in {layer.fan_in}); drawn fresh N(0, {gain}), seed {self.plan.seed}",
                        code=code,
                        action=REDRAW,
                        draw_std=target / alpha,
                    )
                )
                continue
            factor = 1 / math.sqrt(ratio)
            self.add(
                TensorChange(
                    tensor=weight.name,
                    old_std=weight.std / alpha,
                    new_std=weight.std / alpha * factor,
                    factor=factor,
                    reason=f"feeds {activation}: variance {ratio:.3g}x of {gain} (fan-in {layer.fan_in})",
                    code=code,
                )
            )
        if "IA104" in self.codes:
            self._zero_biases()

    def _redraw_zero(self, layer: Layer, weight: TensorStats, alpha: float) -> None:
        right = right_variance(self.graph, layer) or 2.0  # He, as IA502's advice says
        target = math.sqrt(right / (layer.fan_in or 1))
        self.add(
            TensorChange(
                tensor=weight.name,
                old_std=0.0,
                new_std=target / alpha,
                factor=math.nan,
                reason=f"all zeros (zeros cannot be rescaled): drawn fresh N(0, {right:.3g}/fan-in), "
                f"seed {self.plan.seed}",
                code="IA502",
                action=REDRAW,
                draw_std=target / alpha,
            )
        )

    def _zero_biases(self) -> None:
        rows = _bias_dominated(self.graph, self.result.prediction, self.th)
        zeroed = []
        for layer, share in rows:
            bias = layer.bias
            if bias is None or bias.all_zero:
                continue
            scale = abs(float(layer.attrs.get("bias_scale", 1.0))) or 1.0
            if self.add(
                TensorChange(
                    tensor=bias.name,
                    old_std=_spread(bias) / scale,
                    new_std=0.0,
                    factor=0.0,
                    reason=f"carries {share:.0%} of the pre-activation's second moment: zeroed",
                    code="IA104",
                    action=ZERO,
                )
            ):
                zeroed.append(bias.name)
        if zeroed:
            self.plan.notes.append(
                f"zeroed {len(zeroed)} bias(es) that dominated their pre-activations (IA104): the signal "
                "had collapsed to the bias floor; zero biases are the usual init"
            )

    # ---- residual branches

    def residual_branches(self, graph: LayerGraph, blocks: list[BlockPrediction]) -> None:
        """Scale (or zero) each residual branch; ``graph``/``blocks`` are after the plain fixes."""
        count = len(blocks)
        if not count:
            return
        structure = {b.add: b for b in graph.residual_blocks()}
        gates = _gate_users(graph, structure.values())
        zero = self.plan.residual_scale == "zero"
        before = len(self.plan.changes)
        for pred in blocks:
            block = structure.get(pred.add)
            if block is None:
                continue
            contribution = pred.factor - 1.0  # g eta^2 for a linear-terminated branch
            if pred.gate == 0 or not math.isfinite(contribution) or contribution <= 0:
                continue
            if zero:
                self._zero_branch(graph, block)
                continue
            if contribution <= 1.0 / count * 1.001:
                continue  # already small enough
            drifting = pred.terminal in _DRIFTING
            # A linear-terminated branch adds g eta^2 to the stream; scale it to 1/L. One that
            # ends in a ReLU drifts the stream's mean by ~eta: aim at sum eta ~ 1 instead.
            target = 1.0 / count**2 if drifting else 1.0 / count
            factor = math.sqrt(target / contribution)
            self._scale_branch(graph, block, pred, factor, count, gates)
        if len(self.plan.changes) > before:
            drifting = any(pred.terminal in _DRIFTING for pred in blocks)
            how = (
                "zeroed the last layer of each residual branch (SkipInit/Fixup): every block starts as the "
                "identity and still trains"
                if zero
                else f"scaled {count} residual branches so that each adds 1/L of the stream "
                f"(eta = 1/sqrt(L g), L = {count})"
                + ("; branches ending in an activation add 1/L^2, so that sum eta ~ 1" if drifting else "")
            )
            self.plan.notes.append(how)
            self._shrink_until_bounded()

    def _last_layer(self, graph: LayerGraph, block: ResidualBlock) -> Layer | None:
        return next((graph[n] for n in reversed(block.branch) if graph[n].is_linear), None)

    def _gate(self, graph: LayerGraph, block: ResidualBlock) -> Layer | None:
        """The branch's own scalar gate after its last weight: a Mul/Div by a stored constant."""
        last = self._last_layer(graph, block)
        layers = [graph[n] for n in block.branch]
        tail = layers[layers.index(last) + 1 :] if last is not None else layers
        scales = [layer for layer in tail if layer.kind is Kind.SCALE and layer.attrs.get("constant")]
        return scales[-1] if len(scales) == 1 else None

    def _scale_branch(
        self,
        graph: LayerGraph,
        block: ResidualBlock,
        pred: BlockPrediction,
        factor: float,
        count: int,
        gates: dict[str, int],
    ) -> None:
        aim = f"1/L^2 ({pred.terminal}-terminated)" if pred.terminal in _DRIFTING else "1/L"
        why = f"branch into `{block.add}`: g eta^2 = {pred.factor - 1:.3g} per block, to {aim} (L = {count})"
        gate = self._gate(graph, block)
        name = gate.attrs.get("constant") if gate is not None else None
        if gate is not None and name and gates.get(name, 0) == 1 and self.editable(name):
            stats = graph.meta.get("tensor_stats", {}).get(name)
            value = abs(float(gate.attrs.get("value", 1.0)))
            stored = 1 / value if _divides(gate) and value else value  # a Div gate stores 1/eta
            stored_factor = 1 / factor if _divides(gate) else factor
            old = _spread(stats) if stats is not None else stored
            self.add(TensorChange(name, old, old * stored_factor, stored_factor, why + "; its gate", "IA301"))
            return
        last = self._last_layer(graph, block)
        if last is None or last.weight is None:
            self.plan.notes.append(f"residual branch into `{block.add}` has no stored weight to scale")
            return
        weight = last.weight
        alpha = abs(float(last.attrs.get("weight_scale", 1.0))) or 1.0
        self.add(
            TensorChange(
                weight.name, weight.std / alpha, weight.std / alpha * factor, factor,
                why + "; its last weight", "IA301",
            )
        )  # fmt: skip
        bias = last.bias
        if bias is not None and not bias.all_zero:
            scale = abs(float(last.attrs.get("bias_scale", 1.0))) or 1.0
            self.add(
                TensorChange(
                    bias.name, _spread(bias) / scale, _spread(bias) / scale * factor, factor,
                    why + "; its last bias (part of the branch output)", "IA301",
                )
            )  # fmt: skip

    def _zero_branch(self, graph: LayerGraph, block: ResidualBlock) -> None:
        last = self._last_layer(graph, block)
        why = f"branch into `{block.add}`: SkipInit/Fixup, the block starts as the identity"
        if last is not None and last.weight is not None and self.editable(last.weight.name):
            weight = last.weight
            alpha = abs(float(last.attrs.get("weight_scale", 1.0))) or 1.0
            self.add(
                TensorChange(
                    weight.name, weight.std / alpha, 0.0, 0.0, why + "; last weight zeroed", "IA301", ZERO
                )
            )
            bias = last.bias
            if bias is not None and not bias.all_zero:
                scale = abs(float(last.attrs.get("bias_scale", 1.0))) or 1.0
                self.add(
                    TensorChange(
                        bias.name, _spread(bias) / scale, 0.0, 0.0, why + "; last bias zeroed", "IA301", ZERO
                    )
                )
            return
        gate = self._gate(graph, block)
        name = gate.attrs.get("constant") if gate is not None else None
        if gate is not None and name and not _divides(gate):
            value = abs(float(gate.attrs.get("value", 1.0)))
            self.add(TensorChange(name, value, 0.0, 0.0, why + "; gate zeroed", "IA301", ZERO))
            return
        self.plan.notes.append(f"residual branch into `{block.add}`: no stored last weight or gate to zero")

    def _shrink_until_bounded(self) -> None:
        """The closed forms above are exact for linear-terminated branches on an unnormalized
        stream; elsewhere (drifting branches, pre-norm streams) check the prediction and, if
        the stream still grows past :data:`RESIDUAL_TARGET`, shrink every branch change by a
        common factor, found by bisection on the prediction."""
        residual = [c for c in self.plan.changes if c.code == "IA301" and c.action == SCALE]
        if not residual:
            return

        def growth(shrink: float) -> float:
            changes = [
                replace(c, factor=c.factor * shrink, new_std=c.new_std * shrink) if c in residual else c
                for c in self.plan.changes
            ]
            return predict(apply_to_graph(self.graph, changes)).summary.worst_ratio

        if growth(1.0) <= RESIDUAL_TARGET:
            return
        lo, hi = 1e-4, 1.0  # growth(lo) small, growth(hi) too big
        if growth(lo) > RESIDUAL_TARGET:
            self.plan.notes.append("the residual stream still grows with every branch scaled down 10^4x")
            return
        lo = bisect_geometric(lambda shrink: growth(shrink) <= RESIDUAL_TARGET, lo, hi, rel=1e-8)
        self.plan.changes = [
            replace(c, factor=c.factor * lo, new_std=c.new_std * lo) if c in residual else c
            for c in self.plan.changes
        ]
        self.plan.notes.append(
            f"residual branches scaled a further x{lo:.3g} so the predicted stream stays below "
            f"{RESIDUAL_TARGET:.3g}x its input (drifting or normalized branches)"
        )

    # ---- what weights cannot fix

    def remaining(self, predicted: AuditResult) -> None:
        fm2 = next((f for f in predicted.findings if f.code == "IA201"), None)
        if fm2 is not None:
            remedy = fm2_remedy(predicted, self.th)
            self.plan.fm2 = remedy
            self.plan.notes.append(_fm2_text(predicted, remedy))
        left = [f for f in predicted.findings if f.code in ("IA101", "IA102", "IA301")]
        if left and self.plan.changes:
            self.plan.notes.append(
                f"FM1 remains after the planned changes ({left[0].code}: {left[0].message}): "
                "its cause is not in the weight scales the plan can change"
            )
        if not self.plan.changes and not self.plan.notes:
            self.plan.notes.append("nothing to change: no finding that weights can fix")


def _spread(stats: TensorStats | None) -> float:
    """std for a tensor, absolute value for a single number."""
    if stats is None:
        return math.nan
    return stats.std if stats.count > 1 else stats.rms


def _divides(layer: Layer) -> bool:
    return "div" in layer.op.lower()


def _gate_users(graph: LayerGraph, blocks: Any) -> dict[str, int]:
    """How many residual branches each gate constant scales (a shared gate is not scaled)."""
    users: dict[str, int] = {}
    for block in blocks:
        for name in block.branch:
            layer = graph[name]
            constant = layer.attrs.get("constant") if layer.kind is Kind.SCALE else None
            if constant:
                users[constant] = users.get(constant, 0) + 1
    return users


# ----------------------------------------------------------------------------- FM2 remedy


def fm2_remedy(result: AuditResult, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The constant hidden width at which the theory passes FM2 for this depth, and the depth
    that passes at the current width: for the error threshold (what ``--fail-on error``
    needs) and the warning threshold (a clean pass). The numbers of IA201's fix text, from
    :func:`initaudit.design.fm2_design_for` (a constant-width chain of the model's activation
    and weight law, re-predicted)."""
    th = thresholds or Thresholds()
    return fm2_design_for(result.graph, result.prediction, th).as_dict()


def _fm2_text(result: AuditResult, remedy: dict[str, Any]) -> str:
    s = result.prediction.summary
    name = remedy["activation"][0]

    def width(key: str) -> str:
        return f">= {remedy[key]}" if remedy[key] else "beyond reach"

    return (
        f"FM2 (IA201) cannot be fixed by weights: the net is too narrow for its depth "
        f"(beta = sum 1/n_j = {s.beta:.3g}, Var ln(M_L/M_0) = {s.log_var:.3g}, "
        f"median M_L/M_0 = {s.median:.3g}). "
        f"By the theory, {remedy['depth']} {name} layers pass --fail-on error at a constant width "
        f"{width('width_error')} (no warning: {width('width_warning')}); at width {remedy['width']}, "
        f"at most {remedy['depth_error']} layers pass (no warning: {remedy['depth_warning']}). "
        "Normalization layers or scaled residual connections also prevent FM2."
    )


# ----------------------------------------------------------------------------- applying to a graph


def apply_to_graph(graph: LayerGraph, changes: list[TensorChange]) -> LayerGraph:
    """A copy of ``graph`` whose weight statistics are those after ``changes``: what the
    theory predicts for the fixed file before it is written."""
    by_name = {c.tensor: c for c in changes}
    layers = []
    for layer in graph.layers:
        new = replace(layer, attrs=dict(layer.attrs))
        alpha = float(layer.attrs.get("weight_scale", 1.0))
        if layer.weight is not None and layer.weight.name in by_name:
            new.weight = changed_stats(layer.weight, by_name[layer.weight.name], alpha)
        if layer.bias is not None and layer.bias.name in by_name:
            new.bias = changed_stats(
                layer.bias, by_name[layer.bias.name], float(layer.attrs.get("bias_scale", 1.0))
            )
        constant = layer.attrs.get("constant") if layer.kind is Kind.SCALE else None
        if constant in by_name:
            change = by_name[constant]
            value = float(layer.attrs.get("value", 1.0))
            factor = 0.0 if change.action == ZERO else abs(change.factor)
            if _divides(layer):
                new.attrs["value"] = value / factor if factor else math.inf
            else:
                new.attrs["value"] = value * factor
        layers.append(new)
    meta = dict(graph.meta)
    if isinstance(meta.get("tensor_stats"), dict):
        stats = dict(meta["tensor_stats"])
        for name, change in by_name.items():
            if name in stats:
                stats[name] = changed_stats(stats[name], change, 1.0)
        meta["tensor_stats"] = stats
    return LayerGraph(
        layers=layers,
        inputs=list(graph.inputs),
        outputs=list(graph.outputs),
        source=graph.source,
        format=graph.format,
        notes=list(graph.notes),
        meta=meta,
    )


def changed_stats(stats: TensorStats, change: TensorChange, scale: float = 1.0) -> TensorStats:
    """The statistics of a tensor after ``change``; ``scale`` is how the graph sees the stored
    tensor (Gemm's alpha: the graph holds alpha * W)."""
    if change.action == ZERO or (change.action == SCALE and change.factor == 0):
        return replace(
            stats,
            mean=0.0,
            std=0.0,
            second_moment=0.0,
            kurtosis=math.nan,
            absmax=0.0,
            zeros=stats.count,
            nonfinite=0,
        )
    if change.action == REDRAW:
        std = abs(scale) * float(change.draw_std or 0.0)
        return replace(
            stats,
            mean=0.0,
            std=std,
            second_moment=std * std,
            kurtosis=3.0,
            absmax=math.nan,
            zeros=0,
            nonfinite=0,
        )
    f = change.factor
    return replace(
        stats,
        mean=stats.mean * f,
        std=stats.std * abs(f),
        second_moment=stats.second_moment * f * f,
        absmax=stats.absmax * abs(f),
    )


# ----------------------------------------------------------------------------- arrays


def tensor_seed(seed: int, name: str) -> np.random.Generator:
    """A generator for one tensor's fresh draw: the same seed and name give the same draw,
    whatever else the plan changes."""
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, digest])


def new_values(change: TensorChange, old: np.ndarray | None, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The tensor after ``change``, in float64 (the writer casts it back to the file's dtype).
    ``old`` (any float dtype) is needed for a scale only."""
    if change.action == ZERO:
        return np.zeros(shape, dtype=np.float64)
    if change.action == REDRAW:
        rng = tensor_seed(seed, change.tensor)
        return rng.standard_normal(shape) * float(change.draw_std or 0.0)
    assert old is not None
    return np.asarray(old, dtype=np.float64) * change.factor
