"""Find residual joins in a layer graph: ``y = skip + eta * F(fork)``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from initaudit.graph import Kind, ResidualBlock

if TYPE_CHECKING:
    from initaudit.graph import Layer, LayerGraph

# Layers that pass the branch's scale through unchanged when looking for how it ends.
_TRANSPARENT = (Kind.RESHAPE, Kind.SCALE, Kind.UNMODELED)


def find_residual_blocks(graph: LayerGraph) -> list[ResidualBlock]:
    """Every two-input ADD whose inputs share an ancestor, in graph order."""
    order = {layer.name: i for i, layer in enumerate(graph)}
    blocks = []
    for layer in graph:
        if layer.kind is not Kind.ADD or len(layer.inputs) != 2:
            continue
        reach = [graph.ancestors(name) | {name} for name in layer.inputs]
        common = reach[0] & reach[1]
        if not common:
            continue
        fork = max(common, key=order.__getitem__)
        paths = [sorted((r - graph.ancestors(fork)) - {fork}, key=order.__getitem__) for r in reach]
        weights = [sum(graph[n].is_linear for n in path) for path in paths]
        # The branch is the path carrying more weights; ties go to the longer path.
        b = 0 if (weights[0], len(paths[0])) > (weights[1], len(paths[1])) else 1
        branch = paths[b]
        blocks.append(_block(graph, layer, fork, layer.inputs[1 - b], branch))
    return blocks


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
