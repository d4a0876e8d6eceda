"""Layer graphs for architectures that have no file: plain and residual MLPs.

The weight statistics are those of the init law itself (exact std and kurtosis), so the
theory sees the population the weights are drawn from. Used by ``initaudit predict`` and
by the tests.
"""

from __future__ import annotations

import math

from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.stats import TensorStats

#: name -> (variance times fan-in as a function of (fan_in, fan_out), kurtosis)
INIT_LAWS = {
    "he": (lambda i, o: 2.0, 3.0),
    "he_normal": (lambda i, o: 2.0, 3.0),
    "he_uniform": (lambda i, o: 2.0, 1.8),
    "xavier": (lambda i, o: 2.0 * i / (i + o), 3.0),
    "xavier_normal": (lambda i, o: 2.0 * i / (i + o), 3.0),
    "xavier_uniform": (lambda i, o: 2.0 * i / (i + o), 1.8),
    "lecun": (lambda i, o: 1.0, 3.0),
    "pytorch": (lambda i, o: 1.0 / 3.0, 1.8),
    "pytorch_default": (lambda i, o: 1.0 / 3.0, 1.8),
}


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
        self, name: str, width: int, init: str, source: str | None = None, bias_std: float = 0.0
    ) -> str:
        fan_in = self.width
        gain, kurtosis = INIT_LAWS[init]
        std = math.sqrt(gain(fan_in, width) / fan_in)
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

    def add(self, name: str, a: str, b: str) -> str:
        self.layers.append(Layer(name, Kind.ADD, "Add", [a, b], width=self.width))
        return name

    def scale(self, name: str, value: float) -> str:
        self.layers.append(
            Layer(name, Kind.SCALE, "Mul", [self.last], width=self.width, attrs={"value": value})
        )
        return name

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
) -> LayerGraph:
    """input -> [dense -> activation] per hidden width -> optional linear output."""
    b = _Builder(input_width)
    for j, width in enumerate(widths, start=1):
        std = bias_std if isinstance(bias_std, int | float) else bias_std[j - 1]
        b.dense(f"fc{j}", width, init, bias_std=std)
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
) -> LayerGraph:
    """A stream of ``blocks`` residual blocks y = y + eta F(y).

    "linear": F = W_m relu(... W_1 relu(y)) (pre-activation, gain g = 1);
    "relu":   F = relu(W_m ... relu(W_1 y)) (ReLU-terminated, gain g = 1).
    """
    b = _Builder(width)
    stream = b.last
    for i in range(blocks):
        src = stream
        for k in range(branch_depth):
            if terminal == "linear":
                b.act(f"b{i}.act{k}", "relu", source=src if k == 0 else None)
                b.dense(f"b{i}.fc{k}", width, init)
            else:
                b.dense(f"b{i}.fc{k}", width, init, source=src if k == 0 else None)
                b.act(f"b{i}.act{k}", "relu")
        if eta != 1.0:
            b.scale(f"b{i}.eta", eta)
        stream = b.add(f"b{i}.add", stream, b.last)
    return b.graph(f"residual mlp {width}x{blocks}")
