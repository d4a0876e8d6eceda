"""An ``nn.Module`` (or an ExportedProgram, or a TorchScript module) as a LayerGraph.

Three tracers, tried in order, each turning the module into a list of calls in one
canonical vocabulary (ATen op names with arguments by parameter name):

1. ``torch.export`` (non-strict): an ATen graph with every op, parameters named by their
   state-dict keys through the graph signature. The best picture; the default.
2. ``torch.fx`` symbolic tracing: works on modules export rejects; ``nn`` leaf modules
   appear as calls and are translated to their functional form.
3. forward hooks on leaf modules: always runs, but sees only modules, so functional ops
   between them (residual adds, ``F.relu``) are invisible; the graph is the execution order.

One interpreter (:class:`_Builder`) then walks the calls with one handler per op, as the
ONNX frontend does per ONNX op; both produce the same layer kinds and attributes. Layers
with weights are named by their state-dict prefix (``layer3.1.conv2``) and their weight
statistics by the full key (``layer3.1.conv2.weight``), so findings point at tensors a fix
can write back.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from initaudit.errors import LoadError, UsageError
from initaudit.frontends.shapes import feature_width
from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.stats import TensorStats, tensor_stats

if TYPE_CHECKING:
    from torch import fx, nn

EXTRACTORS = ("torch.export", "torch.fx", "forward hooks")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class _Sig:
    """A value that carries the signal: the output of layer ``name``."""

    name: str


@dataclass(frozen=True)
class _Param:
    """A parameter, buffer or constant tensor, by its state-dict key."""

    key: str
    tensor: Any  # torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)

    @property
    def count(self) -> int:
        return int(self.tensor.numel())

    def rms(self) -> float:
        t = self.tensor.detach().double()
        return float(t.pow(2).mean().sqrt()) if t.numel() else math.nan


class _Opaque:
    """A computed value that does not carry the signal (a mask, a position index)."""


_OPAQUE = _Opaque()


@dataclass
class _Call:
    """One op in canonical form, whichever tracer produced it."""

    name: str  # the layer name it will get
    op: str  # canonical op name: "linear", "conv2d", "relu", "add", ...
    label: str  # what the report shows as the layer's op
    kwargs: dict[str, Any]  # arguments by parameter name
    shape: tuple[int | None, ...] | None = None
    signals: list[str] = field(default_factory=list)  # producer layer names, in argument order

    def arg(self, key: str, default: Any = None) -> Any:
        value = self.kwargs.get(key, default)
        return default if value is None else value

    def param(self, key: str) -> _Param | None:
        value = self.kwargs.get(key)
        return value if isinstance(value, _Param) else None

    def first_param(self) -> _Param | None:
        return next((v for v in self.kwargs.values() if isinstance(v, _Param)), None)

    def number(self, key: str) -> float | None:
        """A python scalar argument, or the rms of a parameter one."""
        value = self.kwargs.get(key)
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int | float):
            return abs(float(value))
        if isinstance(value, _Param):
            return value.rms()
        return None


def _flatten(value: Any) -> Iterable[Any]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def _signals(kwargs: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for value in _flatten(list(kwargs.values())):
        if isinstance(value, _Sig) and value.name not in names:
            names.append(value.name)
    return names


# --------------------------------------------------------------------------- the interpreter


Handler = Callable[["_Builder", _Call], Layer]


class _Builder:
    """Turns canonical calls into layers, one handler per op."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.by_name: dict[str, Layer] = {}
        self.notes: list[str] = []
        self.inputs: list[str] = []
        self._stats: dict[str, TensorStats] = {}
        self.node_of: dict[str, str] = {}  # layer name -> the fx node whose output it is
        self.program: Any = None  # the ExportedProgram traced, for Monte Carlo to run
        self._taken: dict[str, int] = {}

    def unique(self, name: str) -> str:
        """``name``, or ``name#2`` when a module is called more than once."""
        count = self._taken.get(name, 0) + 1
        self._taken[name] = count
        return name if count == 1 else f"{name}#{count}"

    def stats(self, p: _Param | None) -> TensorStats | None:
        if p is None:
            return None
        if p.key not in self._stats:
            import torch

            t = p.tensor.detach()
            if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
                t = t.float()
            self._stats[p.key] = tensor_stats(p.key, t.cpu().numpy())
        return self._stats[p.key]

    def width_of(self, name: str) -> int | None:
        layer = self.by_name.get(name)
        return layer.width if layer is not None else None

    def add_input(
        self, name: str, shape: tuple[int | None, ...] | None, op: str = "Input", **attrs: Any
    ) -> _Sig:
        name = self.unique(name)
        width = attrs.pop("width", None) or feature_width(shape, None, rank3="last")
        self.emit(Layer(name, Kind.INPUT, op, width=width, shape=shape, attrs=attrs))
        self.inputs.append(name)
        return _Sig(name)

    def add_source(self, layer: Layer) -> _Sig:
        """A layer where a signal starts without a float input (an embedding lookup)."""
        self.inputs.append(layer.name)
        return self.emit(layer)

    def emit(self, layer: Layer) -> _Sig:
        self.layers.append(layer)
        self.by_name[layer.name] = layer
        return _Sig(layer.name)

    def run(self, call: _Call) -> _Sig:
        handler = HANDLERS.get(call.op, _unmodeled)
        try:
            layer = handler(self, call)
        except Exception as exc:
            # A valid model must never crash the audit: say what was not understood.
            reason = f"{call.label} could not be read ({type(exc).__name__}: {exc}); treated as pass-through"
            layer = _unmodeled(self, call, reason[:240])
        return self.emit(layer)

    def passthrough(self, c: _Call, kind: Kind, attrs: dict[str, Any], *, keep_width: bool = True) -> Layer:
        hint = next((w for name in c.signals if (w := self.width_of(name)) is not None), None)
        width = hint if keep_width and hint is not None else feature_width(c.shape, hint)
        return Layer(c.name, kind, c.label, inputs=list(c.signals), width=width, shape=c.shape, attrs=attrs)

    def graph(self, outputs: list[str], source: str, fmt: str, meta: dict[str, Any]) -> LayerGraph:
        kinds = {layer.kind for layer in self.layers}
        convs = [layer for layer in self.layers if layer.kind is Kind.CONV]
        meta.setdefault("bn_folded", bool(convs) and Kind.NORM not in kinds and any(c.bias for c in convs))
        meta["tensor_stats"] = dict(self._stats)
        # Private (never serialized): what Monte Carlo needs to run the same graph.
        meta["_program"] = self.program
        meta["_nodes"] = dict(self.node_of)
        return LayerGraph(
            layers=self.layers,
            inputs=self.inputs,
            outputs=outputs,
            source=source,
            format=fmt,
            notes=self.notes,
            meta=meta,
        )


# --------------------------------------------------------------------------- handlers


def _unmodeled(b: _Builder, c: _Call, reason: str | None = None) -> Layer:
    reason = reason or f"{c.label} is not modeled; treated as pass-through"
    return b.passthrough(c, Kind.UNMODELED, {"reason": reason}, keep_width=False)


def _reshape(b: _Builder, c: _Call) -> Layer:
    return b.passthrough(c, Kind.RESHAPE, {}, keep_width=False)


def _dense(
    b: _Builder, c: _Call, w: _Param, fan_in: int, width: int, bias: _Param | None, **attrs: Any
) -> Layer:
    return Layer(
        name=c.name,
        kind=Kind.DENSE,
        op=c.label,
        inputs=list(c.signals),
        width=width,
        fan_in=fan_in,
        fan_out=width,
        weight=b.stats(w),
        bias=b.stats(bias),
        shape=c.shape,
        attrs=attrs,
    )


def _linear(b: _Builder, c: _Call) -> Layer:
    w = c.param("weight")
    if w is None or len(w.shape) != 2:
        return _unmodeled(
            b, c, f"{c.label} without a parameter weight is not modeled; treated as pass-through"
        )
    # nn.Linear stores (out, in): the ONNX Gemm transB=1 layout.
    return _dense(b, c, w, w.shape[1], w.shape[0], c.param("bias"), weight_scale=1.0, transposed=True)


def _matmul(b: _Builder, c: _Call) -> Layer:
    """x @ W (and addmm(bias, x, W), GPT-2's Conv1D): W stored (in, out)."""
    if c.op == "addmm":  # addmm(input=bias, mat1=x, mat2=W)
        left, right, bias = c.kwargs.get("mat1"), c.kwargs.get("mat2"), c.param("input")
    else:
        left, right, bias = c.kwargs.get("input"), c.kwargs.get("other", c.kwargs.get("mat2")), None
    if isinstance(left, _Sig) and isinstance(right, _Param) and len(right.shape) >= 1:
        fan_in, width = (right.shape[0], 1) if len(right.shape) == 1 else right.shape[-2:]
        return _dense(b, c, right, fan_in, width, bias, weight_scale=1.0, transposed=False)
    if isinstance(right, _Sig) and isinstance(left, _Param) and len(left.shape) >= 1:
        width, fan_in = (1, left.shape[0]) if len(left.shape) == 1 else left.shape[-2:]
        return _dense(b, c, left, fan_in, width, bias, weight_scale=1.0, transposed=True)
    return _unmodeled(
        b,
        c,
        f"{c.label} of two signals (attention or a dynamic weight) is not modeled; treated as pass-through",
    )


def _conv(b: _Builder, c: _Call) -> Layer:
    w = c.param("weight")
    if w is None or len(w.shape) < 3:
        return _unmodeled(
            b, c, f"{c.label} without a parameter weight is not modeled; treated as pass-through"
        )
    if c.arg("transposed", False):
        return _unmodeled(b, c, "transposed convolution is not modeled yet; treated as pass-through")
    spatial = len(w.shape) - 2
    receptive = math.prod(w.shape[2:])

    def per_dim(key: str, default: int) -> list[int]:
        value = c.arg(key, default)
        return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * spatial

    attrs: dict[str, Any] = {
        "group": int(c.arg("groups", 1)),
        "kernel_shape": list(w.shape[2:]),
        "strides": per_dim("stride", 1),
        "dilations": per_dim("dilation", 1),
    }
    padding = c.arg("padding", 0)
    attrs["pads" if not isinstance(padding, str) else "auto_pad"] = (
        padding if isinstance(padding, str) else per_dim("padding", 0) * 2
    )
    return Layer(
        name=c.name,
        kind=Kind.CONV,
        op=c.label,
        inputs=list(c.signals),
        width=w.shape[0],
        fan_in=w.shape[1] * receptive,
        fan_out=w.shape[0] * receptive,
        weight=b.stats(w),
        bias=b.stats(c.param("bias")),
        shape=c.shape,
        attrs=attrs,
    )


def _activation(name: str, **params: tuple[str, float]) -> Handler:
    """An elementwise activation; ``params`` maps our attribute to (argument name, default)."""

    def handler(b: _Builder, c: _Call) -> Layer:
        attrs: dict[str, Any] = {"activation": name}
        for attr, (key, default) in params.items():
            value = c.number(key)
            attrs[attr] = float(default if value is None else value)
        return b.passthrough(c, Kind.ACTIVATION, attrs)

    return handler


def _gelu(b: _Builder, c: _Call) -> Layer:
    return b.passthrough(
        c, Kind.ACTIVATION, {"activation": "gelu", "approximate": str(c.arg("approximate", "none"))}
    )


def _prelu(b: _Builder, c: _Call) -> Layer:
    slope = c.param("weight")
    if slope is None:
        return _unmodeled(b, c, "prelu with a computed slope is not modeled; treated as pass-through")
    return b.passthrough(
        c, Kind.ACTIVATION, {"activation": "prelu", "alpha": slope.rms(), "slope": b.stats(slope)}
    )


def _hardtanh(b: _Builder, c: _Call) -> Layer:
    # ReLU6 is hardtanh(0, 6): at init the pre-activations rarely reach the upper bound.
    lo, hi = c.arg("min_val", -1.0), c.arg("max_val", 1.0)
    if lo == 0.0 and hi >= 1.0:
        return b.passthrough(c, Kind.ACTIVATION, {"activation": "relu", "max": float(hi)})
    return _unmodeled(b, c, "hardtanh is not modeled (only hardtanh(0, >=1), ReLU6, is read as ReLU)")


def _softplus(b: _Builder, c: _Call) -> Layer:
    if c.arg("beta", 1.0) != 1.0:
        return _unmodeled(b, c, "softplus with beta != 1 is not modeled; treated as pass-through")
    return b.passthrough(c, Kind.ACTIVATION, {"activation": "softplus"})


def _add(b: _Builder, c: _Call) -> Layer:
    if len(c.signals) >= 2:
        alpha = c.arg("alpha", 1)
        if alpha != 1:
            return _unmodeled(b, c, f"add with alpha={alpha} is not modeled; treated as pass-through")
        return b.passthrough(c, Kind.ADD, {})
    layer = _unmodeled(b, c, f"{c.label} adds a constant; treated as pass-through")
    constant = c.first_param()
    if constant is not None:
        layer.attrs["constant"] = constant.key
    return layer


def _mul(b: _Builder, c: _Call) -> Layer:
    if len(c.signals) >= 2:
        return _unmodeled(b, c, f"{c.label} of two signals (gating) is not modeled; treated as pass-through")
    factor = next(
        (k for k, v in c.kwargs.items() if not isinstance(v, _Sig) and k in ("input", "other")), None
    )
    value = c.number(factor) if factor else None
    if value is None:
        return _unmodeled(b, c, f"{c.label} by a constant of unknown value; treated as pass-through")
    constant = c.param(factor)  # type: ignore[arg-type]
    return b.passthrough(c, Kind.SCALE, {"value": value, "constant": constant.key if constant else None})


def _div(b: _Builder, c: _Call) -> Layer:
    if not isinstance(c.kwargs.get("input"), _Sig) or len(c.signals) != 1:
        return _unmodeled(b, c, f"{c.label} by a signal is not modeled; treated as pass-through")
    if c.arg("rounding_mode") is not None:
        return _unmodeled(b, c, f"{c.label} with rounding is not modeled; treated as pass-through")
    divisor = c.kwargs.get("other")
    if isinstance(divisor, _Param):
        t = divisor.tensor.detach().double()
        value = float(t.pow(-2).mean().sqrt()) if t.numel() and bool((t != 0).all()) else math.nan
    else:
        value = 1.0 / abs(float(divisor)) if isinstance(divisor, int | float) and divisor else math.nan
    if not math.isfinite(value):
        return _unmodeled(b, c, f"{c.label} by a constant of unknown or zero value; treated as pass-through")
    return b.passthrough(c, Kind.SCALE, {"value": value, "constant": getattr(divisor, "key", None)})


def _norm(norm: str, gamma: str = "weight", beta: str | None = "bias") -> Handler:
    def handler(b: _Builder, c: _Call) -> Layer:
        attrs: dict[str, Any] = {
            "norm": norm,
            "gamma": b.stats(c.param(gamma)),
            "beta": b.stats(c.param(beta)) if beta else None,
            "epsilon": float(c.arg("eps", 1e-5)),
        }
        if norm == "batch":
            attrs["momentum"] = float(c.arg("momentum", 0.1))
            attrs["running_mean"] = b.stats(c.param("running_mean"))
            attrs["running_var"] = b.stats(c.param("running_var"))
        if norm == "group":
            attrs["num_groups"] = int(c.arg("num_groups", 1))
        layer = b.passthrough(c, Kind.NORM, attrs)
        g = c.param(gamma)
        if norm == "batch" and g is not None:
            layer.width = g.count
        return layer

    return handler


def _spatial(shape: tuple[int | None, ...] | None) -> list[int | None]:
    return list(shape[2:]) if shape is not None and len(shape) > 2 else []


def _pool(mode: str) -> Handler:
    def handler(b: _Builder, c: _Call) -> Layer:
        kernel = c.arg("kernel_size", [])
        kernel = [int(k) for k in kernel] if isinstance(kernel, list | tuple) else [int(kernel)]
        if len(kernel) == 1 and len(_spatial(c.shape)) > 1:
            kernel = kernel * len(_spatial(c.shape))
        stride = c.arg("stride", None) or kernel
        stride = [int(s) for s in stride] if isinstance(stride, list | tuple) else [int(stride)] * len(kernel)
        attrs = {"mode": mode, "window": math.prod(kernel) if kernel else None, "kernel_shape": kernel}
        attrs["strides"] = stride
        return b.passthrough(c, Kind.POOL, attrs)

    return handler


def _adaptive_pool(mode: str) -> Handler:
    """Adaptive pools: the window is the input's spatial size over the output's."""

    def handler(b: _Builder, c: _Call) -> Layer:
        source = b.by_name.get(c.signals[0]) if c.signals else None
        before, after = _spatial(source.shape if source else None), _spatial(c.shape)
        window = None
        if before and len(before) == len(after) and None not in before and None not in after:
            window = math.prod(int(i) // max(int(o), 1) for i, o in zip(before, after, strict=True))  # type: ignore[arg-type]
        glob = bool(after) and all(o == 1 for o in after)
        return b.passthrough(c, Kind.POOL, {"mode": f"global_{mode}" if glob else mode, "window": window})

    return handler


def _mean(b: _Builder, c: _Call) -> Layer:
    """A mean over positions is an average pool; over the features it is not modeled."""
    source = b.by_name.get(c.signals[0]) if c.signals else None
    shape = source.shape if source else None
    dims = c.arg("dim", None)
    if shape is None or dims is None:
        return _unmodeled(b, c, f"{c.label} over unknown dimensions; treated as pass-through")
    rank = len(shape)
    dims = [int(d) % rank for d in (dims if isinstance(dims, list | tuple) else [dims])]
    feature = rank - 1 if rank in (2, 3) else 1
    if feature in dims or 0 in dims or any(shape[d] is None for d in dims):
        return _unmodeled(b, c, f"{c.label} over the feature or batch dimension is not modeled")
    window = math.prod(int(shape[d]) for d in dims)  # type: ignore[arg-type]
    layer = b.passthrough(c, Kind.POOL, {"mode": "avg", "window": window})
    layer.width = source.width if source else layer.width
    return layer


def _concat(b: _Builder, c: _Call) -> Layer:
    axis = int(c.arg("dim", 0))
    rank = len(c.shape) if c.shape is not None else None
    feature = axis in (1, -1) if rank is None else axis % rank == (rank - 1 if rank in (2, 3) else 1)
    layer = b.passthrough(c, Kind.CONCAT, {"axis": axis}, keep_width=False)
    parts = [v for v in _flatten(c.kwargs.get("tensors", [])) if v is not None]
    widths = [b.width_of(v.name) if isinstance(v, _Sig) else None for v in parts]
    if feature and None not in widths:
        layer.width = sum(w for w in widths if w is not None)
    return layer


def _attention(b: _Builder, c: _Call) -> Layer:
    """softmax(q k^T) v averages rows of v: modeled as a pass-through of the values."""
    value = c.kwargs.get("value")
    layer = _unmodeled(b, c, "attention is not modeled; treated as a pass-through of its values")
    if isinstance(value, _Sig):
        layer.inputs = [value.name]
        layer.width = b.width_of(value.name) or layer.width
    return layer


def _embedding(b: _Builder, c: _Call) -> Layer:
    """A lookup table starts a signal: it is an input whose length is the table's."""
    w = c.param("weight")
    width = w.shape[-1] if w is not None else feature_width(c.shape, None, rank3="last")
    return Layer(
        c.name,
        Kind.INPUT,
        c.label,
        width=width,
        shape=c.shape,
        attrs={"embedding": w.key if w else None, "table": b.stats(w)},
    )


_RESHAPE_OPS = (
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "clone", "squeeze", "unsqueeze", "expand", "expand_as", "dropout", "feature_dropout", "alpha_dropout",
    "native_dropout", "identity", "alias", "detach", "to", "_to_copy", "type_as", "float", "half", "type",
    "slice", "select", "narrow", "getitem", "split", "split_with_sizes", "chunk", "unbind", "repeat",
    "lift_fresh_copy", "copy", "pad", "constant_pad_nd", "movedim", "roll", "channel_shuffle",
    "pixel_shuffle",
)  # fmt: skip

HANDLERS: dict[str, Handler] = {
    "linear": _linear,
    "matmul": _matmul,
    "mm": _matmul,
    "addmm": _matmul,
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "_convolution"), _conv),
    "relu": _activation("relu"),
    "leaky_relu": _activation("leaky_relu", alpha=("negative_slope", 0.01)),
    "prelu": _prelu,
    "_prelu_kernel": _prelu,
    "elu": _activation("elu", alpha=("alpha", 1.0)),
    "celu": _activation("elu", alpha=("alpha", 1.0)),
    "selu": _activation("selu", alpha=("_alpha", 1.6732632423543772), gamma=("_gamma", 1.0507009873554805)),
    "gelu": _gelu,
    "tanh": _activation("tanh"),
    "sigmoid": _activation("sigmoid"),
    "softplus": _softplus,
    "silu": _activation("silu"),
    "hardtanh": _hardtanh,
    "relu6": _activation("relu"),
    "add": _add,
    "mul": _mul,
    "div": _div,
    **dict.fromkeys(
        (
            "batch_norm",
            "_native_batch_norm_legit_no_training",
            "_native_batch_norm_legit",
            "native_batch_norm",
        ),
        _norm("batch"),
    ),
    "layer_norm": _norm("layer"),
    "native_layer_norm": _norm("layer"),
    "group_norm": _norm("group"),
    "native_group_norm": _norm("group"),
    "instance_norm": _norm("instance"),
    "rms_norm": _norm("rms", beta=None),
    **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices"), _pool("max")),
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), _pool("avg")),
    **dict.fromkeys(
        ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"), _adaptive_pool("avg")
    ),
    **dict.fromkeys(
        ("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"), _adaptive_pool("max")
    ),
    "mean": _mean,
    "cat": _concat,
    "concat": _concat,
    "concatenate": _concat,
    "scaled_dot_product_attention": _attention,
    "embedding": _embedding,
    **dict.fromkeys(_RESHAPE_OPS, _reshape),
}

#: Ops returning a tuple whose first item is the result (norms with saved statistics,
#: max pools with indices): ``getitem(op, 0)`` is the op itself.
_TUPLE_FIRST = {
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_layer_norm",
    "native_group_norm",
    "max_pool2d_with_indices",
    "native_dropout",
}


def _activation_class(cls: Any) -> dict[str, Any] | None:
    """Attributes for an activation module outside ``torch.nn`` known by its class name."""
    qualname = (
        cls if isinstance(cls, str) else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__name__', '')}"
    )
    if qualname.startswith("torch.nn.") or not qualname:
        return None
    name = qualname.rsplit(".", 1)[-1].lower()
    if not (name.endswith("activation") or name.startswith(("gelu", "silu", "swish"))):
        return None
    if "gelu" in name and not any(k in name for k in ("clip", "linear", "squared")):
        tanh = any(k in name for k in ("new", "fast", "tanh", "quick"))
        return {"activation": "gelu", "approximate": "tanh" if tanh else "none"}
    if "silu" in name or "swish" in name:
        return {"activation": "silu"}
    return None


# --------------------------------------------------------------------------- nn modules as calls


def _module_call(module: nn.Module, prefix: str, x: Any) -> tuple[str, dict[str, Any]] | None:
    """A leaf module as its functional call: (op, kwargs), parameters keyed by state-dict name."""
    from torch import nn

    def p(attr: str) -> _Param | None:
        t = getattr(module, attr, None)
        return _Param(f"{prefix}.{attr}" if prefix else attr, t) if t is not None else None

    m = module
    if isinstance(m, nn.Linear):
        return "linear", {"input": x, "weight": p("weight"), "bias": p("bias")}
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        args = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        return f"conv{len(m.kernel_size)}d", {"input": x, "weight": p("weight"), "bias": p("bias"), **args}
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "convolution", {"input": x, "weight": p("weight"), "transposed": True}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        names = ("weight", "bias", "running_mean", "running_var")
        return "batch_norm", {"input": x, **{k: p(k) for k in names}, "eps": m.eps, "momentum": m.momentum}
    if isinstance(m, nn.LayerNorm):
        return "layer_norm", {"input": x, "weight": p("weight"), "bias": p("bias"), "eps": m.eps}
    if isinstance(m, nn.GroupNorm):
        return "group_norm", {
            "input": x,
            "weight": p("weight"),
            "bias": p("bias"),
            "eps": m.eps,
            "num_groups": m.num_groups,
        }
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instance_norm", {"input": x, "weight": p("weight"), "bias": p("bias"), "eps": m.eps}
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return "rms_norm", {"input": x, "weight": p("weight"), "eps": m.eps or 1e-5}
    simple = {nn.ReLU: "relu", nn.SELU: "selu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
    for cls, op in simple.items():
        if isinstance(m, cls):
            return op, {"input": x}
    if isinstance(m, nn.ReLU6):
        return "hardtanh", {"input": x, "min_val": 0.0, "max_val": 6.0}
    if isinstance(m, nn.Hardtanh):
        return "hardtanh", {"input": x, "min_val": m.min_val, "max_val": m.max_val}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"input": x, "negative_slope": m.negative_slope}
    if isinstance(m, nn.PReLU):
        return "prelu", {"input": x, "weight": p("weight")}
    if isinstance(m, nn.ELU | nn.CELU):
        return "elu", {"input": x, "alpha": m.alpha}
    if isinstance(m, nn.GELU):
        return "gelu", {"input": x, "approximate": m.approximate}
    if isinstance(m, nn.Softplus):
        return "softplus", {"input": x, "beta": m.beta}
    if isinstance(m, nn.Embedding):
        return "embedding", {"weight": p("weight"), "indices": x}
    if isinstance(m, nn.modules.pooling._MaxPoolNd | nn.modules.pooling._AvgPoolNd):
        op = ("max" if isinstance(m, nn.modules.pooling._MaxPoolNd) else "avg") + "_pool2d"
        return op, {"input": x, "kernel_size": m.kernel_size, "stride": m.stride}
    if isinstance(m, nn.modules.pooling._AdaptiveAvgPoolNd):
        return "adaptive_avg_pool2d", {"input": x}
    if isinstance(m, nn.modules.pooling._AdaptiveMaxPoolNd):
        return "adaptive_max_pool2d", {"input": x}
    if isinstance(m, nn.Identity | nn.Flatten | nn.Unflatten | nn.modules.dropout._DropoutNd):
        return "identity", {"input": x}
    if isinstance(m, nn.MultiheadAttention):
        return "scaled_dot_product_attention", {"query": x, "key": x, "value": x}
    return None


# --------------------------------------------------------------------------- tracers


def _shape_of(value: Any) -> tuple[int | None, ...] | None:
    """The static shape of a traced value (tensor, FakeTensor, TensorMetadata), or None."""
    if isinstance(value, list | tuple) and value and not hasattr(value, "dtype"):  # not a TensorMetadata
        value = value[0]
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    dims: list[int | None] = []
    for d in shape:
        try:
            dims.append(int(d))
        except Exception:
            dims.append(None)  # a symbolic size
    return tuple(dims)


def _is_float(value: Any) -> bool:
    if isinstance(value, list | tuple) and not hasattr(value, "dtype"):
        return bool(value) and _is_float(value[0])
    dtype = getattr(value, "dtype", None)
    return bool(dtype is not None and getattr(dtype, "is_floating_point", False))


def _canonical(target: Any) -> str:
    """The op's canonical name: an ATen schema name, or a python function's name."""
    import torch

    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        name = target._schema.name.split("::")[-1] if hasattr(target, "_schema") else str(target)
        return name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if isinstance(target, str):  # call_method
        return target[:-1] if target.endswith("_") else target
    named = _PY_OPS.get(target)
    if named is not None:
        return named
    name = getattr(target, "__name__", str(target))
    return name.strip("_")


_PY_OPS: dict[Any, str] = {
    operator.add: "add",
    operator.iadd: "add",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.sub: "sub",
    operator.matmul: "matmul",
    operator.getitem: "getitem",
    operator.neg: "neg",
}

_BINARY = ("add", "mul", "div", "sub", "matmul")


def _normalized(target: Any, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments by parameter name, the same names ATen and ``torch.nn.functional`` use."""
    from torch.fx.operator_schemas import normalize_function

    if not isinstance(target, str):
        try:
            pair = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
        except Exception:
            pair = None
        if pair is not None:
            return dict(pair.kwargs)
    names: tuple[str, ...] = ("input", "other") if op in _BINARY else ("input",)
    if op in ("cat", "concat", "concatenate", "stack"):
        names = ("tensors", "dim")
    elif op in ("mean", "sum", "flatten", "softmax"):
        names = ("input", "dim")
    out = {f"arg{i}": a for i, a in enumerate(args)}
    out.update({name: a for name, a in zip(names, args, strict=False)})
    out.update(kwargs)
    return out


class _FxWalker:
    """Walks an fx graph (from torch.export or symbolic tracing) into canonical calls."""

    def __init__(self, builder: _Builder, params: dict[str, _Param], modules: dict[str, nn.Module]) -> None:
        self.b = builder
        self.params = params  # placeholder or get_attr node name -> parameter
        self.modules = modules  # qualified name -> module, for call_module nodes
        self.env: dict[fx.Node, Any] = {}
        self.group: tuple[str, _Sig] | None = None  # the activation module being folded

    def value(self, arg: Any) -> Any:
        from torch import fx

        if isinstance(arg, fx.Node):
            return self.env.get(arg, _OPAQUE)
        if isinstance(arg, list | tuple):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.value(v) for k, v in arg.items()}
        return arg

    def walk(self, graph: fx.Graph, user_inputs: set[str], meta_key: str) -> list[str]:
        outputs: list[str] = []
        for node in graph.nodes:
            val = node.meta.get(meta_key)
            if node.op == "placeholder":
                if node.name in self.params:
                    self.env[node] = self.params[node.name]
                elif node.name in user_inputs and _is_float(val):
                    self.env[node] = self.b.add_input(node.name, _shape_of(val))
                else:
                    self.env[node] = _OPAQUE  # integer ids, masks, sizes
            elif node.op == "get_attr":
                self.env[node] = self.params.get(node.name, _OPAQUE)
            elif node.op == "output":
                for v in _flatten([self.value(a) for a in node.args]):
                    if isinstance(v, _Sig) and v.name not in outputs:
                        outputs.append(v.name)
            elif (folded := self.fold_activation_module(node)) is not None:
                self.env[node] = folded
            else:
                self.env[node] = self.call(node, val)
            value = self.env.get(node)
            if isinstance(value, _Sig):  # the last node producing a layer's value is its tap
                self.b.node_of[value.name] = node.name
        return outputs

    def fold_activation_module(self, node: fx.Node) -> Any:
        """The ops of a custom activation module (transformers' ``NewGELUActivation`` is
        ``0.5 x (1 + tanh(...))``) as the one activation they compute; None otherwise."""
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = list(stack.values())[-1] if stack else ("", None)
        attrs = _activation_class(cls)
        if attrs is None or node.op != "call_function":
            self.group = None
            return None
        if self.group is not None and self.group[0] == path:
            return self.group[1]
        x = next((v for v in _flatten(self.value(list(node.args))) if isinstance(v, _Sig)), None)
        if x is None:
            return _OPAQUE  # a constant computed inside the module
        source = self.b.by_name[x.name]
        name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        call = _Call(self.b.unique(str(path)), "activation", name, {}, source.shape, [x.name])
        sig = self.b.emit(self.b.passthrough(call, Kind.ACTIVATION, attrs))
        self.group = (path, sig)
        return sig

    def layer_name(self, node: fx.Node, op: str, kw: dict[str, Any]) -> str:
        """The module path that made the op: ``layer3.1.relu`` for an ``nn`` module's only op,
        ``layer3.1.add`` for an op in a custom module's forward. Without a module stack
        (TorchScript), a layer with a weight takes the weight's prefix; else the fx name."""
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = list(stack.values())[-1] if stack else ("", None)
        path = str(path)
        if not path:
            weight = kw.get("weight", kw.get("mat2"))
            if isinstance(weight, _Param) and weight.key.endswith(".weight"):
                return weight.key.removesuffix(".weight")
            return node.name
        leaf = str(getattr(cls, "__module__", cls)).startswith("torch.nn.modules")
        return path if leaf and path not in self.b.by_name else f"{path}.{op}"

    def call(self, node: fx.Node, val: Any) -> Any:
        args, kwargs = self.value(tuple(node.args)), self.value(dict(node.kwargs))
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            x = args[0] if args else next(iter(kwargs.values()), _OPAQUE)
            translated = _module_call(module, str(node.target), x)
            if translated is None:
                op, label, kw = "module", type(module).__name__, {"input": x}
            else:
                op, kw = translated
                label = f"nn.{type(module).__name__}"
            name = str(node.target)
        else:
            op = _canonical(node.target)
            kw = _normalized(node.target, op, args, kwargs)
            label = f"aten.{op}" if node.op == "call_function" and "aten" in str(node.target) else op
            name = self.layer_name(node, op, kw)
        signals = _signals(kw)
        if op != "embedding" and (table := _lookup_table(op, kw)) is not None:
            op, kw = "embedding", {"weight": table, "indices": _OPAQUE}  # onnx2torch's Gather, table[ids]
        if op == "embedding" and isinstance(kw.get("weight"), _Param):
            return self.b.add_source(
                _embedding(self.b, _Call(self.b.unique(name), op, label, kw, _shape_of(val)))
            )
        if not signals:
            return _OPAQUE  # a constant computation: masks, positions, shapes
        if op == "getitem":
            source = self.b.by_name[signals[0]]
            parent = node.args[0]
            first = kw.get("other", kw.get("arg1")) == 0
            if (
                first
                and getattr(parent, "target", None) is not None
                and _canonical(parent.target) in _TUPLE_FIRST
            ):
                return _Sig(source.name)
        if not _is_float(val):
            return _OPAQUE  # comparisons, argmax, sizes, asserts: no longer the signal
        call = _Call(self.b.unique(name), op, label, kw, _shape_of(val), signals)
        return self.b.run(call)


def _lookup_table(op: str, kw: dict[str, Any]) -> _Param | None:
    """The table of a row lookup written without ``embedding``: ``aten.index.Tensor(table, [ids])``
    (``table[ids]``, and what onnx2torch makes of ONNX's Gather on an initializer) or
    ``index_select(table, 0, ids)``. The table is a 2-D float parameter and the ids carry no signal."""
    if op == "index":
        table = kw.get("self", kw.get("input", kw.get("arg0")))
        indices = kw.get("indices", kw.get("arg1"))
        rows = isinstance(indices, list | tuple) and len(indices) == 1 and indices[0] is not None
        ids = indices[0] if rows else None  # type: ignore[index]
    elif op == "index_select":
        table = kw.get("self", kw.get("input", kw.get("arg0")))
        ids = kw.get("index", kw.get("arg2"))
        rows = kw.get("dim", kw.get("arg1")) == 0
    else:
        return None
    if not rows or not isinstance(table, _Param) or isinstance(ids, _Sig):
        return None
    tensor = table.tensor
    shape = tuple(getattr(tensor, "shape", ()))
    return table if len(shape) == 2 and bool(getattr(tensor, "is_floating_point", lambda: False)()) else None


def _exported_params(ep: Any) -> dict[str, _Param]:
    """Placeholder name -> parameter, keyed by its state-dict name, from the graph signature."""
    sig = ep.graph_signature
    state = ep.state_dict
    constants = getattr(ep, "constants", {}) or {}
    params: dict[str, _Param] = {}
    for placeholder, key in sig.inputs_to_parameters.items():
        params[placeholder] = _Param(key, state[key])
    for placeholder, key in sig.inputs_to_buffers.items():
        tensor = state.get(key, constants.get(key))
        if tensor is not None:
            params[placeholder] = _Param(key, tensor)
    for placeholder, key in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        if key in constants:
            params[placeholder] = _Param(key, constants[key])
    return params


def graph_from_exported(ep: Any, *, source: str, fmt: str, notes: list[str] | None = None) -> LayerGraph:
    """An ExportedProgram (loaded from a .pt2 or just exported) as a LayerGraph."""
    builder = _Builder()
    builder.notes.extend(notes or [])
    outputs = _walk_exported(ep, builder)
    _require_signal(builder, source)
    builder.program = ep
    return builder.graph(outputs, source, fmt, {"extraction": "torch.export"})


def _walk_exported(ep: Any, builder: _Builder) -> list[str]:
    user_inputs = set(ep.graph_signature.user_inputs)
    return _FxWalker(builder, _exported_params(ep), {}).walk(ep.graph_module.graph, user_inputs, "val")


def _graph_by_export(module: nn.Module, example: tuple[Any, ...], builder: _Builder) -> list[str]:
    builder.program = _export(module, example)
    return _walk_exported(builder.program, builder)


def _require_signal(builder: _Builder, source: str) -> None:
    if not builder.inputs:
        raise LoadError(
            source, "the model has no floating-point input and no embedding: nothing to propagate"
        )


def _export(module: nn.Module, example: tuple[Any, ...]) -> Any:
    """torch.export of ``module`` with its outputs reduced to their tensors: models return
    caches and dataclasses export cannot flatten (transformers' DynamicCache). The forward is
    wrapped on the instance, so parameter names stay the module's own."""
    import torch

    forward = module.forward

    @functools.wraps(forward)
    def tensors_only(*args: Any) -> tuple[Any, ...]:
        return tuple(tensor_leaves(forward(*args)))

    module.forward = tensors_only  # type: ignore[method-assign]
    try:
        with quiet_tracers():
            return torch.export.export(module, example, strict=False)
    finally:
        del module.forward


#: Loggers torch's tracers chatter on.
TRACER_LOGGERS = (
    "torch._export",
    "torch.export",
    "torch.fx",
    "torch._dynamo",
    "torch.fx.experimental.symbolic_shapes",
)


@contextlib.contextmanager
def quiet_tracers() -> Iterator[None]:
    """Tracer warnings and log lines (shape specialization, deprecations) are not the
    user's business: what matters reaches the report as notes."""
    loggers = [logging.getLogger(name) for name in TRACER_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def tensor_leaves(value: Any) -> Iterable[Any]:
    """The tensors in a (nested) output: tuples, lists and dicts, as models return them."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensor_leaves(item)
    elif isinstance(value, dict):  # also transformers' ModelOutput
        for item in value.values():
            yield from tensor_leaves(item)


def _graph_by_fx(module: nn.Module, example: tuple[Any, ...], builder: _Builder) -> list[str]:
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    traced = fx.symbolic_trace(module)
    with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints its own traceback on failure
        ShapeProp(traced).propagate(*example)
    params: dict[str, _Param] = {}
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            obj: Any = traced
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            params[node.name] = _Param(str(node.target), obj)
            node.meta.setdefault("tensor_meta", obj)
    modules = dict(traced.named_modules())
    user_inputs = {node.name for node in traced.graph.nodes if node.op == "placeholder"}
    return _FxWalker(builder, params, modules).walk(traced.graph, user_inputs, "tensor_meta")


def _graph_by_hooks(module: nn.Module, example: tuple[Any, ...], builder: _Builder) -> list[str]:
    """Leaf modules in execution order; a module's input comes from the module whose output
    it is, or else from the previous module (the ops in between are invisible)."""
    import torch

    produced: dict[int, _Sig] = {}
    for i, x in enumerate(example):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            produced[id(x)] = builder.add_input(f"input_{i}", _shape_of(x))
    last: list[_Sig] = list(produced.values())[-1:]
    keep: list[Any] = []  # outputs stay alive so their ids stay unique
    guessed = 0

    def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal guessed
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        x: Any = _OPAQUE
        if tensors:
            x = produced.get(id(tensors[0]))
            if x is None:
                if tensors[0].is_floating_point() and last:
                    x, guessed = last[0], guessed + 1
                else:
                    x = _OPAQUE
        prefix = names[id(mod)]
        translated = _module_call(mod, prefix, x)
        op, kw = translated if translated is not None else ("module", {"input": x})
        label = f"nn.{type(mod).__name__}"
        out = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(out, torch.Tensor):
            return
        keep.append(out)
        if op == "embedding":
            sig = builder.add_source(
                _embedding(builder, _Call(builder.unique(prefix), op, label, kw, _shape_of(out)))
            )
        elif isinstance(x, _Sig):
            sig = builder.run(_Call(builder.unique(prefix), op, label, kw, _shape_of(out), [x.name]))
        else:
            return
        produced[id(out)] = sig
        last[:] = [sig]

    names = {id(m): name for name, m in module.named_modules()}
    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for h in handles:
            h.remove()
    builder.notes.append(
        "forward hooks see only modules: functional ops between them (residual adds, F.relu) are missing"
        + (f"; {guessed} module input(s) were connected to the previous module" if guessed else "")
    )
    return [last[0].name] if last else []


def graph_from_module(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    source: str,
    fmt: str,
    notes: list[str] | None = None,
    extractors: tuple[str, ...] = EXTRACTORS,
) -> LayerGraph:
    """Trace ``module`` on ``example_inputs`` into a LayerGraph with the first of
    ``extractors`` that works (:data:`EXTRACTORS` order); ``meta["extraction"]`` names it."""
    import torch

    walkers = {"torch.export": _graph_by_export, "torch.fx": _graph_by_fx, "forward hooks": _graph_by_hooks}
    was_training = module.training
    module.eval()  # dropout off, batch norm on its running statistics: the graph at init
    failures: list[str] = []
    try:
        with torch.no_grad():
            for extractor in extractors:
                builder = _Builder()
                builder.notes.extend(notes or [])
                try:
                    outputs = walkers[extractor](module, example_inputs, builder)
                except Exception as exc:
                    failures.append(f"{extractor} failed ({_reason(exc)})")
                    continue
                _require_signal(builder, source)
                builder.notes.extend(f"{f}; used {extractor}" for f in failures)
                return builder.graph(outputs, source, fmt, {"extraction": extractor})
    finally:
        module.train(was_training)
    raise LoadError(source, "could not trace the module: " + "; ".join(failures))


def graph_from_scripted(
    module: Any, example_inputs: tuple[Any, ...], *, source: str, fmt: str, notes: list[str] | None = None
) -> LayerGraph:
    """A TorchScript module, converted to an ExportedProgram by torch's own converter."""
    try:
        from torch._export.converter import TS2EPConverter

        with quiet_tracers():
            ep = TS2EPConverter(module, example_inputs).convert()
    except Exception as exc:
        raise LoadError(
            source,
            f"TorchScript graph could not be converted ({_reason(exc)}); export the model to ONNX or .pt2",
        ) from None
    graph = graph_from_exported(ep, source=source, fmt=fmt, notes=notes)
    graph.meta["extraction"] = "TorchScript -> torch.export"
    return graph


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------- example inputs


def example_inputs(
    module: nn.Module, input_shape: tuple[int, ...] | None, dtype: str | None
) -> tuple[Any, ...]:
    """Inputs to trace ``module`` with: ``--input-shape``/``--input-dtype`` (a torch dtype
    name, as ``cli.parse_dtype`` gives it), else the module's own ``example_input_array``
    (Lightning) or ``example_inputs``, else a guess from its first layer (the caller notes it).
    Floats are N(0, 1); token ids (the default before an embedding) are small integers."""
    import torch

    torch_dtype = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise UsageError(f"--input-dtype {dtype!r} is not a torch dtype")
    if input_shape is None:
        for attr in ("example_input_array", "example_inputs"):
            found = getattr(module, attr, None)
            if isinstance(found, torch.Tensor):
                return (found,)
            if isinstance(found, tuple | list) and all(isinstance(t, torch.Tensor) for t in found):
                return tuple(found)
        input_shape, guessed_dtype = _guess_shape(module)
    else:
        guessed_dtype = _first_layer_dtype(module)
    torch_dtype = torch_dtype or guessed_dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    if torch_dtype.is_floating_point:
        return (torch.randn(input_shape, generator=generator).to(torch_dtype),)
    return (torch.randint(0, 2, input_shape, generator=generator, dtype=torch_dtype),)


def _first_layer_dtype(module: nn.Module) -> Any:
    try:
        return _guess_shape(module)[1]
    except UsageError:
        return None


def _guess_shape(module: nn.Module) -> tuple[tuple[int, ...], Any]:
    import torch
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Linear):
            return (1, m.in_features), None
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return (1, m.in_channels, *([32] * len(m.kernel_size))), None
        if isinstance(m, nn.Embedding):
            return (1, 16), torch.int64
    raise UsageError(
        "cannot tell the model's input shape: pass --input-shape (e.g. 1,3,224,224) and, for token ids, "
        "--input-dtype int64"
    )


def guessed_shape_note(module: nn.Module, input_shape: tuple[int, ...] | None) -> str | None:
    """The note to add when :func:`example_inputs` guessed the shape."""
    if input_shape is not None or any(hasattr(module, a) for a in ("example_input_array", "example_inputs")):
        return None
    try:
        shape, dtype = _guess_shape(module)
    except UsageError:
        return None
    kind = "token ids" if dtype is not None else "inputs"
    shown = ",".join(map(str, shape))
    return f"input shape {shown} ({kind}) was guessed from the first layer; pass --input-shape"
