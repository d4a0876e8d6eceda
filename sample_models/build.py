"""Build the sample ONNX models that initaudit's tests, docs and benchmarks use.

Usage: ``python sample_models/build.py [OUTDIR]`` (default: this file's folder).

Every model is built from ``onnx.helper`` and numpy with a fixed seed, so two runs write
byte-identical files. The expected verdicts and their closed forms are in README.md here.

``sample_models`` is not a package; load this file with
``importlib.util.spec_from_file_location`` (or ``runpy.run_path``) and use :data:`MODELS`
and :func:`build_all`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# opset 17 / IR 8: onnx2torch (the Monte Carlo bridge) converts up to about opset 17.
OPSET = 17
IR_VERSION = 8
PRODUCER = "initaudit-samples"
PRODUCER_VERSION = "1"
BATCH = "batch"


class _Graph:
    """Collects nodes and initializers with PyTorch-export-style names."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def param(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, scope: str, inputs: list[str], **attrs: object) -> str:
        """Add one node; names follow torch.onnx: ``/fc1/MatMul`` -> ``/fc1/MatMul_output_0``."""
        name = f"/{scope}/{op_type}" if scope else f"/{op_type}"
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    # Weight laws. Draw in float64 and cast, so the stream does not depend on dtype support.
    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def uniform(self, shape: tuple[int, ...], bound: float) -> np.ndarray:
        return self.rng.uniform(-bound, bound, shape).astype(np.float32)

    def dense(self, scope: str, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """``MatMul(x, W) + b``, W stored (in, out); scope ``blocks.3/fc2`` -> ``blocks.3.fc2.weight``."""
        prefix = scope.replace("/", ".")
        w = self.param(f"{prefix}.weight", weight)
        b = self.param(f"{prefix}.bias", bias)
        return self.op("Add", scope, [self.op("MatMul", scope, [x, w]), b])

    def model(
        self,
        x: str,
        y: str,
        in_shape: list[int | str],
        out_shape: list[int | str],
        doc: str,
        meta: dict[str, str],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, out_shape)],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version=PRODUCER_VERSION,
            doc_string=doc,
        )
        helper.set_model_props(model, meta)
        return model


def _name_output(g: _Graph) -> str:
    """Rename the last node's output to ``output``, the graph's stable output name."""
    g.nodes[-1].output[0] = "output"
    return "output"


def _he(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


def _lecun(fan_in: int) -> float:
    return math.sqrt(1.0 / fan_in)


def _xavier(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


def _mlp(
    name: str,
    seed: int,
    n_in: int,
    widths: list[int],
    n_out: int,
    activation: str,
    hidden_init: Callable[[_Graph, int, int], tuple[np.ndarray, np.ndarray]],
    out_init: Callable[[_Graph, int, int], tuple[np.ndarray, np.ndarray]],
    doc: str,
    expected: str,
) -> onnx.ModelProto:
    """Plain MLP: ``fc1..fcL`` (MatMul + Add + activation), then a linear ``head``."""
    g = _Graph(name, seed)
    h, fan_in = "input", n_in
    for i, width in enumerate(widths, start=1):
        w, b = hidden_init(g, fan_in, width)
        h = g.dense(f"fc{i}", h, w, b)
        h = g.op(activation, f"act{i}", [h])
        fan_in = width
    w, b = out_init(g, fan_in, n_out)
    g.dense("head", h, w, b)
    y = _name_output(g)
    meta = {"initaudit.expected": expected, "initaudit.seed": str(seed)}
    return g.model("input", y, [BATCH, n_in], [BATCH, n_out], doc, meta)


def _he_zero(g: _Graph, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    return g.normal((fan_in, fan_out), _he(fan_in)), np.zeros(fan_out)


def _lecun_zero(g: _Graph, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    return g.normal((fan_in, fan_out), _lecun(fan_in)), np.zeros(fan_out)


def _xavier_zero(g: _Graph, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    return g.normal((fan_in, fan_out), _xavier(fan_in, fan_out)), np.zeros(fan_out)


def _torch_default(g: _Graph, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt 5) gives bound 1/sqrt(fan_in) for the
    # weight (variance 1/(3 fan_in)); the bias uses the same bound.
    bound = 1.0 / math.sqrt(fan_in)
    return g.uniform((fan_in, fan_out), bound), g.uniform((fan_out,), bound)


def wide_he_mlp() -> onnx.ModelProto:
    return _mlp(
        "wide_he_mlp",
        1001,
        64,
        [256] * 8,
        10,
        "Relu",
        _he_zero,
        _lecun_zero,
        "MLP 64 -> 8 x 256 ReLU -> 10; He normal hidden weights, LeCun normal head, zero biases.",
        "pass",
    )


def deep_xavier_mlp() -> onnx.ModelProto:
    return _mlp(
        "deep_xavier_mlp",
        1002,
        128,
        [128] * 20,
        10,
        "Relu",
        _xavier_zero,
        _lecun_zero,
        "MLP 128 -> 20 x 128 ReLU -> 10; Xavier normal hidden weights (variance 1/128), "
        "LeCun normal head, zero biases.",
        "FM1 vanishing",
    )


def deep_pytorch_default_mlp() -> onnx.ModelProto:
    return _mlp(
        "deep_pytorch_default_mlp",
        1003,
        128,
        [128] * 12,
        10,
        "Relu",
        _torch_default,
        _torch_default,
        "MLP 128 -> 12 x 128 ReLU -> 10; PyTorch's default nn.Linear init: weight and bias "
        "uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).",
        "FM1 vanishing",
    )


def deep_narrow_he_mlp() -> onnx.ModelProto:
    return _mlp(
        "deep_narrow_he_mlp",
        1004,
        16,
        [16] * 50,
        10,
        "Relu",
        _he_zero,
        _lecun_zero,
        "MLP 16 -> 50 x 16 ReLU -> 10; He normal hidden weights, LeCun normal head, zero biases.",
        "FM2",
    )


def deep_tanh_xavier_mlp() -> onnx.ModelProto:
    return _mlp(
        "deep_tanh_xavier_mlp",
        1008,
        128,
        [128] * 30,
        10,
        "Tanh",
        _xavier_zero,
        _lecun_zero,
        "MLP 128 -> 30 x 128 Tanh -> 10; Xavier normal hidden weights (variance 1/128), "
        "LeCun normal head, zero biases.",
        # Mean field from unit-variance input gives E[M_30]/M_0 ~ 0.017: slow (algebraic) decay.
        "FM1 vanishing (algebraic; input-scale dependent)",
    )


def _residual_mlp(name: str, seed: int, eta: float | None, doc: str, expected: str) -> onnx.ModelProto:
    """Linear stem, 50 pre-activation blocks ``y + eta * W2 relu(W1 relu(y))``, linear head."""
    n, depth, n_out = 64, 50, 10
    g = _Graph(name, seed)
    # LeCun, not He: the stem feeds the linear skip stream, not a ReLU, so variance 1/fan_in keeps
    # the stream's length equal to the input's and E[M_L]/M_0 is the blocks' product alone.
    y = g.dense("stem", "input", *_lecun_zero(g, n, n))
    for i in range(depth):
        s = f"blocks.{i}"
        f = g.op("Relu", f"{s}/relu1", [y])
        f = g.dense(f"{s}/fc1", f, *_he_zero(g, n, n))
        f = g.op("Relu", f"{s}/relu2", [f])
        f = g.dense(f"{s}/fc2", f, *_he_zero(g, n, n))
        if eta is not None:
            f = g.op("Mul", s, [f, g.param(f"{s}.eta", np.array(eta))])
        y = g.op("Add", s, [y, f])
    g.dense("head", y, *_lecun_zero(g, n, n_out))
    y = _name_output(g)
    meta = {"initaudit.expected": expected, "initaudit.seed": str(seed)}
    return g.model("input", y, [BATCH, n], [BATCH, n_out], doc, meta)


def residual_mlp_unscaled() -> onnx.ModelProto:
    return _residual_mlp(
        "residual_mlp_unscaled",
        1005,
        None,
        "Residual MLP, width 64: LeCun stem, 50 blocks y = y + W2 relu(W1 relu(y)) (He normal, zero "
        "biases), LeCun head.",
        "FM1 exploding",
    )


def residual_mlp_scaled() -> onnx.ModelProto:
    return _residual_mlp(
        "residual_mlp_scaled",
        1006,
        1.0 / math.sqrt(50),
        "Residual MLP, width 64: LeCun stem, 50 blocks y = y + eta * W2 relu(W1 relu(y)) with "
        "eta = 1/sqrt(50) (He normal, zero biases), LeCun head.",
        "pass",
    )


def small_he_cnn_bn() -> onnx.ModelProto:
    """Three He-initialized 3x3 convs with fresh BatchNorm, global pooling and a Gemm head."""
    g = _Graph("small_he_cnn_bn", 1007)
    h, c_in = "input", 3
    for i, c_out in enumerate([16, 32, 32], start=1):
        fan_in = c_in * 9
        w = g.param(f"conv{i}.weight", g.normal((c_out, c_in, 3, 3), _he(fan_in)))
        h = g.op("Conv", f"conv{i}", [h, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        bn = [
            g.param(f"bn{i}.weight", np.ones(c_out)),
            g.param(f"bn{i}.bias", np.zeros(c_out)),
            g.param(f"bn{i}.running_mean", np.zeros(c_out)),
            g.param(f"bn{i}.running_var", np.ones(c_out)),
        ]
        # momentum 0.9 is torch's 0.1 as ONNX defines it; irrelevant at inference.
        h = g.op("BatchNormalization", f"bn{i}", [h, *bn], epsilon=1e-5, momentum=0.9)
        h = g.op("Relu", f"relu{i}", [h])
        if i == 2:
            h = g.op("MaxPool", "pool", [h], kernel_shape=[2, 2], strides=[2, 2])
        c_in = c_out
    h = g.op("GlobalAveragePool", "gap", [h])
    h = g.op("Flatten", "flatten", [h], axis=1)
    w = g.param("fc.weight", g.normal((10, c_in), _lecun(c_in)))
    b = g.param("fc.bias", np.zeros(10))
    g.op("Gemm", "fc", [h, w, b], alpha=1.0, beta=1.0, transB=1)
    y = _name_output(g)
    doc = (
        "CNN on 3x32x32: 3 x (Conv 3x3 pad 1, no bias, He normal + BatchNorm(gamma 1, beta 0, "
        "mean 0, var 1) + ReLU) with 16, 32, 32 channels, MaxPool 2x2 after the second, "
        "GlobalAveragePool, Flatten, Gemm(transB=1) 32 -> 10."
    )
    meta = {"initaudit.expected": "pass", "initaudit.seed": "1007"}
    return g.model("input", y, [BATCH, 3, 32, 32], [BATCH, 10], doc, meta)


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "wide_he_mlp": wide_he_mlp,
    "deep_xavier_mlp": deep_xavier_mlp,
    "deep_pytorch_default_mlp": deep_pytorch_default_mlp,
    "deep_narrow_he_mlp": deep_narrow_he_mlp,
    "residual_mlp_unscaled": residual_mlp_unscaled,
    "residual_mlp_scaled": residual_mlp_scaled,
    "small_he_cnn_bn": small_he_cnn_bn,
    "deep_tanh_xavier_mlp": deep_tanh_xavier_mlp,
}


def build_all(outdir: str | Path | None = None) -> list[Path]:
    """Write every model in :data:`MODELS` to ``outdir`` as ``<name>.onnx``, checked."""
    out = Path(outdir) if outdir is not None else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, builder in MODELS.items():
        model = builder()
        onnx.checker.check_model(model, full_check=True)
        path = out / f"{name}.onnx"
        path.write_bytes(model.SerializeToString())
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in {"-h", "--help"}):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    for path in build_all(args[0] if args else None):
        print(f"{path}  {path.stat().st_size:>9,d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
