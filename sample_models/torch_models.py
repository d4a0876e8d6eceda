"""PyTorch twins of the ONNX samples in ``build.py``: the same functions, the same parameter names.

Each factory (``wide_he_mlp``, ``residual_mlp_scaled``, ...; one per name in ``build.MODELS``)
takes no arguments and returns the architecture in eval mode with PyTorch's default init, as a
user's ``--model pkg.module:factory`` would; load a state dict into it to get a sample:

    initaudit check weights.pt --model sample_models.torch_models:wide_he_mlp

Module attributes are named so that the state-dict keys are the ONNX initializer names
(``fc1.weight``, ``blocks.3.fc2.weight``, ``blocks.3.eta``, ``bn1.running_var``): the ONNX files
are what ``torch.onnx.export`` would write for these modules, up to layout (``MatMul`` weights
are stored (in, out), ``nn.Linear`` keeps (out, in)). :func:`load_onnx_weights` copies an ONNX
sample's initializers into a module, transposing where the graph says so, and
:func:`sample_module` returns a factory's module holding a sample's weights.

Run from the repository root (or with it on ``sys.path``): ``sample_models`` is a namespace
package, so ``sample_models.torch_models`` imports without an ``__init__.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

HERE = Path(__file__).resolve().parent


def _mlp(n_in: int, widths: list[int], n_out: int, activation: type[nn.Module]) -> nn.Sequential:
    """``fc1, act1, ..., fcL, actL, head``: the ONNX ``_mlp`` graph, named as its scopes."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = n_in
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width)
        layers[f"act{i}"] = activation()
        fan_in = width
    layers["head"] = nn.Linear(fan_in, n_out)
    return nn.Sequential(layers).eval()


class ResidualBlock(nn.Module):
    """Pre-activation block ``y + fc2(relu(fc1(relu(y))))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(width, width)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.fc2(self.relu2(self.fc1(self.relu1(y))))


class ScaledResidualBlock(ResidualBlock):
    """``y + eta * F(y)`` with ``eta`` a float32 scalar buffer, the ONNX ``Mul(F, blocks.i.eta)``."""

    def __init__(self, width: int, eta: float) -> None:
        super().__init__(width)
        # A buffer, not a Python float: it is in the state dict (as in the ONNX initializers),
        # and a float32 tensor multiplies exactly as the ONNX Mul does.
        self.register_buffer("eta", torch.tensor(eta, dtype=torch.float32))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.fc2(self.relu2(self.fc1(self.relu1(y)))) * self.eta


class ResidualMLP(nn.Module):
    """Linear ``stem``, ``blocks.0..depth-1``, linear ``head``."""

    def __init__(self, width: int = 64, depth: int = 50, n_out: int = 10, eta: float | None = None) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        blocks = [
            ResidualBlock(width) if eta is None else ScaledResidualBlock(width, eta) for _ in range(depth)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for block in self.blocks:
            y = block(y)
        return self.head(y)


def wide_he_mlp() -> nn.Module:
    return _mlp(64, [256] * 8, 10, nn.ReLU)


def deep_xavier_mlp() -> nn.Module:
    return _mlp(128, [128] * 20, 10, nn.ReLU)


def deep_pytorch_default_mlp() -> nn.Module:
    return _mlp(128, [128] * 12, 10, nn.ReLU)


def deep_narrow_he_mlp() -> nn.Module:
    return _mlp(16, [16] * 50, 10, nn.ReLU)


def deep_tanh_xavier_mlp() -> nn.Module:
    return _mlp(128, [128] * 30, 10, nn.Tanh)


def residual_mlp_unscaled() -> nn.Module:
    return ResidualMLP().eval()


def residual_mlp_scaled() -> nn.Module:
    return ResidualMLP(eta=1.0 / math.sqrt(50)).eval()


def small_he_cnn_bn() -> nn.Module:
    """3 x (conv 3x3 pad 1 no bias, BatchNorm eps 1e-5, ReLU), max pool after the 2nd, GAP, fc."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3
    for i, c_out in enumerate([16, 32, 32], start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(c_out, eps=1e-5)
        layers[f"relu{i}"] = nn.ReLU()
        if i == 2:
            layers["pool"] = nn.MaxPool2d(2, 2)
        c_in = c_out
    # torch.onnx exports AdaptiveAvgPool2d(1) as GlobalAveragePool and Flatten(1) as Flatten(axis=1).
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten(1)
    layers["fc"] = nn.Linear(c_in, 10)
    return nn.Sequential(layers).eval()


#: Factory per sample, keyed like ``build.MODELS``.
FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "wide_he_mlp": wide_he_mlp,
    "deep_xavier_mlp": deep_xavier_mlp,
    "deep_pytorch_default_mlp": deep_pytorch_default_mlp,
    "deep_narrow_he_mlp": deep_narrow_he_mlp,
    "residual_mlp_unscaled": residual_mlp_unscaled,
    "residual_mlp_scaled": residual_mlp_scaled,
    "small_he_cnn_bn": small_he_cnn_bn,
    "deep_tanh_xavier_mlp": deep_tanh_xavier_mlp,
}

#: Each sample's input shape with batch 1 (the ONNX files leave the batch symbolic).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "wide_he_mlp": (1, 64),
    "deep_xavier_mlp": (1, 128),
    "deep_pytorch_default_mlp": (1, 128),
    "deep_narrow_he_mlp": (1, 16),
    "residual_mlp_unscaled": (1, 64),
    "residual_mlp_scaled": (1, 64),
    "small_he_cnn_bn": (1, 3, 32, 32),
    "deep_tanh_xavier_mlp": (1, 128),
}

# Buffers that ONNX has no counterpart for: they do not take part in inference.
_TORCH_ONLY = ("num_batches_tracked",)


def onnx_state_dict(model: onnx.ModelProto | str | Path) -> dict[str, np.ndarray]:
    """The ONNX initializers in PyTorch layout, keyed by name.

    A weight that is ``MatMul``'s right operand or a ``Gemm`` B without ``transB`` is stored
    (in, out) and is transposed to ``nn.Linear``'s (out, in); ``Gemm``'s ``alpha``/``beta``
    are folded into its weight and bias. The layout comes from the consuming node, never from
    the shape: a square matrix looks the same either way.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    transpose: set[str] = set()
    scale: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in arrays:
            transpose.add(node.input[1])
        elif node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                raise ValueError(f"{node.name}: Gemm with transA=1 has no nn.Linear form")
            if node.input[1] in arrays and not attrs.get("transB", 0):
                transpose.add(node.input[1])
            scale[node.input[1]] = float(attrs.get("alpha", 1.0))
            if len(node.input) > 2 and node.input[2]:
                scale[node.input[2]] = float(attrs.get("beta", 1.0))
    out = {}
    for name, array in arrays.items():
        if name in transpose:
            array = array.T
        if scale.get(name, 1.0) != 1.0:
            array = array * np.float32(scale[name])
        # np.ascontiguousarray would turn a 0-d eta into shape (1,).
        out[name] = np.array(array, order="C")
    return out


def load_onnx_weights(module: nn.Module, model: onnx.ModelProto | str | Path) -> nn.Module:
    """Copy an ONNX sample's initializers into ``module`` (in place; returned for chaining).

    Strict both ways: every initializer must name a state-dict entry of the same shape, and
    every entry but BatchNorm's step counter must be covered, so a mismatch cannot pass silently.
    """
    arrays = onnx_state_dict(model)
    state = module.state_dict()
    unknown = sorted(set(arrays) - set(state))
    missing = sorted(k for k in set(state) - set(arrays) if not k.endswith(_TORCH_ONLY))
    if unknown or missing:
        raise ValueError(f"ONNX initializers and state dict differ: unknown {unknown}, missing {missing}")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(state[name].shape):
            raise ValueError(
                f"{name}: ONNX shape {array.shape} (torch layout), module {tuple(state[name].shape)}"
            )
        state[name] = torch.from_numpy(array).to(state[name].dtype)
    module.load_state_dict(state, strict=True)
    return module


def sample_module(name: str, onnx_path: str | Path | None = None) -> nn.Module:
    """The factory's module for sample ``name`` holding the weights of ``onnx_path``
    (default: the committed ``sample_models/<name>.onnx``)."""
    module = FACTORIES[name]()
    return load_onnx_weights(module, onnx_path if onnx_path is not None else HERE / f"{name}.onnx")
