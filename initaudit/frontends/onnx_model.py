"""ONNX frontend: a ModelProto into a LayerGraph.

Reading is defensive (see DESIGN.md, "Loading safely"): the file is parsed without external
data; every weight is validated (dims, data size) and read on its own from inside the model
directory through onnx's own guarded reader, summarized by :func:`tensor_stats` and dropped.
Large weights then leave the proto, so that the checker and shape inference run on a small
model instead of serializing a 1 GB one.

Mapping is one small handler per op type (``_HANDLERS``); multi-node idioms that exporters
emit for a single layer (SiLU, erf/tanh GELU, decomposed LayerNorm, MatMul + bias Add) are
recognised first and collapse into one layer.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from initaudit.errors import LoadError, UsageError
from initaudit.frontends import protobuf_model_check
from initaudit.frontends.shapes import feature_width
from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.stats import TensorStats, tensor_stats

#: Constants up to this many elements keep their values (scales, shapes, axes, biases).
KEEP_ELEMENTS = 1 << 16
#: More elements than any real tensor: a corrupt or hostile header, not a model.
MAX_ELEMENTS = 1 << 40

_DEFAULT_DOMAINS = ("", "ai.onnx")
_SUBBYTE_TYPES = {
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2")
    if hasattr(TensorProto, name)
}
_KNOWN_TYPES = set(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}
_FLOAT_TYPES = {value for name, value in TensorProto.DataType.items() if "FLOAT" in name or name == "DOUBLE"}
#: Graph inputs of these types feed lookups and masks in a token model, not the signal.
_DISCRETE_TYPES = {
    getattr(TensorProto, name)
    for name in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")
}
_INDEX_TYPES = {TensorProto.INT32, TensorProto.INT64}


@dataclass
class _Const:
    """A tensor known without running the model: initializer, Constant node or folded."""

    name: str
    shape: tuple[int, ...] | None
    stats: TensorStats | None = None
    value: np.ndarray | None = None  # kept only for small tensors
    inv_rms: float | None = None  # sqrt(E[1/c^2]), precomputed for large Div divisors

    @property
    def rms(self) -> float | None:
        if self.stats is not None:
            return self.stats.rms
        if self.value is not None and self.value.size:
            return _rms(self.value)
        return None

    @property
    def count(self) -> int | None:
        if self.stats is not None:
            return self.stats.count
        if self.shape is not None and None not in self.shape:
            return math.prod(self.shape)
        return None

    def scalar(self) -> float | None:
        """The value when every element is the same number, else None."""
        if self.value is None or self.value.size == 0:
            return None
        try:
            flat = self.value.astype(np.float64).reshape(-1)
        except (TypeError, ValueError):
            return None
        return float(flat[0]) if np.all(flat == flat[0]) else None

    def inverse_rms(self) -> float | None:
        if self.inv_rms is not None:
            return self.inv_rms
        if self.value is not None and self.value.size:
            return _inv_rms(self.value)
        return None


def _rms(array: np.ndarray) -> float:
    a = np.asarray(array, dtype=np.float64)
    return float(np.sqrt(np.mean(a * a)))


def _inv_rms(array: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _rms(1.0 / np.asarray(array, dtype=np.float64))


def _scaled(stats: TensorStats | None, factor: float) -> TensorStats | None:
    """Stats of ``factor * w`` from those of ``w`` (Gemm's alpha/beta): kurtosis is unchanged."""
    if stats is None or factor == 1.0:
        return stats
    a = abs(factor)
    return replace(
        stats,
        mean=stats.mean * factor,
        std=stats.std * a,
        second_moment=stats.second_moment * factor * factor,
        absmax=stats.absmax * a,
        zeros=stats.count - stats.nonfinite if factor == 0 else stats.zeros,
    )


def _text(value: str | bytes) -> str:
    # protobuf hands back bytes for a string field that is not valid UTF-8.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _one_line(exc: BaseException | str, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- reading


def load_onnx(path: str | Path, input_shape: tuple[int, ...] | None = None) -> LayerGraph:
    """Read an ONNX file into a :class:`LayerGraph` (layers in topological order).

    ``input_shape`` replaces the shape of the first graph input before shape inference;
    otherwise a symbolic batch dimension is taken as 1. Raises :class:`LoadError` for any
    file that cannot be read safely, :class:`UsageError` for an ``input_shape`` that does
    not fit the model.
    """
    p = Path(path)
    model = _read_model(p)
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [vi.name for vi in model.graph.input if vi.name not in init_names]
    notes: list[str] = []
    consts, all_stats = _read_initializers(p, model, notes)
    _check(p, model)
    input_shapes = _fix_input_shapes(p, model, real_inputs, input_shape)
    shapes, types = _infer_shapes(model, notes)
    builder = _Builder(p, model, consts, shapes, real_inputs, notes, types)
    graph = builder.build()
    graph.meta["input_shapes"] = input_shapes
    graph.meta["tensor_stats"] = {**all_stats, **builder.node_stats}
    return graph


def _read_model(p: Path) -> onnx.ModelProto:
    if not p.exists():
        raise LoadError(p, "no such file")
    if p.is_dir():
        raise LoadError(p, "is a directory, not a model file")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise LoadError(p, f"cannot be read ({_one_line(exc)})") from None
    if size == 0:
        raise LoadError(p, "is empty (0 bytes)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        walk = protobuf_model_check(p)
        if walk == "truncated":
            raise LoadError(p, "is truncated: a protobuf field runs past the end of the file") from None
        if walk is False:
            raise LoadError(p, "is not an ONNX model (not a protobuf ModelProto)") from None
        raise LoadError(p, f"is a corrupt ONNX file ({_one_line(exc)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise LoadError(p, "is not an ONNX model (no graph or opset in the protobuf)")
    return model


def _check(p: Path, model: onnx.ModelProto) -> None:
    """The ONNX checker, on the proto once its weights are validated and stripped.

    Checking the path instead would parse a 1 GB file a second time (seconds, and gigabytes
    of memory). A Constant node with external data is the exception: only the path-based
    check knows the model directory to resolve it against.
    """
    external = any(
        a.type == onnx.AttributeProto.TENSOR and uses_external_data(a.t)
        for node in model.graph.node
        for a in node.attribute
    )
    try:
        try:
            onnx.checker.check_model(str(p) if external else model)
        except ValueError as exc:
            if "2GB" not in str(exc):
                raise
            onnx.checker.check_model(str(p))
    except Exception as exc:
        raise LoadError(p, _external_problem(exc) or f"fails the ONNX checker: {_one_line(exc)}") from None


_TENSOR_RE = re.compile(r"tensor name: ([^)]*?)\s*\)")


def _external_problem(exc: BaseException) -> str | None:
    """Translate onnx's refusal to read external data into a one-line reason, or None."""
    msg = _one_line(exc, limit=1000)
    m = _TENSOR_RE.search(msg)
    tensor = f" of tensor {m.group(1)!r}" if m else ""
    if m := re.search(r"but '(.*)' points outside the directory", msg):
        return f"external data location {m.group(1)!r}{tensor} is outside the model directory (refused)"
    if "should be a relative path" in msg:
        where = msg.rsplit("absolute path:", 1)[-1].strip()
        return f"external data location {where!r}{tensor} is an absolute path (refused)"
    if m := re.search(r"should be stored in (.*), but it is a symbolic link", msg):
        return f"external data file {m.group(1)!r}{tensor} is a symbolic link (refused)"
    if m := re.search(r"should be stored in (.*), but it has multiple hard links", msg):
        return f"external data file {m.group(1)!r}{tensor} is a hard link (refused)"
    if m := re.search(r"should be stored in (.*), but it is not regular file", msg):
        location = m.group(1)  # already joined with the model directory
        if not os.path.lexists(location):
            return f"external data file {location!r}{tensor} is missing"
        return f"external data file {location!r}{tensor} is not a regular file (refused)"
    return None


def _check_tensor(p: Path, t: TensorProto) -> int:
    """Validate dims and the amount of stored data before anything is allocated."""
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise LoadError(p, f"tensor {t.name!r} has a negative dimension {dims}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise LoadError(p, f"tensor {t.name!r} declares {count} elements (corrupt header)")
    if t.data_type == TensorProto.UNDEFINED or t.data_type not in _KNOWN_TYPES:
        raise LoadError(p, f"tensor {t.name!r} has an unknown element type ({t.data_type})")
    if t.data_type in _SUBBYTE_TYPES or t.data_type == TensorProto.STRING:
        return count
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    expected = count * itemsize
    if uses_external_data(t):
        try:
            info = ExternalDataInfo(t)
        except ValueError as exc:
            raise LoadError(p, f"external data of tensor {t.name!r}: {_one_line(exc)}") from None
        if info.length is not None and info.length != expected:
            raise LoadError(
                p, f"external data of tensor {t.name!r} is {info.length} bytes; its shape needs {expected}"
            )
    elif t.HasField("raw_data"):
        pass  # reading raw_data copies it: its length is checked by the reshape in to_array
    else:
        stored = len(getattr(t, helper.tensor_dtype_to_field(t.data_type)))
        per = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        if stored != count * per:
            raise LoadError(p, f"tensor {t.name!r} holds {stored} values; its shape {dims} needs {count}")
    return count


def _to_array(p: Path, t: TensorProto) -> np.ndarray:
    count = _check_tensor(p, t)
    try:
        # onnx >= 1.21 opens external data itself and refuses traversal and links.
        array = numpy_helper.to_array(t, base_dir=str(p.parent))
    except Exception as exc:
        problem = _external_problem(exc)
        if problem is None and "reshape" in str(exc):
            dims = tuple(int(d) for d in t.dims)
            problem = f"tensor {t.name!r} holds data that does not fit its shape {dims} ({_one_line(exc)})"
        if problem is None:
            problem = f"tensor {t.name!r} cannot be read ({_one_line(exc)})"
        raise LoadError(p, problem) from None
    if array.size != count:
        raise LoadError(p, f"tensor {t.name!r} has {array.size} elements; its shape needs {count}")
    return array


def _read_initializers(
    p: Path, model: onnx.ModelProto, notes: list[str]
) -> tuple[dict[str, _Const], dict[str, TensorStats]]:
    """Stats for every initializer, one array alive at a time; big ones leave the proto.

    Dims and data sizes are validated here, before the checker runs (see :func:`_check`).
    """
    graph = model.graph
    divisors = {n.input[1] for n in graph.node if n.op_type == "Div" and len(n.input) > 1}
    consts: dict[str, _Const] = {}
    all_stats: dict[str, TensorStats] = {}
    stripped: list[int] = []
    for i, t in enumerate(graph.initializer):
        array = _to_array(p, t)
        stats = tensor_stats(t.name, array) if t.data_type in _FLOAT_TYPES else None
        const = _Const(t.name, tuple(int(d) for d in t.dims), stats)
        if array.size <= KEEP_ELEMENTS:
            const.value = array
        elif t.name in divisors:
            const.inv_rms = _inv_rms(array)
        if array.size > KEEP_ELEMENTS or uses_external_data(t):
            stripped.append(i)
        del array
        if stats is not None:
            all_stats[t.name] = stats
        consts[t.name] = const
    if graph.sparse_initializer:
        notes.append(f"{len(graph.sparse_initializer)} sparse initializer(s) were not read")
    # The checker and shape inference serialize the whole model: hand them the big weights
    # as typed inputs. External ones go too: the proto-based checker would resolve their
    # files against the working directory, and they have been read safely already.
    listed = {vi.name for vi in graph.input}
    for i in reversed(stripped):
        t = graph.initializer[i]
        if t.name not in listed:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del graph.initializer[i]
    return consts, all_stats


def _dims_of(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None or not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def _fix_input_shapes(
    p: Path, model: onnx.ModelProto, real_inputs: list[str], input_shape: tuple[int, ...] | None
) -> dict[str, tuple[int | None, ...] | None]:
    """Apply ``input_shape`` to the first input; a symbolic batch dimension becomes 1."""
    by_name = {vi.name: vi for vi in model.graph.input}
    if input_shape is not None:
        if not real_inputs:
            raise UsageError(f"{p}: --input-shape given, but the model has no inputs")
        if any(int(d) <= 0 for d in input_shape):
            raise UsageError(f"--input-shape {input_shape}: every dimension must be positive")
        vi = by_name[real_inputs[0]]
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"{p}: input {vi.name!r} is not a tensor; --input-shape does not apply")
        current = _dims_of(vi)
        if current is not None and len(current) != len(input_shape):
            shown = "x".join("?" if d is None else str(d) for d in current)
            raise UsageError(
                f"--input-shape has rank {len(input_shape)}, but input {vi.name!r} of {p} "
                f"has rank {len(current)} ({shown})"
            )
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in input_shape:
            shape.dim.add().dim_value = int(d)
        # Exporter-written intermediate shapes may contradict the new input size.
        del model.graph.value_info[:]
    for name in real_inputs[1 if input_shape is not None else 0 :]:
        vi = by_name[name]
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    return {name: _dims_of(by_name[name]) for name in real_inputs}


def _infer_shapes(
    model: onnx.ModelProto, notes: list[str]
) -> tuple[dict[str, tuple[int | None, ...] | None], dict[str, int]]:
    """Every value's dims, and its element type where known (an embedding's indices are integers)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        notes.append(f"shape inference failed ({_one_line(exc, 160)}); shapes come from weights only")
        inferred = model
    g = inferred.graph
    values = (*g.input, *g.value_info, *g.output)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in values
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type != TensorProto.UNDEFINED
    }
    return {vi.name: _dims_of(vi) for vi in values}, types


# --------------------------------------------------------------------------- constant folding


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constant_node_value(p: Path, node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return _to_array(p, a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _axes(node: onnx.NodeProto, values: list[np.ndarray]) -> list[int] | None:
    axes = _attr(node, "axes")
    if axes is None and len(values) > 1:
        axes = values[1].reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _fold_reshape(node: onnx.NodeProto, v: list[np.ndarray]) -> np.ndarray:
    target = [int(d) for d in v[1].reshape(-1)]
    if not _attr(node, "allowzero", 0):
        target = [v[0].shape[i] if d == 0 else d for i, d in enumerate(target)]
    return v[0].reshape(target)


def _fold_unsqueeze(node: onnx.NodeProto, v: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, v) or []
    rank = v[0].ndim + len(axes)
    return np.expand_dims(v[0], tuple(sorted(a % rank for a in axes)))


def _fold_squeeze(node: onnx.NodeProto, v: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, v)
    return np.squeeze(v[0]) if axes is None else np.squeeze(v[0], tuple(a % v[0].ndim for a in axes))


_FOLD: dict[str, Callable[[onnx.NodeProto, list[np.ndarray]], np.ndarray]] = {
    "Identity": lambda n, v: v[0],
    "Cast": lambda n, v: v[0].astype(helper.tensor_dtype_to_np_dtype(_attr(n, "to"))),
    "Neg": lambda n, v: -v[0],
    "Reciprocal": lambda n, v: 1.0 / v[0],
    "Sqrt": lambda n, v: np.sqrt(v[0]),
    "Exp": lambda n, v: np.exp(v[0]),
    "Log": lambda n, v: np.log(v[0]),
    "Add": lambda n, v: v[0] + v[1],
    "Sub": lambda n, v: v[0] - v[1],
    "Mul": lambda n, v: v[0] * v[1],
    "Div": lambda n, v: v[0] / v[1],
    "Pow": lambda n, v: np.power(v[0], v[1]),
    "Reshape": _fold_reshape,
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Transpose": lambda n, v: np.transpose(v[0], _attr(n, "perm")),
    "Expand": lambda n, v: v[0] * np.ones([int(d) for d in v[1].reshape(-1)], dtype=v[0].dtype),
}


# --------------------------------------------------------------------------- building


@dataclass
class _Group:
    """Several nodes that together are one layer (an activation idiom or a decomposed norm)."""

    nodes: list[int]
    x: str  # the signal input
    out: str  # the tensor the rest of the graph reads
    kind: Kind
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # extra signal inputs, rarely any
    at_last: bool = False  # emit at the group's last node: x may be computed after its first


@dataclass
class _Node:
    """What a handler needs: the node, its layer name, and its inputs split by kind."""

    node: onnx.NodeProto
    index: int
    name: str
    signals: list[str]  # signal tensor names, in input order
    consts: list[str]  # constant tensor names, in input order

    @property
    def op(self) -> str:
        return self.node.op_type

    def input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""


Handler = Callable[["_Builder", _Node], Layer]


class _Builder:
    """Walks the nodes once, in the file's (topological) order, emitting layers."""

    def __init__(
        self,
        path: Path,
        model: onnx.ModelProto,
        consts: dict[str, _Const],
        shapes: dict[str, tuple[int | None, ...] | None],
        real_inputs: list[str],
        notes: list[str],
        types: dict[str, int] | None = None,
    ) -> None:
        self.path = path
        self.model = model
        self.nodes = list(model.graph.node)
        self.consts = consts
        self.shapes = shapes
        self.real_inputs = real_inputs
        self.notes = notes
        self.types = {t.name: t.data_type for t in model.graph.initializer} | dict(types or {})
        self.graph_outputs = {o.name for o in model.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
        self.signal: set[str] = set(real_inputs)
        self.embeddings: dict[int, str] = {}  # Gather node index -> its table
        self.sources: list[str] = []  # layers where the signal starts: graph.inputs
        self.producer: dict[str, str] = {}  # tensor -> layer name
        self.layers: list[Layer] = []
        self.by_name: dict[str, Layer] = {}
        self.node_of: dict[str, int] = {}  # tensor -> index of the node producing it
        self.consumers: dict[str, list[int]] = {}
        self.groups: dict[int, _Group] = {}
        self.absorbed: set[int] = set()
        self.names: list[str] = []
        self.pending: list[int] = []  # nodes a handler folded into the layer it is building
        self.node_stats: dict[str, TensorStats] = {}  # weights held in Constant nodes
        for i, node in enumerate(self.nodes):
            for t in node.output:
                if t:
                    self.node_of[t] = i
            for t in _node_inputs(node):
                self.consumers.setdefault(t, []).append(i)

    # ---- small queries used by handlers and matchers

    def const(self, t: str) -> _Const | None:
        return self.consts.get(t) if t else None

    def is_signal(self, t: str) -> bool:
        return bool(t) and t in self.signal

    def src(self, t: str) -> str:
        return self.producer[t]

    def width_of(self, t: str) -> int | None:
        name = self.producer.get(t)
        return self.by_name[name].width if name is not None else None

    def shape(self, t: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(t)

    def near(self, t: str, target: float, rel: float = 1e-3) -> bool:
        c = self.const(t)
        v = c.scalar() if c is not None else None
        return v is not None and math.isclose(v, target, rel_tol=rel, abs_tol=1e-7)

    def producing(self, t: str, *ops: str) -> int | None:
        """Index of the node producing ``t`` if it is one of ``ops`` (default domain)."""
        i = self.node_of.get(t)
        if i is None or i in self.absorbed or i in self.groups:
            return None
        node = self.nodes[i]
        return i if node.op_type in ops and node.domain in _DEFAULT_DOMAINS else None

    def only_consumer(self, t: str, *ops: str) -> int | None:
        """Index of the single node reading ``t``, if it is one of ``ops``."""
        users = self.consumers.get(t, [])
        if len(users) != 1 or t in self.graph_outputs:
            return None
        i = users[0]
        node = self.nodes[i]
        return i if node.op_type in ops and node.domain in _DEFAULT_DOMAINS else None

    def other_input(self, i: int, t: str) -> str | None:
        """The second input of binary node ``i`` that is not ``t``."""
        ins = list(self.nodes[i].input)
        if len(ins) != 2 or t not in ins:
            return None
        return ins[1] if ins[0] == t else ins[0]

    def closed(self, nodes: Iterable[int], out: str) -> bool:
        """True when no tensor inside the node set is read from outside it, except ``out``."""
        members = set(nodes)
        for i in members:
            for t in self.nodes[i].output:
                if not t or t == out:
                    continue
                if t in self.graph_outputs or any(c not in members for c in self.consumers.get(t, [])):
                    return False
        return not (members & self.absorbed) and not any(i in self.groups for i in members)

    # ---- the passes

    def build(self) -> LayerGraph:
        self._find_embeddings()
        self._classify()
        for matcher in _MATCHERS:
            for i in range(len(self.nodes)):
                if i in self.absorbed or i in self.groups:
                    continue
                try:
                    group = matcher(self, i)
                except Exception:
                    group = None  # an idiom half-matched on odd inputs: map the nodes one by one
                if group is not None and self.closed(group.nodes, group.out):
                    at = max(group.nodes) if group.at_last else min(group.nodes)
                    self.groups[at] = group
                    self.absorbed.update(j for j in group.nodes if j != at)
        names = self.names = self._node_names()
        for name in self.real_inputs:
            if name not in self.signal:
                continue  # token ids or a mask: the embedding starts the signal
            shape = self.shapes.get(name)
            width = feature_width(shape, None, rank3="last")
            self._emit(
                Layer(name, Kind.INPUT, "Input", width=width, shape=shape, attrs={"onnx_value": name}), [name]
            )
            self.sources.append(name)
        for i, node in enumerate(self.nodes):
            if i in self.absorbed:
                continue
            if i in self.embeddings:
                self._emit_embedding(i, node, names[i])
                continue
            if i in self.groups:
                self._emit_group(self.groups[i], names)
                continue
            if not any(self.is_signal(t) for t in node.output):
                continue
            self._emit_node(i, node, names[i])
        return self._finish()

    def _find_embeddings(self) -> None:
        """``Gather(table, ids)`` on a constant rank-2 float table with integer ids, along axis 0:
        a lookup that starts the signal (nn.Embedding, as the torch frontend reads it).

        When the ids of one come from an integer graph input, the model reads tokens: its
        integer and boolean inputs (ids, token types, positions, attention masks) are indices
        and masks, not signals, as torch treats its integer inputs. Elsewhere (a uint8 image
        cast to float) such an input still carries the signal.
        """
        for i, node in enumerate(self.nodes):
            if (
                node.op_type == "Gather"
                and node.domain in _DEFAULT_DOMAINS
                and len(node.input) == 2
                and int(_attr(node, "axis", 0)) == 0
                and self._is_table(node.input[0])
                and self.types.get(node.input[1]) in _INDEX_TYPES
            ):
                self.embeddings[i] = node.input[0]
        discrete = {t for t in self.real_inputs if self.types.get(t) in _DISCRETE_TYPES}
        if not discrete or not self.embeddings:
            return
        reached = set(discrete)
        for node in self.nodes:
            if any(t in reached for t in _node_inputs(node)):
                reached.update(t for t in node.output if t)
        if any(self.nodes[i].input[1] in reached for i in self.embeddings):
            self.signal -= discrete

    def _is_table(self, t: str) -> bool:
        """A rank-2 float tensor known without the input: an initializer or a Constant node."""
        c = self.consts.get(t)
        if c is not None:
            return c.stats is not None and c.shape is not None and len(c.shape) == 2
        i = self.node_of.get(t)
        node = self.nodes[i] if i is not None else None
        if node is None or node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS:
            return False
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return value is not None and value.data_type in _FLOAT_TYPES and len(value.dims) == 2

    def _classify(self) -> None:
        """Which tensors carry the signal; the rest are constants, folded where cheap."""
        for i, node in enumerate(self.nodes):
            if i in self.embeddings:
                self.signal.update(t for t in node.output if t)  # a lookup starts the signal
                continue
            ins = [t for t in _node_inputs(node) if t]
            shape_only = node.op_type in ("Shape", "Size") and node.domain in _DEFAULT_DOMAINS
            if shape_only or not any(t in self.signal for t in ins):
                self._fold(node)
            else:
                self.signal.update(t for t in node.output if t)

    def _fold(self, node: onnx.NodeProto) -> None:
        value: np.ndarray | None = None
        if node.op_type == "ConstantOfShape" and node.domain in _DEFAULT_DOMAINS:
            self._fold_constant_of_shape(node)
            return
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            value = _constant_node_value(self.path, node)
        elif node.op_type in _FOLD and node.domain in _DEFAULT_DOMAINS:
            inputs = [self.consts.get(t) for t in node.input if t]
            if inputs and all(c is not None and c.value is not None for c in inputs):
                try:
                    with np.errstate(all="ignore"):
                        value = np.asarray(_FOLD[node.op_type](node, [c.value for c in inputs]))  # type: ignore[union-attr]
                except Exception:
                    value = None  # an unusual constant expression: its value stays unknown
        for k, t in enumerate(t for t in node.output if t):
            v = value if k == 0 else None
            shape = tuple(int(d) for d in v.shape) if v is not None else None
            if shape is None and (inferred := self.shapes.get(t)) is not None and None not in inferred:
                shape = tuple(int(d) for d in inferred)  # type: ignore[arg-type]
            stats = None
            if v is not None and v.dtype.kind == "f":
                stats = tensor_stats(t, v)
            keep = v if v is not None and v.size <= KEEP_ELEMENTS else None
            self.consts[t] = _Const(t, shape, stats, keep)
            if stats is not None and stats.count > 1 and node.op_type == "Constant":
                self.node_stats[t] = stats

    def _fold_constant_of_shape(self, node: onnx.NodeProto) -> None:
        """A filled tensor: its stats are known without allocating it (it may be a weight)."""
        out = node.output[0]
        source = self.consts.get(node.input[0]) if node.input else None
        shape: tuple[int, ...] | None = None
        if source is not None and source.value is not None:
            shape = tuple(int(d) for d in source.value.reshape(-1))
        elif (inferred := self.shapes.get(out)) is not None and None not in inferred:
            shape = tuple(int(d) for d in inferred)  # type: ignore[arg-type]
        fill_attr = _attr(node, "value")
        fill = (
            numpy_helper.to_array(fill_attr).reshape(-1) if fill_attr is not None else np.zeros(1, np.float32)
        )
        if shape is None or any(d < 0 for d in shape) or fill.size != 1:
            self.consts[out] = _Const(out, shape)
            return
        count, v = math.prod(shape), float(fill[0])
        stats = None
        if fill.dtype.kind == "f":
            finite = math.isfinite(v)
            n = count if finite else 0
            stats = TensorStats(
                name=out,
                shape=shape,
                dtype=str(fill.dtype),
                count=count,
                mean=v if finite and n else 0.0,
                std=0.0,
                second_moment=v * v if finite and n else 0.0,
                kurtosis=1.0 if finite and v != 0 else float("nan"),
                absmax=abs(v) if finite and n else 0.0,
                nonfinite=count - n,
                zeros=count if v == 0 else 0,
            )
        value = np.full(shape, fill[0], dtype=fill.dtype) if count <= KEEP_ELEMENTS else None
        self.consts[out] = _Const(out, shape, stats, value)
        if stats is not None and count > 1:
            self.node_stats[out] = stats

    def _node_names(self) -> list[str]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.name] = counts.get(node.name, 0) + 1
        taken = set(self.real_inputs)
        names = []
        for i, node in enumerate(self.nodes):
            base = _text(node.name) if node.name and counts[node.name] == 1 else f"{_text(node.op_type)}_{i}"
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            taken.add(name)
            names.append(name)
        return names

    def _emit(self, layer: Layer, outputs: Iterable[str]) -> None:
        self.layers.append(layer)
        self.by_name[layer.name] = layer
        for t in outputs:
            if t:
                self.producer[t] = layer.name

    def _split(self, node: onnx.NodeProto) -> tuple[list[str], list[str]]:
        signals = [t for t in _node_inputs(node) if self.is_signal(t)]
        consts = [t for t in node.input if t and not self.is_signal(t)]
        return signals, consts

    def _emit_node(self, i: int, node: onnx.NodeProto, name: str) -> None:
        signals, consts = self._split(node)
        n = _Node(node, i, name, signals, consts)
        if node.domain in _DEFAULT_DOMAINS:
            handler = _HANDLERS.get(node.op_type, _unmodeled)
        else:
            handler = _CUSTOM_HANDLERS.get((node.domain, node.op_type), _unmodeled)
        self.pending = []
        try:
            layer = handler(self, n)
        except LoadError:
            raise
        except Exception as exc:
            # A valid model must never crash the audit: say what was not understood instead.
            self.pending = []
            reason = f"{node.op_type} could not be read ({_one_line(exc, 120)}); treated as pass-through"
            layer = self.passthrough(n, Kind.UNMODELED, {"reason": reason}, keep_width=False)
        outputs = list(node.output)
        # The value the layer stands for: a fused bias Add's output, else the node's own.
        last = self.nodes[self.pending[-1]] if self.pending else node
        layer.attrs["onnx_value"] = last.output[0] if last.output else ""
        if self.pending:
            layer.attrs["fused"] = [name] + [self.names[j] for j in self.pending]
            for j in self.pending:
                self.absorbed.add(j)
                outputs.extend(self.nodes[j].output)
        self._emit(layer, outputs)

    def _emit_group(self, group: _Group, names: list[str]) -> None:
        last = self.node_of[group.out]
        inputs = [self.src(group.x), *(self.src(t) for t in group.inputs)]
        attrs = dict(group.attrs)
        attrs["fused"] = [names[j] for j in sorted(group.nodes)]
        attrs["onnx_value"] = group.out
        layer = Layer(
            name=names[last],
            kind=group.kind,
            op="+".join(self.nodes[j].op_type for j in sorted(group.nodes)),
            inputs=inputs,
            width=self.width_of(group.x) or feature_width(self.shape(group.out), None),
            shape=self.shape(group.out),
            attrs=attrs,
        )
        self._emit(layer, [t for j in group.nodes for t in self.nodes[j].output])

    def _emit_embedding(self, i: int, node: onnx.NodeProto, name: str) -> None:
        """An embedding lookup: an input whose width is the table's row length (as torch's)."""
        table = self.consts.get(self.embeddings[i])
        out = node.output[0]
        shape = self.shape(out)
        rows = table.shape if table is not None else None
        width = rows[1] if rows and len(rows) == 2 else feature_width(shape, None, rank3="last")
        attrs: dict[str, Any] = {
            "embedding": self.embeddings[i],
            "table": table.stats if table is not None else None,
            "onnx_value": out,
        }
        self._emit(Layer(name, Kind.INPUT, node.op_type, width=width, shape=shape, attrs=attrs), [out])
        self.sources.append(name)

    def absorb(self, i: int) -> bool:
        """Fold node ``i`` (later in the order) into the layer being built now, if still free."""
        if i in self.absorbed or i in self.groups:
            return False
        self.pending.append(i)
        return True

    def passthrough(self, n: _Node, kind: Kind, attrs: dict[str, Any], *, keep_width: bool = True) -> Layer:
        """A weightless layer; ``keep_width`` takes the producer's width before the shape's."""
        out = n.node.output[0] if n.node.output else ""
        shape = self.shape(out)
        hint = next((w for t in n.signals if (w := self.width_of(t)) is not None), None)
        width = hint if keep_width and hint is not None else feature_width(shape, hint)
        return Layer(
            name=n.name,
            kind=kind,
            op=n.op,
            inputs=[self.src(t) for t in n.signals],
            width=width,
            shape=shape,
            attrs=attrs,
        )

    def _finish(self) -> LayerGraph:
        outputs: list[str] = []
        for o in self.model.graph.output:
            layer = self.producer.get(o.name)
            if layer is None:
                self.notes.append(f"graph output {o.name!r} does not depend on the input")
            elif layer not in outputs:
                outputs.append(layer)
        if self.opset and self.opset < 7:
            self.notes.append(f"opset {self.opset} is older than 7; attribute defaults may be misread")
        kinds = {layer.kind for layer in self.layers}
        convs = [layer for layer in self.layers if layer.kind is Kind.CONV]
        meta: dict[str, Any] = {
            "opset": self.opset,
            "opsets": {o.domain or "ai.onnx": o.version for o in self.model.opset_import},
            "ir_version": self.model.ir_version,
            "producer": " ".join(
                _text(x) for x in (self.model.producer_name, self.model.producer_version) if x
            ),
            "bn_folded": bool(convs) and Kind.NORM not in kinds and any(c.bias is not None for c in convs),
        }
        return LayerGraph(
            layers=self.layers,
            inputs=list(self.sources),
            outputs=outputs,
            source=str(self.path),
            format="onnx",
            notes=self.notes,
            meta=meta,
        )


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope tensors a control-flow body reads."""
    inputs = [t for t in node.input if t]
    for a in node.attribute:
        bodies = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in bodies:
            inputs.extend(t for t in _outer_names(g) if t not in inputs)
    return inputs


def _outer_names(g: onnx.GraphProto) -> list[str]:
    local = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    outer: list[str] = []
    for node in g.node:
        for t in _node_inputs(node):
            if t not in local and t not in outer:
                outer.append(t)
        local.update(node.output)
    return outer


# --------------------------------------------------------------------------- handlers


def _unmodeled(b: _Builder, n: _Node, reason: str | None = None) -> Layer:
    reason = reason or f"{n.op} is not modeled; treated as pass-through"
    return b.passthrough(n, Kind.UNMODELED, {"reason": reason}, keep_width=False)


def _reshape(b: _Builder, n: _Node) -> Layer:
    return b.passthrough(n, Kind.RESHAPE, {}, keep_width=False)


def _stats(b: _Builder, t: str) -> TensorStats | None:
    c = b.const(t)
    return c.stats if c is not None else None


def _dense(b: _Builder, n: _Node, w: _Const, fan_in: int | None, width: int | None, **attrs: Any) -> Layer:
    return Layer(
        name=n.name,
        kind=Kind.DENSE,
        op=n.op,
        inputs=[b.src(t) for t in n.signals],
        width=width,
        fan_in=fan_in,
        fan_out=width,
        weight=w.stats,
        shape=b.shape(n.node.output[0]),
        attrs=attrs,
    )


def _gemm(b: _Builder, n: _Node) -> Layer:
    a_name, w_name, c_name = n.input(0), n.input(1), n.input(2)
    alpha = float(_attr(n.node, "alpha", 1.0))
    beta = float(_attr(n.node, "beta", 1.0))
    trans_a, trans_b = bool(_attr(n.node, "transA", 0)), bool(_attr(n.node, "transB", 0))
    if b.is_signal(a_name) and (w := b.const(w_name)) is not None and w.shape and len(w.shape) == 2:
        # Y = x B: B is (K, N), or (N, K) with transB (PyTorch's nn.Linear layout).
        fan_in, width = (w.shape[1], w.shape[0]) if trans_b else w.shape
        transposed = trans_b
    elif b.is_signal(w_name) and (w := b.const(a_name)) is not None and w.shape and len(w.shape) == 2:
        # Y = W x: A is (M, K), or (K, M) with transA.
        width, fan_in = (w.shape[1], w.shape[0]) if trans_a else w.shape
        transposed = not trans_a
    else:
        return _unmodeled(b, n, "Gemm without a constant weight is not modeled; treated as pass-through")
    layer = _dense(b, n, w, fan_in, width, weight_scale=alpha, bias_scale=beta, transposed=transposed)
    layer.weight = _scaled(w.stats, alpha)
    if c_name and not b.is_signal(c_name):
        layer.bias = _scaled(_stats(b, c_name), beta)
    return layer


def _matmul(b: _Builder, n: _Node) -> Layer:
    a_name, w_name = n.input(0), n.input(1)
    if b.is_signal(a_name) and (w := b.const(w_name)) is not None and w.shape:
        # x @ W with W (..., K, N); a vector W (K,) reduces to one unit.
        fan_in, width = (w.shape[0], 1) if len(w.shape) == 1 else (w.shape[-2], w.shape[-1])
        transposed = False
    elif b.is_signal(w_name) and (w := b.const(a_name)) is not None and w.shape:
        # W @ x with W (..., N, K): stored (out, in) like a transposed Gemm weight.
        fan_in, width = (w.shape[0], 1) if len(w.shape) == 1 else (w.shape[-1], w.shape[-2])
        transposed = True
    else:
        reason = (
            "MatMul of two signals (attention or a dynamic weight) is not modeled; treated as pass-through"
        )
        return _unmodeled(b, n, reason)
    layer = _dense(b, n, w, fan_in, width, weight_scale=1.0, transposed=transposed)
    out = n.node.output[0]
    j = b.only_consumer(out, "Add")
    if j is not None:
        bias_name = b.other_input(j, out)
        bias = b.const(bias_name) if bias_name else None
        if bias is not None and bias.count == width and bias.stats is not None and b.absorb(j):
            layer.bias = bias.stats
            layer.op = "MatMul+Add"
            layer.shape = b.shape(b.nodes[j].output[0])
    return layer


def _conv(b: _Builder, n: _Node) -> Layer:
    w = b.const(n.input(1))
    if not b.is_signal(n.input(0)) or w is None or not w.shape or len(w.shape) < 3:
        return _unmodeled(b, n, "Conv without a constant weight is not modeled; treated as pass-through")
    # W is (M, C/group, k1, k2, ...); PyTorch's fan_out ignores groups, so do we.
    kernel = list(_attr(n.node, "kernel_shape", None) or w.shape[2:])
    receptive = math.prod(w.shape[2:])
    spatial = len(w.shape) - 2
    attrs: dict[str, Any] = {
        "group": int(_attr(n.node, "group", 1)),
        "kernel_shape": [int(k) for k in kernel],
        "strides": list(_attr(n.node, "strides", None) or [1] * spatial),
        "dilations": list(_attr(n.node, "dilations", None) or [1] * spatial),
        "pads": list(_attr(n.node, "pads", None) or [0] * (2 * spatial)),
    }
    auto_pad = _attr(n.node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    return Layer(
        name=n.name,
        kind=Kind.CONV,
        op=n.op,
        inputs=[b.src(t) for t in n.signals],
        width=w.shape[0],
        fan_in=w.shape[1] * receptive,
        fan_out=w.shape[0] * receptive,
        weight=w.stats,
        bias=_stats(b, n.input(2)) if n.input(2) and not b.is_signal(n.input(2)) else None,
        shape=b.shape(n.node.output[0]),
        attrs=attrs,
    )


def _activation(name: str, **defaults: float) -> Handler:
    """Handler for an elementwise activation with float attributes ``defaults``."""

    def handler(b: _Builder, n: _Node) -> Layer:
        attrs: dict[str, Any] = {"activation": name}
        for key, default in defaults.items():
            attrs[key] = float(_attr(n.node, key, default))
        return b.passthrough(n, Kind.ACTIVATION, attrs)

    return handler


def _gelu(b: _Builder, n: _Node) -> Layer:
    approximate = _attr(n.node, "approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
    return b.passthrough(n, Kind.ACTIVATION, {"activation": "gelu", "approximate": approximate})


def _prelu(b: _Builder, n: _Node) -> Layer:
    slope = b.const(n.input(1))
    if slope is None or slope.rms is None:
        return _unmodeled(b, n, "PRelu with a computed slope is not modeled; treated as pass-through")
    return b.passthrough(
        n, Kind.ACTIVATION, {"activation": "prelu", "alpha": slope.rms, "slope": slope.stats}
    )


def _swish(b: _Builder, n: _Node) -> Layer:
    alpha = float(_attr(n.node, "alpha", 1.0))
    if alpha != 1.0:
        return _unmodeled(b, n, f"Swish with alpha={alpha:g} is not modeled; treated as pass-through")
    return b.passthrough(n, Kind.ACTIVATION, {"activation": "silu"})


def _clip(b: _Builder, n: _Node) -> Layer:
    # ReLU6 and friends: at init the pre-activations rarely reach the upper bound.
    if b.opset < 11 or n.node.attribute:
        lo, hi = _attr(n.node, "min", None), _attr(n.node, "max", None)
    else:
        lo_c, hi_c = b.const(n.input(1)), b.const(n.input(2))
        lo = lo_c.scalar() if lo_c is not None else None
        hi = hi_c.scalar() if hi_c is not None else None
    if lo is not None and lo == 0.0 and (hi is None or hi >= 1.0):
        return b.passthrough(n, Kind.ACTIVATION, {"activation": "relu", "max": hi})
    return _unmodeled(b, n, "Clip is not modeled (only Clip(min=0) is read as ReLU); treated as pass-through")


def _add(b: _Builder, n: _Node) -> Layer:
    if len(n.signals) >= 2:
        return b.passthrough(n, Kind.ADD, {})
    reason = f"{n.op} adds a constant; treated as pass-through"
    layer = _unmodeled(b, n, reason)
    if n.consts:
        layer.attrs["constant"] = n.consts[0]
    return layer


def _sub(b: _Builder, n: _Node) -> Layer:
    if len(n.signals) >= 2:
        return _unmodeled(b, n)
    layer = _unmodeled(b, n, "Sub subtracts a constant; treated as pass-through")
    layer.attrs["constant"] = n.consts[0] if n.consts else None
    return layer


def _mul(b: _Builder, n: _Node) -> Layer:
    if len(n.signals) >= 2:
        return _unmodeled(b, n, "Mul of two signals (gating) is not modeled; treated as pass-through")
    c = b.const(n.consts[0]) if n.consts else None
    value = c.rms if c is not None else None
    if value is None:
        return _unmodeled(b, n, "Mul by a constant of unknown value; treated as pass-through")
    return b.passthrough(n, Kind.SCALE, {"value": value, "constant": n.consts[0]})


def _div(b: _Builder, n: _Node) -> Layer:
    if not b.is_signal(n.input(0)) or b.is_signal(n.input(1)):
        return _unmodeled(b, n, "Div by a signal is not modeled; treated as pass-through")
    c = b.const(n.input(1))
    value = c.inverse_rms() if c is not None else None
    if value is None or not math.isfinite(value):
        return _unmodeled(b, n, "Div by a constant of unknown or zero value; treated as pass-through")
    return b.passthrough(n, Kind.SCALE, {"value": value, "constant": n.input(1)})


def _norm(norm: str, scale: int, bias: int | None, **defaults: float) -> Handler:
    """Handler for a normalization whose gamma/beta are inputs ``scale``/``bias``."""

    def handler(b: _Builder, n: _Node) -> Layer:
        attrs: dict[str, Any] = {
            "norm": norm,
            "gamma": _stats(b, n.input(scale)),
            "beta": _stats(b, n.input(bias)) if bias is not None else None,
        }
        for key, default in defaults.items():
            attrs[key] = float(_attr(n.node, key, default))
        if norm == "batch":
            attrs["running_mean"] = _stats(b, n.input(3))
            attrs["running_var"] = _stats(b, n.input(4))
        layer = b.passthrough(n, Kind.NORM, attrs)
        gamma = b.const(n.input(scale))
        if norm == "batch" and gamma is not None and gamma.count:
            layer.width = gamma.count
        return layer

    return handler


def _group_norm(b: _Builder, n: _Node) -> Layer:
    layer = _norm("group", 1, 2, epsilon=1e-5)(b, n)
    layer.attrs["num_groups"] = int(_attr(n.node, "num_groups", 1))
    return layer


def _pool(mode: str) -> Handler:
    def handler(b: _Builder, n: _Node) -> Layer:
        kernel = [int(k) for k in _attr(n.node, "kernel_shape", [])]
        attrs: dict[str, Any] = {"mode": mode, "window": math.prod(kernel) if kernel else None}
        attrs["kernel_shape"] = kernel
        attrs["strides"] = list(_attr(n.node, "strides", None) or [1] * len(kernel))
        return b.passthrough(n, Kind.POOL, attrs)

    return handler


def _global_pool(mode: str) -> Handler:
    def handler(b: _Builder, n: _Node) -> Layer:
        shape = b.shape(n.input(0))
        spatial = shape[2:] if shape is not None and len(shape) > 2 else None
        window = math.prod(spatial) if spatial and None not in spatial else None  # type: ignore[arg-type]
        return b.passthrough(n, Kind.POOL, {"mode": mode, "window": window})

    return handler


def _concat(b: _Builder, n: _Node) -> Layer:
    axis = int(_attr(n.node, "axis", 1))
    out_shape = b.shape(n.node.output[0])
    rank = len(out_shape) if out_shape is not None else None
    if rank is None:
        feature = axis in (1, -1)
    else:
        ax = axis % rank if rank else 0
        feature = ax == (rank - 1 if rank == 3 else 1)
    layer = b.passthrough(n, Kind.CONCAT, {"axis": axis}, keep_width=False)
    widths = [b.width_of(t) for t in n.signals]
    if feature and not n.consts and None not in widths:
        layer.width = sum(w for w in widths if w is not None)
    return layer


_HANDLERS: dict[str, Handler] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "ConvTranspose": lambda b, n: _unmodeled(
        b, n, "ConvTranspose is not modeled yet; treated as pass-through"
    ),
    "Relu": _activation("relu"),
    "LeakyRelu": _activation("leaky_relu", alpha=0.01),
    "PRelu": _prelu,
    "Elu": _activation("elu", alpha=1.0),
    "Selu": _activation("selu", alpha=1.67326319217681884765625, gamma=1.05070102214813232421875),
    "Gelu": _gelu,
    "Tanh": _activation("tanh"),
    "Sigmoid": _activation("sigmoid"),
    "Softplus": _activation("softplus"),
    "Swish": _swish,
    "Clip": _clip,
    "Add": _add,
    "Sum": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "BatchNormalization": _norm("batch", 1, 2, epsilon=1e-5, momentum=0.9),
    "LayerNormalization": _norm("layer", 1, 2, epsilon=1e-5),
    "InstanceNormalization": _norm("instance", 1, 2, epsilon=1e-5),
    "GroupNormalization": _group_norm,
    "RMSNormalization": _norm("rms", 1, None, epsilon=1e-5),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("global_avg"),
    "GlobalMaxPool": _global_pool("global_max"),
    "Concat": _concat,
    **dict.fromkeys(
        (
            "Dropout",
            "Identity",
            "Flatten",
            "Reshape",
            "Transpose",
            "Squeeze",
            "Unsqueeze",
            "Cast",
            "CastLike",
            "Split",  # as torch's split/chunk: each part keeps the entry law
        ),
        _reshape,
    ),
}

# ONNX Runtime's contrib ops that optimized transformer exports carry.
_CUSTOM_HANDLERS: dict[tuple[str, str], Handler] = {
    ("com.microsoft", "Gelu"): _gelu,
    ("com.microsoft", "FastGelu"): lambda b, n: b.passthrough(
        n, Kind.ACTIVATION, {"activation": "gelu", "approximate": "tanh"}
    ),
}


# --------------------------------------------------------------------------- idioms

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _match_silu(b: _Builder, i: int) -> _Group | None:
    """``Mul(x, Sigmoid(x))``: one SiLU layer."""
    node = b.nodes[i]
    if node.op_type != "Sigmoid" or node.domain not in _DEFAULT_DOMAINS or not b.is_signal(node.input[0]):
        return None
    x, s = node.input[0], node.output[0]
    j = b.only_consumer(s, "Mul")
    if j is None or b.other_input(j, s) != x:
        return None
    return _Group([i, j], x, b.nodes[j].output[0], Kind.ACTIVATION, {"activation": "silu"})


def _match_half_x(b: _Builder, w: str, x: str) -> tuple[list[int], str] | None:
    """The tail ``0.5 * x * w`` of a GELU, as two Muls in any order."""
    k = b.only_consumer(w, "Mul")
    if k is None:
        return None
    other = b.other_input(k, w)
    out_k = b.nodes[k].output[0]
    if other is None:
        return None
    if other == x:
        m = b.only_consumer(out_k, "Mul")
        if m is not None and b.near(b.other_input(m, out_k) or "", 0.5):
            return [k, m], b.nodes[m].output[0]
        return None
    if b.near(other, 0.5):
        m = b.only_consumer(out_k, "Mul")
        if m is not None and b.other_input(m, out_k) == x:
            return [k, m], b.nodes[m].output[0]
        return None
    h = b.producing(other, "Mul")
    if h is not None and b.near(b.other_input(h, x) or "", 0.5):
        return [h, k], out_k
    return None


def _match_gelu_erf(b: _Builder, i: int) -> _Group | None:
    """``0.5 * x * (1 + erf(x / sqrt 2))``, as PyTorch exports ``nn.GELU()``."""
    node = b.nodes[i]
    if node.op_type != "Erf" or node.domain not in _DEFAULT_DOMAINS:
        return None
    u = node.input[0]
    p = b.producing(u, "Div", "Mul")
    if p is None:
        return None
    pre = b.nodes[p]
    if pre.op_type == "Div" and b.near(pre.input[1], _SQRT2):
        x = pre.input[0]
    elif pre.op_type == "Mul":
        x = next((t for t in pre.input if b.is_signal(t)), "")
        if not b.near(b.other_input(p, x) or "", 1 / _SQRT2):
            return None
    else:
        return None
    tail = _match_one_plus(b, node.output[0], x)
    if not b.is_signal(x) or tail is None:
        return None
    nodes, out = tail
    return _Group([p, i, *nodes], x, out, Kind.ACTIVATION, {"activation": "gelu", "approximate": "none"})


def _match_one_plus(b: _Builder, v: str, x: str) -> tuple[list[int], str] | None:
    """``Add(v, 1)`` followed by the ``0.5 * x *`` tail."""
    j = b.only_consumer(v, "Add")
    if j is None or not b.near(b.other_input(j, v) or "", 1.0):
        return None
    tail = _match_half_x(b, b.nodes[j].output[0], x)
    return None if tail is None else ([j, *tail[0]], tail[1])


def _match_cube(b: _Builder, t: str, x: str) -> list[int] | None:
    """``x ** 3`` as ``Pow(x, 3)`` or ``Mul(Mul(x, x), x)``."""
    i = b.producing(t, "Pow", "Mul")
    if i is None:
        return None
    node = b.nodes[i]
    if node.op_type == "Pow":
        return [i] if node.input[0] == x and b.near(node.input[1], 3.0) else None
    other = b.other_input(i, x)
    sq = b.producing(other, "Mul") if other else None
    if sq is not None and list(b.nodes[sq].input) == [x, x]:
        return [i, sq]
    return None


def _match_gelu_tanh(b: _Builder, i: int) -> _Group | None:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``: the tanh-approximate GELU."""
    node = b.nodes[i]
    if node.op_type != "Tanh" or node.domain not in _DEFAULT_DOMAINS:
        return None
    m1 = b.producing(node.input[0], "Mul")
    if m1 is None:
        return None
    s = next((t for t in b.nodes[m1].input if b.is_signal(t)), "")
    if not b.near(b.other_input(m1, s) or "", _SQRT_2_OVER_PI):
        return None
    add = b.producing(s, "Add")
    if add is None:
        return None
    for x, q in (tuple(b.nodes[add].input), tuple(reversed(b.nodes[add].input))):
        m2 = b.producing(q, "Mul")
        if m2 is None or not b.is_signal(x):
            continue
        cube = next((t for t in b.nodes[m2].input if b.is_signal(t)), "")
        if not b.near(b.other_input(m2, cube) or "", 0.044715):
            continue
        cube_nodes = _match_cube(b, cube, x)
        tail = _match_one_plus(b, node.output[0], x)
        if cube_nodes is None or tail is None:
            continue
        nodes = [*cube_nodes, m2, add, m1, i, *tail[0]]
        return _Group(nodes, x, tail[1], Kind.ACTIVATION, {"activation": "gelu", "approximate": "tanh"})
    return None


def _match_layer_norm(b: _Builder, i: int) -> _Group | None:
    """The pre-opset-17 LayerNorm: mean, Sub, Pow 2, mean, Add eps, Sqrt, Div, [Mul gamma, Add beta]."""
    node = b.nodes[i]
    if node.op_type != "ReduceMean" or node.domain not in _DEFAULT_DOMAINS or not b.is_signal(node.input[0]):
        return None
    x, mean = node.input[0], node.output[0]
    sub = b.only_consumer(mean, "Sub")
    if sub is None or list(b.nodes[sub].input) != [x, mean]:
        return None
    d = b.nodes[sub].output[0]
    users = b.consumers.get(d, [])
    if len(users) != 2 or d in b.graph_outputs:
        return None
    sq = next((u for u in users if b.nodes[u].op_type in ("Pow", "Mul")), None)
    div = next((u for u in users if b.nodes[u].op_type == "Div"), None)
    if sq is None or div is None:
        return None
    sq_node = b.nodes[sq]
    if not (
        (sq_node.op_type == "Pow" and sq_node.input[0] == d and b.near(sq_node.input[1], 2.0))
        or (sq_node.op_type == "Mul" and list(sq_node.input) == [d, d])
    ):
        return None
    var = b.only_consumer(sq_node.output[0], "ReduceMean")
    if var is None:
        return None
    add_eps = b.only_consumer(b.nodes[var].output[0], "Add")
    if add_eps is None:
        return None
    eps_name = b.other_input(add_eps, b.nodes[var].output[0]) or ""
    eps_const = b.const(eps_name)
    eps = eps_const.scalar() if eps_const is not None else None
    sqrt = b.only_consumer(b.nodes[add_eps].output[0], "Sqrt")
    if eps is None or sqrt is None or list(b.nodes[div].input) != [d, b.nodes[sqrt].output[0]]:
        return None
    nodes = [i, sub, sq, var, add_eps, sqrt, div]
    out = b.nodes[div].output[0]
    attrs: dict[str, Any] = {"norm": "layer", "gamma": None, "beta": None, "epsilon": eps, "decomposed": True}
    mul = b.only_consumer(out, "Mul")
    if mul is not None and (g := b.const(b.other_input(mul, out) or "")) is not None:
        nodes.append(mul)
        out = b.nodes[mul].output[0]
        attrs["gamma"] = g.stats
    add = b.only_consumer(out, "Add")
    if add is not None and (beta := b.const(b.other_input(add, out) or "")) is not None:
        nodes.append(add)
        out = b.nodes[add].output[0]
        attrs["beta"] = beta.stats
    return _Group(nodes, x, out, Kind.NORM, attrs)


#: Between a Softmax and the MatMul that applies its weights (masking, dropout, casts, heads).
_PROBS_OPS = (
    "Cast", "CastLike", "Dropout", "Where", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose",
)  # fmt: skip
#: Between the scores MatMul and the Softmax: scaling, masks, casts, head reshapes.
_SCORE_OPS = (*_PROBS_OPS, "Add", "Sub", "Mul", "Div", "Slice", "Expand", "Clip", "Tanh")
_ATTENTION_REASON = "attention is not modeled; treated as a pass-through of its values"


def _single_signal(b: _Builder, i: int) -> str | None:
    """The one signal input of node ``i``, or None when it has none or several."""
    signals = [t for t in b.nodes[i].input if b.is_signal(t)]
    return signals[0] if len(signals) == 1 else None


def _softmax_chain(b: _Builder, t: str) -> list[int] | None:
    """Nodes from a Softmax down to ``t`` through :data:`_PROBS_OPS`, or None if ``t`` is not
    attention weights."""
    chain: list[int] = []
    while (i := b.producing(t, "Softmax", *_PROBS_OPS)) is not None and len(chain) < 16:
        chain.append(i)
        if b.nodes[i].op_type == "Softmax":
            return chain
        nxt = _single_signal(b, i)
        if nxt is None:
            return None
        t = nxt
    return None


def _match_attention(b: _Builder, i: int) -> _Group | None:
    """``MatMul(softmax(scores), v)`` (or an Einsum) of two signals: one layer passing the
    values through, as the torch frontend reads scaled_dot_product_attention. The scores'
    nodes back to the ``q k^T`` MatMul join the layer, so the query-key path ends there."""
    node = b.nodes[i]
    if node.op_type not in ("MatMul", "Einsum") or node.domain not in _DEFAULT_DOMAINS:
        return None
    ins = list(node.input)
    if len(ins) != 2 or not all(b.is_signal(t) for t in ins):
        return None
    for probs, values in ((ins[0], ins[1]), (ins[1], ins[0])):
        chain = _softmax_chain(b, probs)
        if chain is None:
            continue
        t = b.nodes[chain[-1]].input[0]  # the scores
        for _ in range(32):
            j = b.producing(t, "MatMul", "Einsum", *_SCORE_OPS)
            if j is None or j in chain:
                break
            inner = b.nodes[j]
            if inner.op_type in ("MatMul", "Einsum"):
                if len(inner.input) == 2 and all(b.is_signal(s) for s in inner.input):
                    chain.append(j)  # q k^T: the query-key path ends in this layer
                break
            nxt = _single_signal(b, j)
            if nxt is None:
                break
            chain.append(j)
            t = nxt
        attrs = {"reason": _ATTENTION_REASON, "attention": True}
        return _Group(sorted([*chain, i]), values, node.output[0], Kind.UNMODELED, attrs, at_last=True)
    return None


#: Run in order: the larger idioms first, so their Sigmoid/Mul parts are not taken by SiLU.
_MATCHERS: list[Callable[[_Builder, int], _Group | None]] = [
    _match_attention,
    _match_layer_norm,
    _match_gelu_erf,
    _match_gelu_tanh,
    _match_silu,
]
