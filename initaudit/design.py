"""Design by re-prediction: how wide for this depth, how deep for this width (FM2).

One implementation serves the three places that answer these questions: IA201's fix text
(rules.py), the FM2 remedy of the fix plan (fix/plan.py) and ``initaudit predict``'s design
answers (predict.py). Each describes its network by a :class:`Chain` (the main activation
and the weight and bias laws of the hidden layers, per fan-in) and asks :func:`fm2_design`,
which judges constant-width chains with the rule's own test, :func:`fm2_equivalent` against
the thresholds, by propagating them with the theory (THEORY.md's closed form
Var ln M_L ~ 5 L / n only gives the first guess). The same graph therefore gets the same
numbers wherever it is asked about.

A chain of depth d is the first d layers of any deeper chain of the same width, so one
propagation of depth D judges every depth up to D at once: a depth search costs one run
and a width search one run per width tried.

Also here: the monotone searches over integers and floats that the design answers share.
Pure numpy and theory: no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.synthetic import law_stats
from initaudit.theory.activations import get_activation

if TYPE_CHECKING:
    from initaudit.rules import Thresholds
    from initaudit.theory.propagate import Prediction

#: Where the searches give up: a width or depth beyond these is reported as "more than".
MAX_WIDTH = 1 << 24
MAX_DEPTH = 10_000
#: The FM2 levels: "error" passes ``--fail-on error``, "warning" is no finding at all.
LEVELS = ("error", "warning")
#: Activation parameters that change the law (others, such as a layer's name, do not).
_ACTIVATION_KEYS = ("alpha", "gamma", "approximate")


# ----------------------------------------------------------------------------- searches


def smallest_int(ok: Callable[[int], bool], guess: int, lo: int = 1, hi: int = MAX_WIDTH) -> int | None:
    """The smallest x in [lo, hi] with ok(x), for ok monotone (False ... False True ... True);
    galloping from ``guess`` so that a good guess costs two evaluations. None if ok(hi) fails."""
    x = min(max(guess, lo), hi)
    if ok(x):
        good, step = x, 1
        while good > lo:
            probe = max(good - step, lo)
            if not ok(probe):
                bad = probe
                break
            good, step = probe, step * 2
        else:
            return lo
    else:
        bad, step = x, 1
        while True:
            if bad >= hi:
                return None
            probe = min(bad + step, hi)
            if ok(probe):
                good = probe
                break
            bad, step = probe, step * 2
    while good - bad > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def bisect_geometric(ok: Callable[[float], bool], lo: float, hi: float, rel: float = 1e-5) -> float:
    """For ok(lo) true and ok(hi) false (0 < lo < hi), halve [lo, hi] on a log scale until
    hi / lo <= 1 + rel; return lo, which passes."""
    while hi / lo > 1 + rel:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def largest_float(ok: Callable[[float], bool], guess: float, digits: int = 3) -> float | None:
    """The largest x > 0 of ``digits`` significant figures with ok(x), for ok true below a
    boundary: x passes and :func:`next_up` (x) does not. A closed-form ``guess`` rounded down
    usually is the answer, at the cost of two evaluations; otherwise bisect. None when even a
    tiny x fails, inf when any x passes."""
    if guess > 0 and math.isfinite(guess):
        value = round_down(guess, digits)
        if ok(value) and not ok(next_up(value, digits)):
            return value
    guess = guess if guess > 0 and math.isfinite(guess) else 1.0
    lo, hi = guess, guess
    if ok(guess):
        while ok(hi):
            lo, hi = hi, hi * 2
            if hi > 1e6:
                return math.inf
    else:
        while not ok(lo):
            hi, lo = lo, lo / 2
            if lo < 1e-9:
                return None
    value = round_down(bisect_geometric(ok, lo, hi), digits)
    while value > 0 and not ok(value):  # rounding down only helps, but floats are floats
        value = round_down(value * (1 - 10 ** (1 - digits)), digits)
    while ok(next_up(value, digits)):
        value = next_up(value, digits)
    return value


def round_down(x: float, digits: int) -> float:
    """x rounded down to ``digits`` significant figures."""
    places = digits - 1 - math.floor(math.log10(x))
    # The nudge keeps a number already at `digits` figures (0.29 * 100 = 28.999...) where it is.
    return round(math.floor(x * 10**places * (1 + 1e-12)) / 10**places, places)


def next_up(x: float, digits: int) -> float:
    """The next number of ``digits`` significant figures above x."""
    places = digits - 1 - math.floor(math.log10(x))
    return round(x + 10.0**-places, places)


# ----------------------------------------------------------------------------- the rule's test


def fm2_equivalent(beta: float, log_var: float) -> float:
    """What IA201 compares with the beta thresholds: max(beta, Var ln(M_L/M_0) / 5), since
    Var ln M_L ~ 5 beta for ReLU and other activations count by their log-variance."""
    return max(beta, log_var / 5)


def fm2_bound(level: str, th: Thresholds) -> float:
    """The largest :func:`fm2_equivalent` that passes ``level`` ("error": no error, "warning":
    no finding)."""
    return th.beta_error if level == "error" else th.beta_warning


# ----------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class Chain:
    """A plain chain input -> [dense -> activation] x depth of one width: the network the
    design questions vary. ``gain`` is the weight variance times fan-in (2 for He under
    ReLU), ``bias_var`` the biases' variance (0: none); kurtoses as the laws'."""

    activation: str = "relu"
    attrs: tuple[tuple[str, Any], ...] = ()
    gain: float = 2.0
    kurtosis: float = 3.0
    bias_var: float = 0.0
    bias_kurtosis: float = 3.0

    @classmethod
    def right(cls, activation: str = "relu", **attrs: Any) -> Chain:
        """The chain of ``activation`` at its right gain (He for ReLU), Gaussian, no biases."""
        gain = get_activation(activation, **attrs).right_gain()
        return cls(activation, tuple(sorted(attrs.items())), gain)

    @classmethod
    def of(cls, graph: LayerGraph) -> Chain:
        """The chain that stands for ``graph``: its most common activation (identity when it
        has none) and the medians, over the linear layers that feed an activation, of their
        weight variance times fan-in, weight kurtosis and bias variance and kurtosis."""
        activation, attrs = main_activation(graph)
        hidden = [
            (layer.fan_in, layer.weight, layer.bias)
            for layer in graph.linear_layers()
            if layer.fan_in
            and layer.weight is not None
            and layer.weight.finite
            and graph.following_activation(layer.name) not in (None, "identity")
        ]
        if not hidden:
            return cls.right(activation, **attrs)
        biases = [b for _, _, b in hidden if b is not None and b.finite]
        bias_var = _median([b.second_moment for b in biases] + [0.0] * (len(hidden) - len(biases)), 0.0)
        return cls(
            activation=activation,
            attrs=tuple(sorted(attrs.items())),
            gain=_median([w.second_moment * fan_in for fan_in, w, _ in hidden], 2.0),
            kurtosis=_median([w.kurtosis for _, w, _ in hidden], 3.0),
            bias_var=bias_var,
            bias_kurtosis=_median([b.kurtosis for b in biases], 3.0) if bias_var else 3.0,
        )

    def graph(self, width: int, depth: int) -> LayerGraph:
        """The chain of ``depth`` layers of ``width`` (input of the same width)."""
        layers = [Layer("input", Kind.INPUT, "Input", width=width)]
        std = math.sqrt(self.gain / width)
        bias_std = math.sqrt(self.bias_var)
        attrs = dict(self.attrs)
        for j in range(1, depth + 1):
            bias = law_stats(f"fc{j}.bias", (width,), bias_std, self.bias_kurtosis) if bias_std else None
            layers.append(
                Layer(
                    f"fc{j}", Kind.DENSE, "MatMul", [layers[-1].name], width=width, fan_in=width,
                    fan_out=width, weight=law_stats(f"fc{j}.weight", (width, width), std, self.kurtosis),
                    bias=bias,
                )
            )  # fmt: skip
            layers.append(
                Layer(f"act{j}", Kind.ACTIVATION, self.activation, [f"fc{j}"], width=width,
                      attrs={"activation": self.activation, **attrs})
            )  # fmt: skip
        return LayerGraph(layers, inputs=["input"], outputs=[layers[-1].name], source="design chain")

    def equivalent(self, width: int, depth: int) -> float:
        """:func:`fm2_equivalent` of the chain ``width`` x ``depth``: what IA201 sees."""
        return float(_profile(self, width, _allocated(depth))[depth - 1])


def main_activation(graph: LayerGraph) -> tuple[str, dict[str, Any]]:
    """The most common activation of ``graph`` and its law's parameters; identity if none."""
    counts: dict[str, int] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for layer in graph:
        if layer.kind is Kind.ACTIVATION and layer.activation:
            counts[layer.activation] = counts.get(layer.activation, 0) + 1
            attrs.setdefault(layer.activation, layer.attrs)
    if not counts:
        return "identity", {}
    name = max(counts, key=counts.__getitem__)
    return name, {k: v for k, v in attrs[name].items() if k in _ACTIVATION_KEYS}


def _median(values: list[float], default: float) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.median(finite)) if finite else default


def _allocated(depth: int) -> int:
    """The depth actually propagated for ``depth``: a power of two, so that nearby depths
    share one run (a chain's prefix is the shorter chain)."""
    if not 1 <= depth <= MAX_DEPTH + 1:
        raise ValueError(f"chain depth {depth} outside 1..{MAX_DEPTH + 1}")
    return min(max(64, 1 << (depth - 1).bit_length()), MAX_DEPTH + 1)


@lru_cache(maxsize=128)
def _profile(chain: Chain, width: int, depth: int) -> np.ndarray:
    """:func:`fm2_equivalent` after each layer of the chain: entry d - 1 is what ``predict``
    gives for the chain of depth d (beta summed as ``propagate`` sums it, Var ln M at the
    last tap), without the summary's other statistics."""
    from initaudit.theory.propagate import Propagator

    graph = chain.graph(width, depth)
    states = Propagator(graph).run()
    counts = chain.activation != "identity"  # beta counts the layers that feed an activation
    out = np.empty(depth)
    for j in range(1, depth + 1):
        beta = math.fsum([1.0 / width] * j) if counts else 0.0  # as propagate sums it
        out[j - 1] = fm2_equivalent(beta, states[f"act{j}"].log_length[1])
    out.flags.writeable = False  # cached and shared
    return out


# ----------------------------------------------------------------------------- the answers


@dataclass(frozen=True)
class FM2Design:
    """How wide for ``depth`` and how deep for ``width``, per level (:data:`LEVELS`).

    ``min_width[level]``: the smallest constant width whose chain of ``depth`` layers
    passes, None beyond :data:`MAX_WIDTH`. ``max_depth[level]``: the largest depth such that
    the chain of ``width`` passes at that depth and every smaller one: 0 when one layer
    fails already, :data:`MAX_DEPTH` meaning that many or more. ``closed_width``: L / bound,
    what beta alone would allow.
    """

    chain: Chain
    depth: int
    width: int
    equivalent: float  # of the chain width x depth
    min_width: dict[str, int | None]
    max_depth: dict[str, int]
    closed_width: dict[str, int]
    bounds: dict[str, float]

    def passes(self, level: str, width: int, depth: int) -> bool:
        return self.chain.equivalent(width, depth) <= self.bounds[level]

    def width_checked(self, level: str) -> bool:
        """The width passes and one less does not (both judged in the search: cached)."""
        n = self.min_width[level]
        if n is None or not self.passes(level, n, self.depth):
            return False
        return n == 1 or not self.passes(level, n - 1, self.depth)

    def as_dict(self) -> dict[str, Any]:
        """The fix plan's ``fm2`` document."""
        name, attrs = self.chain.activation, dict(self.chain.attrs)
        out: dict[str, Any] = {"depth": self.depth, "width": self.width, "activation": [name, attrs]}
        for level in LEVELS:
            out[f"width_{level}"] = self.min_width[level]
            out[f"depth_{level}"] = self.max_depth[level]
        return out


def fm2_design_for(graph: LayerGraph, prediction: Prediction, thresholds: Thresholds) -> FM2Design:
    """:func:`fm2_design` for a predicted graph: its :class:`Chain`, its depth (the taps of
    the last segment; the linear layers of a net without activations) and its effective
    width L / beta (the width itself when constant)."""
    s = prediction.summary
    chain = Chain.of(graph)
    depth = s.depth
    if chain.activation == "identity":
        depth = max(depth, len(graph.linear_layers()))
    depth = min(max(depth, 1), MAX_DEPTH)
    if s.beta > 0 and math.isfinite(s.beta):
        width = max(1, round(depth / s.beta))
    else:
        widths = [layer.width for layer in graph.linear_layers() if layer.width]
        width = min(widths, default=1)
    return fm2_design(chain, depth, width, thresholds)


@lru_cache(maxsize=256)
def fm2_design(chain: Chain, depth: int, width: int, thresholds: Thresholds) -> FM2Design:
    """The FM2 design answers for ``chain`` at ``depth`` and ``width`` (see :class:`FM2Design`)."""
    depth = min(max(depth, 1), MAX_DEPTH)
    width = min(max(width, 1), MAX_WIDTH)
    bounds = {level: fm2_bound(level, thresholds) for level in LEVELS}
    here = chain.equivalent(width, depth)
    min_width: dict[str, int | None] = {}
    max_depth: dict[str, int] = {}
    closed: dict[str, int] = {}
    for level, bound in bounds.items():
        closed[level] = math.ceil(depth / bound)
        min_width[level] = smallest_int(
            lambda n, b=bound: chain.equivalent(n, depth) <= b, _width_guess(chain, width, depth, here, bound)
        )
        max_depth[level] = _max_depth(chain, width, bound, here / depth)
    return FM2Design(chain, depth, width, here, min_width, max_depth, closed, bounds)


def _width_guess(chain: Chain, width: int, depth: int, here: float, bound: float) -> int:
    """THEORY's equivalent ~ k L / n with k read off the chain (k = 1 + O(1/n) for ReLU),
    refined once at the guess: the search then usually confirms it in two evaluations."""
    if not (here > 0 and math.isfinite(here)):
        return math.ceil(depth / bound)
    guess = min(max(1, math.ceil(here * width / bound)), MAX_WIDTH)
    there = chain.equivalent(guess, depth)
    if there > 0 and math.isfinite(there):
        guess = min(max(1, math.ceil(there * guess / bound)), MAX_WIDTH)
    return guess


def _max_depth(chain: Chain, width: int, bound: float, per_layer: float) -> int:
    """The first depth whose chain fails, less one, scanning propagations of growing depth
    from the closed-form guess bound / per_layer."""
    ok = per_layer > 0 and math.isfinite(per_layer)
    guess = math.floor(min(bound / per_layer, MAX_DEPTH)) + 1 if ok else 64
    depth = min(guess + guess // 4, MAX_DEPTH + 1)
    start = 0
    while True:
        profile = _profile(chain, width, _allocated(depth))
        stop = min(len(profile), MAX_DEPTH + 1)
        failing = np.flatnonzero(~(profile[start:stop] <= bound))  # NaN fails, as in the rule
        if failing.size:
            return start + int(failing[0])  # depths 1..d pass, d + 1 does not
        if stop > MAX_DEPTH:
            return MAX_DEPTH
        start, depth = stop, min(2 * len(profile), MAX_DEPTH + 1)
