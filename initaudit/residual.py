"""Find residual joins in a layer graph: ``y = skip + eta * F(fork)``."""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

from initaudit.graph import Kind, ResidualBlock

if TYPE_CHECKING:
    from initaudit.graph import Layer, LayerGraph

# Layers that pass the branch's scale through unchanged when looking for how it ends.
_TRANSPARENT = (Kind.RESHAPE, Kind.SCALE, Kind.UNMODELED)


def find_residual_blocks(graph: LayerGraph) -> list[ResidualBlock]:
    """Every two-input ADD whose inputs share an ancestor, in graph order.

    The fork is the latest (in graph order) common ancestor of the two inputs, counting
    each input as its own ancestor; each path is what its input reaches that is neither the
    fork nor one of the fork's ancestors."""
    names = [layer.name for layer in graph]
    order = {name: i for i, name in enumerate(names)}
    topological = all(order.get(name, -1) < i for i, layer in enumerate(graph) for name in layer.inputs)
    blocks = []
    for layer in graph:
        if layer.kind is not Kind.ADD or len(layer.inputs) != 2:
            continue
        found = (
            _join(graph, names, order, layer.inputs) if topological else _by_sets(graph, order, layer.inputs)
        )
        if found is None:
            continue
        fork, paths = found
        weights = [sum(graph[n].is_linear for n in path) for path in paths]
        # The branch is the path carrying more weights; ties go to the longer path.
        b = 0 if (weights[0], len(paths[0])) > (weights[1], len(paths[1])) else 1
        branch = paths[b]
        blocks.append(_block(graph, layer, fork, layer.inputs[1 - b], branch))
    return blocks


_LEFT, _RIGHT, _BEFORE_FORK = 1, 2, 4


def _join(
    graph: LayerGraph, names: list[str], order: dict[str, int], inputs: list[str]
) -> tuple[str, list[list[str]]] | None:
    """The fork and the two paths of a join, by walking back from its inputs in reverse graph
    order: near-linear in the size of the block, where ancestor sets cost the whole graph
    per join (quadratic in depth).

    In a topological order every consumer of a layer comes after it, so when the walk pops
    a layer it has seen every route from the inputs to it: its marks (reached from the
    left input, the right one, or the fork) are final. The first layer reached from both
    sides is the latest common ancestor; the walk stops once everything left to visit is
    an ancestor of the fork."""
    marks: dict[str, int] = {}
    heap: list[int] = []
    pending = {_LEFT: 0, _RIGHT: 0, 0: 0}  # queued layers by side, and those not under the fork

    def mark(name: str, bits: int) -> None:
        if name not in order:
            return  # ancestors() skips names the graph does not hold
        old = marks.get(name)
        new = (old or 0) | bits
        if old is None:
            heapq.heappush(heap, -order[name])
        elif old == new:
            return
        for side in (_LEFT, _RIGHT):
            pending[side] += bool(new & side) - bool((old or 0) & side)
        pending[0] += (not new & _BEFORE_FORK) - (old is not None and not old & _BEFORE_FORK)
        marks[name] = new

    for name, side in zip(inputs, (_LEFT, _RIGHT), strict=True):
        if name not in graph:
            raise KeyError(name)  # as ancestors() does
        mark(name, side)
    fork: str | None = None
    paths: list[list[str]] = [[], []]
    while heap:
        if fork is None and not (pending[_LEFT] and pending[_RIGHT]):
            return None  # one side is exhausted: the inputs share no ancestor
        if fork is not None and not pending[0]:
            break
        name = names[-heapq.heappop(heap)]
        bits = marks[name]
        for side in (_LEFT, _RIGHT):
            pending[side] -= bool(bits & side)
        pending[0] -= not bits & _BEFORE_FORK
        if fork is None and bits & _LEFT and bits & _RIGHT:
            fork, bits = name, bits | _BEFORE_FORK
            marks[name] = bits
        if not bits & _BEFORE_FORK:
            for i, side in enumerate((_LEFT, _RIGHT)):
                if bits & side:
                    paths[i].append(name)
        for parent in graph[name].inputs:
            mark(parent, bits)
    if fork is None:
        return None
    return fork, [path[::-1] for path in paths]


def _by_sets(
    graph: LayerGraph, order: dict[str, int], inputs: list[str]
) -> tuple[str, list[list[str]]] | None:
    """:func:`_join` by ancestor sets, for a graph whose layers are not in topological order."""
    reach = [graph.ancestors(name) | {name} for name in inputs]
    common = reach[0] & reach[1]
    if not common:
        return None
    fork = max(common, key=order.__getitem__)
    return fork, [sorted((r - graph.ancestors(fork)) - {fork}, key=order.__getitem__) for r in reach]


def _block(graph: LayerGraph, add: Layer, fork: str, skip: str, branch: list[str]) -> ResidualBlock:
    layers = [graph[name] for name in branch]
    linear = [layer for layer in layers if layer.is_linear]
    last = linear[-1] if linear else None
    # A gate multiplies the branch output: only scales after the last weight count. A scale
    # inside the branch (attention's 1/sqrt(d) before its softmax) is not eta.
    tail = layers[layers.index(last) + 1 :] if last is not None else layers
    gate = math.prod(float(layer.attrs.get("value", 1.0)) for layer in tail if layer.kind is Kind.SCALE)
    folded = 1.0
    if last is not None:
        after_last = layers[layers.index(last) + 1 :]
        norm = next((x for x in after_last if x.kind is Kind.NORM), None)
        if norm is not None:
            folded = _norm_scale(norm)
        elif last.weight is not None and last.fan_in:
            folded = last.weight.rms / math.sqrt(2.0 / last.fan_in)
    return ResidualBlock(
        add=add.name,
        fork=fork,
        skip=skip,
        branch=branch,
        eta=gate * folded,
        gate=gate,
        folded=folded,
        terminal=_terminal(layers),
        last_weight=last.weight.name if last is not None and last.weight is not None else None,
        normalized=any(layer.kind is Kind.NORM for layer in layers),
    )


def _norm_scale(norm: Layer) -> float:
    gamma, beta = norm.attrs.get("gamma"), norm.attrs.get("beta")
    g2 = gamma.second_moment if gamma is not None else 1.0
    b2 = beta.second_moment if beta is not None else 0.0
    return math.sqrt(g2 + b2)


def _terminal(layers: list[Layer]) -> str:
    for layer in reversed(layers):
        if layer.kind in _TRANSPARENT:
            continue
        if layer.kind is Kind.ACTIVATION:
            return str(layer.activation)
        if layer.kind is Kind.NORM:
            return "norm"
        return "linear"
    return "identity"
