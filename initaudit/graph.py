"""The layer graph: the one intermediate representation every frontend produces.

Frontends translate a file into a :class:`LayerGraph`; theory walks it; rules read it.
Nothing here knows a file format or a formula.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from initaudit.stats import TensorStats


class Kind(StrEnum):
    """What a layer does to the signal, at the granularity the theory needs."""

    INPUT = "input"
    DENSE = "dense"  # Gemm, MatMul with a weight (+ Add bias)
    CONV = "conv"
    ACTIVATION = "activation"
    NORM = "norm"  # batch / layer / instance / group normalization
    ADD = "add"  # sum of paths; a residual join when the paths share an ancestor
    SCALE = "scale"  # elementwise multiply by a constant: a branch scale (eta) or LayerScale
    POOL = "pool"
    RESHAPE = "reshape"  # shape-only: Flatten, Reshape, Transpose, Squeeze, Identity, Dropout...
    CONCAT = "concat"
    UNMODELED = "unmodeled"  # an op the theory does not model: treated as pass-through


#: Activations the theory knows, by canonical name (see ``theory.activations``).
ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "prelu",
    "elu",
    "selu",
    "gelu",
    "tanh",
    "sigmoid",
    "softplus",
    "silu",
    "identity",
)


@dataclass
class Layer:
    """One node of the layer graph.

    ``width`` is n_j, the number of units that fluctuate independently: output features
    of a dense layer, channels of a conv (Hanin & Rolnick count channels for CNNs).
    ``attrs`` holds kind-specific facts:

    - ACTIVATION: ``activation`` (a name in :data:`ACTIVATIONS`), ``alpha`` (slope or scale
      parameter where the activation has one).
    - NORM: ``norm`` ("batch", "layer", "instance", "group"), ``gamma``/``beta``
      (:class:`TensorStats` or None), ``epsilon``.
    - SCALE: ``value`` (root mean square of the constant), ``constant`` (its name, if any).
    - POOL: ``mode`` ("max", "avg", "global_avg", "global_max"), ``window`` (elements per
      output unit; None for global pools until the spatial size is known).
    - UNMODELED: ``reason`` (why the op was not modeled).
    """

    name: str
    kind: Kind
    op: str
    inputs: list[str] = field(default_factory=list)
    width: int | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    weight: TensorStats | None = None
    bias: TensorStats | None = None
    shape: tuple[int | None, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_linear(self) -> bool:
        """A layer with a weight matrix: where the weight variance sets the gain."""
        return self.kind in (Kind.DENSE, Kind.CONV)

    @property
    def activation(self) -> str | None:
        return self.attrs.get("activation")


@dataclass
class ResidualBlock:
    """A join ``y = skip + branch`` where both paths leave a common ancestor.

    ``eta`` is the branch scale: the product of the SCALE layers on the branch times the
    ratio of the branch's last weight std to the He std for its fan-in (a scale folded
    into the weight). ``terminal`` is how the branch ends: "linear" (zero-mean output) or
    the name of the activation it ends with.
    """

    add: str
    fork: str
    skip: str
    branch: list[str]
    eta: float
    gate: float
    folded: float
    terminal: str
    last_weight: str | None
    normalized: bool


@dataclass
class LayerGraph:
    """Layers in topological order, with the graph's inputs and outputs."""

    layers: list[Layer]
    inputs: list[str]
    outputs: list[str]
    source: str = ""
    format: str = ""
    notes: list[str] = field(default_factory=list)
    #: Whether BatchNorm looks folded into the convs (no norm nodes, conv biases present).
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}
        if len(self._by_name) != len(self.layers):
            raise ValueError("layer names must be unique")
        self._consumers: dict[str, list[Layer]] = {}
        for layer in self.layers:
            for name in layer.inputs:
                self._consumers.setdefault(name, []).append(layer)
        self._blocks: list[ResidualBlock] | None = None

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> Layer:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def consumers(self, name: str) -> list[Layer]:
        return self._consumers.get(name, [])

    def linear_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.is_linear]

    def ancestors(self, name: str) -> set[str]:
        """Every layer that ``name`` depends on, not counting itself."""
        seen: set[str] = set()
        stack = list(self[name].inputs)
        while stack:
            current = stack.pop()
            if current in seen or current not in self:
                continue
            seen.add(current)
            stack.extend(self[current].inputs)
        return seen

    def next_activation(self, name: str) -> Layer | None:
        """The activation layer that the output of ``name`` meets next, skipping shape-only
        ops and pools. None when the signal reaches a join, a norm or the output first."""
        current = name
        while True:
            nexts = self.consumers(current)
            if len(nexts) != 1:
                return None
            nxt = nexts[0]
            if nxt.kind is Kind.ACTIVATION:
                return nxt
            if nxt.kind not in (Kind.RESHAPE, Kind.POOL):
                return None
            current = nxt.name

    def following_activation(self, name: str) -> str | None:
        """The name of :meth:`next_activation`'s activation: a dense layer feeding a ReLU
        wants 2/fan-in."""
        layer = self.next_activation(name)
        return layer.activation if layer is not None else None

    def residual_blocks(self) -> list[ResidualBlock]:
        from initaudit.residual import find_residual_blocks

        if self._blocks is None:
            self._blocks = find_residual_blocks(self)
        return self._blocks
