"""Layer graphs for architectures that have no file: plain and residual MLPs.

The weight statistics are those of the init law itself (exact std and kurtosis), so the
theory sees the population the weights are drawn from. Used by ``initaudit predict`` and
by the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from initaudit.errors import UsageError
from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.stats import TensorStats

#: A weight law: variance times fan-in as a function of (fan_in, fan_out), and kurtosis.
InitLaw = tuple[Callable[[int, int], float], float]

#: name -> (variance times fan-in as a function of (fan_in, fan_out), kurtosis)
INIT_LAWS: dict[str, InitLaw] = {
    "he": (lambda i, o: 2.0, 3.0),
    "he_normal": (lambda i, o: 2.0, 3.0),
    "he_uniform": (lambda i, o: 2.0, 1.8),
    "he_fan_out": (lambda i, o: 2.0 * i / o, 3.0),
    "xavier": (lambda i, o: 2.0 * i / (i + o), 3.0),
    "xavier_normal": (lambda i, o: 2.0 * i / (i + o), 3.0),
    "xavier_uniform": (lambda i, o: 2.0 * i / (i + o), 1.8),
    "lecun": (lambda i, o: 1.0, 3.0),
    "lecun_normal": (lambda i, o: 1.0, 3.0),
    "lecun_uniform": (lambda i, o: 1.0, 1.8),
    "pytorch": (lambda i, o: 1.0 / 3.0, 1.8),
    "pytorch_default": (lambda i, o: 1.0 / 3.0, 1.8),
}

#: Other spellings of the same laws (PyTorch's and Keras's names).
INIT_ALIASES = {
    "kaiming": "he",
    "kaiming_normal": "he_normal",
    "kaiming_uniform": "he_uniform",
    "kaiming_fan_out": "he_fan_out",
    "glorot": "xavier",
    "glorot_normal": "xavier_normal",
    "glorot_uniform": "xavier_uniform",
    "torch": "pytorch",
    "default": "pytorch",
}

_FIXED_STD = re.compile(r"(?:(normal|uniform)\()?\s*std\s*=\s*([0-9.eE+-]+)\s*\)?")


def init_law(init: str) -> InitLaw:
    """The law called ``init``: a name of :data:`INIT_LAWS` or :data:`INIT_ALIASES` (any case,
    ``-`` for ``_``), or a fixed std whatever the fan-in: ``std=0.02``, ``normal(std=0.02)``,
    ``uniform(std=0.02)``. Unknown names raise a UsageError listing the known ones."""
    key = init.strip().lower().replace("-", "_")
    key = INIT_ALIASES.get(key, key)
    if key in INIT_LAWS:
        return INIT_LAWS[key]
    match = _FIXED_STD.fullmatch(key)
    if match:
        try:
            std = float(match.group(2))
        except ValueError:
            std = -1.0
        if std > 0 and math.isfinite(std):
            kurtosis = 1.8 if match.group(1) == "uniform" else 3.0
            return (lambda i, o, v=std * std: v * i), kurtosis
    known = ", ".join([*INIT_LAWS, *INIT_ALIASES])
    raise UsageError(f"unknown init {init!r}: use one of {known}, or std=S (a fixed std, e.g. std=0.02)")


def law_stats(name: str, shape: tuple[int, ...], std: float, kurtosis: float = 3.0) -> TensorStats:
    """TensorStats of a zero-mean law with the given std and kurtosis."""
    return TensorStats(
        name=name,
        shape=shape,
        dtype="float32",
        count=math.prod(shape),
        mean=0.0,
        std=std,
        second_moment=std * std,
        kurtosis=kurtosis,
        absmax=float("nan"),
        nonfinite=0,
        zeros=0,
    )


class _Builder:
    def __init__(self, input_width: int) -> None:
        self.layers = [Layer("input", Kind.INPUT, "Input", width=input_width)]
        self.width = input_width

    @property
    def last(self) -> str:
        return self.layers[-1].name

    def dense(
        self,
        name: str,
        width: int,
        init: str,
        source: str | None = None,
        bias_std: float = 0.0,
        gain: float = 1.0,
    ) -> str:
        """A dense layer drawn from ``init``, its variance multiplied by ``gain``."""
        fan_in = self.width
        law, kurtosis = init_law(init)
        std = math.sqrt(gain * law(fan_in, width) / fan_in)
        bias = law_stats(f"{name}.bias", (width,), bias_std, 1.8) if bias_std > 0 else None
        self.layers.append(
            Layer(
                name, Kind.DENSE, "MatMul", [source or self.last], width=width, fan_in=fan_in,
                fan_out=width, weight=law_stats(f"{name}.weight", (width, fan_in), std, kurtosis), bias=bias,
            )
        )  # fmt: skip
        self.width = width
        return name

    def act(self, name: str, activation: str, source: str | None = None) -> str:
        self.layers.append(
            Layer(name, Kind.ACTIVATION, activation, [source or self.last], width=self.width,
                  attrs={"activation": activation})
        )  # fmt: skip
        return name

    def norm(self, name: str, norm: str, source: str | None = None) -> str:
        """A fresh normalization (gamma = 1, beta = 0: None stands for that)."""
        op = {"batch": "BatchNormalization", "layer": "LayerNormalization"}.get(norm, "Normalization")
        self.layers.append(
            Layer(name, Kind.NORM, op, [source or self.last], width=self.width,
                  attrs={"norm": norm, "gamma": None, "beta": None, "epsilon": 1e-5})
        )  # fmt: skip
        return name

    def add(self, name: str, a: str, b: str) -> str:
        self.layers.append(Layer(name, Kind.ADD, "Add", [a, b], width=self.width))
        return name

    def scale(self, name: str, value: float) -> str:
        self.layers.append(
            Layer(name, Kind.SCALE, "Mul", [self.last], width=self.width, attrs={"value": value})
        )
        return name

    def block(
        self,
        prefix: str,
        *,
        eta: float = 1.0,
        branch_depth: int = 2,
        terminal: str = "linear",
        init: str = "he",
        activation: str = "relu",
        bias_std: float = 0.0,
        gain: float = 1.0,
        norm: str | None = None,
    ) -> str:
        """One residual block y = y + eta F(y) on the stream ending at the last layer.

        "linear": F = W_m phi(... W_1 phi(y)) (pre-activation); "relu": F = phi(W_m ... phi(W_1 y))
        (activation-terminated). With ``norm``, the branch starts with it (pre-norm).
        """
        stream = src = self.last
        width = self.width
        if norm:
            src = self.norm(f"{prefix}.norm", norm, source=stream)
        for k in range(branch_depth):
            first = src if k == 0 else None
            if terminal == "linear":
                self.act(f"{prefix}.act{k}", activation, source=first)
                self.dense(f"{prefix}.fc{k}", width, init, bias_std=bias_std, gain=gain)
            else:
                self.dense(f"{prefix}.fc{k}", width, init, source=first, bias_std=bias_std, gain=gain)
                self.act(f"{prefix}.act{k}", activation)
        if eta != 1.0:
            self.scale(f"{prefix}.eta", eta)
        return self.add(f"{prefix}.add", stream, self.last)

    def graph(self, source: str) -> LayerGraph:
        return LayerGraph(
            self.layers, inputs=["input"], outputs=[self.last], source=source, format="synthetic"
        )


def plain_mlp(
    input_width: int,
    widths: list[int],
    activation: str = "relu",
    init: str = "he",
    bias_std: float | list[float] = 0.0,
    output: int | None = None,
    output_init: str = "lecun",
    gain: float = 1.0,
    norm: str | None = None,
) -> LayerGraph:
    """input -> [dense -> (norm) -> activation] per hidden width -> optional linear output.

    ``gain`` multiplies every hidden weight's variance (a fix's multiplier, applied)."""
    b = _Builder(input_width)
    for j, width in enumerate(widths, start=1):
        std = bias_std if isinstance(bias_std, int | float) else bias_std[j - 1]
        b.dense(f"fc{j}", width, init, bias_std=std, gain=gain)
        if norm:
            b.norm(f"norm{j}", norm)
        b.act(f"act{j}", activation)
    if output:
        b.dense("out", output, output_init)
    return b.graph(f"mlp {input_width}->{'x'.join(map(str, widths))}")


def residual_mlp(
    width: int,
    blocks: int,
    eta: float = 1.0,
    branch_depth: int = 2,
    terminal: str = "linear",
    init: str = "he",
    activation: str = "relu",
    stem: list[int] | None = None,
    input_width: int | None = None,
    bias_std: float = 0.0,
    gain: float = 1.0,
    norm: str | None = None,
) -> LayerGraph:
    """A stream of ``blocks`` residual blocks y = y + eta F(y) (see :meth:`_Builder.block`).

    With the defaults each branch has gain g = 1. ``stem`` widths come first as plain
    dense -> activation layers; a signal of another width then reaches the stream through a
    linear projection ``embed`` (LeCun, variance 1/fan-in: the scale that keeps the length
    through a linear layer).
    """
    first = input_width or (stem[0] if stem else width)
    b = _Builder(first)
    for j, hidden in enumerate(stem or [], start=1):
        b.dense(f"fc{j}", hidden, init, bias_std=bias_std, gain=gain)
        if norm:
            b.norm(f"norm{j}", norm)
        b.act(f"act{j}", activation)
    if b.width != width:
        b.dense("embed", width, "lecun")
    for i in range(blocks):
        b.block(
            f"b{i}", eta=eta, branch_depth=branch_depth, terminal=terminal, init=init,
            activation=activation, bias_std=bias_std, gain=gain, norm=norm,
        )  # fmt: skip
    head = f"{'x'.join(map(str, stem))}->" if stem else ""
    return b.graph(f"residual mlp {head}{width}x{blocks}")
