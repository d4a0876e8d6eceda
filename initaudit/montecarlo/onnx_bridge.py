"""ONNX to ``torch.export`` for Monte Carlo, through onnx2torch, with the adapters it needs.

onnx2torch (1.5.x) turns a ModelProto into an ``fx.GraphModule``; four things stand between
that and a program Monte Carlo can run many times with fresh weights (DESIGN.md, "Loading
safely"):

1. **Import without torchvision.** onnx2torch imports torchvision at import time, only for
   its NonMaxSuppression and RoiAlign converters. PyPI's torchvision is a CUDA build that
   cannot be imported next to a CPU torch (and must never be installed here), so where the
   real import fails, onnx2torch is imported once more with a stand-in ``torchvision`` in
   ``sys.modules``; the stand-in is removed (and whatever was there before put back) right
   after, so nothing else in the process ever sees it. Models with NMS or RoiAlign are then
   refused up front, by op name.
2. **In memory, read safely.** Given a path, onnx2torch writes a shape-inferred temp copy
   beside the model. Here the file is read the way the ONNX frontend reads it
   (``onnx.load(..., load_external_data=False)``, each tensor validated and read from inside
   the model directory by onnx's guarded reader, the checker) and only a ModelProto is handed
   over.
3. **Opsets.** onnx2torch has converters up to about opset 16-17 for most ops. When an op
   has no converter at the model's opset, the model is converted down with
   ``onnx.version_converter`` (a note says so); an op no opset fixes is named in a
   :class:`ConversionError`.
4. **Initializer names.** onnx2torch renames everything: Gemm weights become ``nn.Linear``
   weights (transposed, times alpha), Conv/BatchNorm/LayerNorm inputs become module
   parameters, and every other initializer (MatMul weights, bias Adds, scales) a buffer
   ``initializers.onnx_initializer_<k>``. :func:`onnx_program` rebuilds the map from ONNX
   initializer to torch state-dict key (see :func:`_initializer_map` for how, and how equal
   tensors are told apart).

Two more fixes on the way: an initializer used by several nodes becomes one buffer per use
in onnx2torch (a tied weight would be untied by resampling), so the copies are merged back
into one; and float initializers that act as weights (the operand of a MatMul, Add, Mul,
Gather...) are made ``nn.Parameter``\\ s, so that a program's parameters are exactly what
resampling should redraw, and buffers (BatchNorm statistics, shapes, exponents, Resize
scales) what it must keep.

Last, the export. onnx2torch's shape ops (Reshape, Slice, Expand, Unsqueeze...) read their
shape operands' *values* in Python (``.tolist()``, ``.numpy()``, ``torch.Size(t)``), which
torch.export, tracing with fake tensors, cannot follow. The program is exported for one input
shape, so those operands are constants: first the ONNX graph's constant subgraphs (shapes
included) are evaluated with onnx's reference evaluator (:func:`_fold_constants`; this also
removes ops onnx2torch lacks, such as the ``Trilu`` of GPT-2's causal mask), then each module
still reading a constant operand is traced on its own with real values and replaced by the
trace (:func:`_specialize`). Should export still meet a data-dependent guard, it is retried
with real values propagated beside the fake ones, and the asserts left behind are dropped
once shown to test constants only. The program is then checked against onnx2torch's own
module on a second input (:func:`_verify`): anything that silently fixed a value of the
signal fails there, loudly.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import sys
import threading
import types
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from onnx.reference import ReferenceEvaluator

from initaudit.errors import InitauditError, LoadError, UsageError
from initaudit.frontends import onnx_model as _om
from initaudit.frontends.torch_graph import quiet_tracers, tensor_leaves

if TYPE_CHECKING:
    from torch import fx, nn
    from torch.export import ExportedProgram

#: The highest opset onnx2torch 1.5 covers for most ops: where to convert a newer model down to.
SUPPORTED_OPSET = 17
#: Down-conversion stops here: older opsets never gain a converter a newer one lacks.
_LOWEST_TARGET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")
_TORCHVISION = ("torchvision", "torchvision.ops")
_TORCHVISION_OPS = ("NonMaxSuppression", "RoiAlign")
_IN_MEMORY = "<in-memory ModelProto>"
#: Constants folded before conversion are at most this many elements (masks, shapes).
_FOLD_LIMIT = 1 << 24
#: A private domain that hides nodes from onnx.version_converter (see _convert_version).
_SHIELD = "ai.initaudit.shield"
#: Ops whose down-conversion from opset 18+ is a no-op for onnx2torch, or a rewrite done here.
_SHIELDABLE = (
    "Split",
    "ConstantOfShape",
    "Cast",
    "CastLike",
    "Identity",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Shape",
    "Size",
    "Constant",
)
_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)

#: (ONNX op, input index) -> the attribute name the converted module stores it under.
#: Decides which of two equal candidate tensors inside one module is which (see _initializer_map).
_ROLES: dict[str, dict[int, str]] = {
    "Gemm": {1: "weight", 2: "bias"},
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
}
#: (ONNX op, input indices, None for all) where a float initializer is a weight of the network.
_WEIGHT_INPUTS: dict[str, tuple[int, ...] | None] = {
    "MatMul": None,
    "Gemm": None,
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Add": None,
    "Sub": None,
    "Mul": None,
    "Div": (0,),
    "Sum": None,
    "Einsum": None,
    "Concat": None,
    "Gather": (0,),
    "PRelu": (1,),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}
#: Ops that pass a tensor's values on unchanged in substance (input 0): a weight stays a weight.
_PASS_THROUGH = (
    "Identity",
    "Cast",
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Expand",
    "Tile",
    "Slice",
    "Split",
)
#: Ops torch.export leaves behind for data-dependent guards; safe to drop when on constants.
_ASSERT_OPS = ("_assert_scalar", "_assert_async", "sym_constrain_range", "sym_constrain_range_for_size")

_import_lock = threading.Lock()
_torchvision_stubbed = False


class ConversionError(InitauditError):
    """The ONNX graph cannot be run in PyTorch: Monte Carlo is skipped, the analytic report stays.

    ``op`` is the ONNX op type at fault (``domain::op`` outside the default domain) and
    ``node`` the node's name, where known.
    """

    def __init__(self, problem: str, *, op: str | None = None, node: str | None = None) -> None:
        self.problem = problem
        self.op = op
        self.node = node
        super().__init__(f"cannot run the ONNX model in PyTorch for Monte Carlo: {problem}")


# --------------------------------------------------------------------------- public


def onnx_program(
    model: str | Path | onnx.ModelProto,
    input_shape: tuple[int, ...] | None = None,
    *,
    notes: list[str] | None = None,
    value_nodes: dict[str, str] | None = None,
) -> tuple[ExportedProgram, dict[str, str]]:
    """An ONNX model as a ``torch.export`` program, and ``{ONNX initializer -> state-dict key}``.

    ``input_shape`` fixes the first input's shape (as ``--input-shape`` does for the ONNX
    frontend); without it a symbolic batch dimension is 1 and any other symbolic dimension
    is a :class:`UsageError`. The program is exported for exactly these shapes, in eval mode
    (BatchNormalization uses its running statistics, as ONNX does).

    In the map, the key is the name of the initializer (or Constant node output) in the ONNX
    graph and the value its tensor's key in ``program.state_dict``; a Gemm weight is stored
    transposed and times alpha there, a bias times beta. Initializers that onnx2torch folds
    into module attributes (axes, perms, Clip bounds) have no tensor and no entry.

    ``notes`` receives one line per adaptation (opset down-conversion, untied copies,
    ambiguous matches). ``value_nodes``, when given, is filled with ``{ONNX value name -> name
    of the node of program.graph_module.graph that computes it}``, for every node output the
    program computes: the taps for ONNX layers (the value a layer of initaudit's ONNX frontend
    stands for is its ``attrs["onnx_value"]``).

    Raises :class:`LoadError` for a file that cannot be read safely, :class:`UsageError` for a
    shape that does not fit, :class:`ConversionError` naming the op for anything onnx2torch
    or torch.export cannot handle.
    """
    notes = notes if notes is not None else []
    proto, source = _read(model)
    inputs = _example_inputs(proto, source, input_shape)
    probe = _example_inputs(proto, source, input_shape, seed=1)
    _decompose_gelu(proto)
    _reshape_edge_flattens(proto)
    _fold_constant_nodes(proto)
    computed = _fold_constants(proto, notes)
    o2t = _import_onnx2torch()
    proto = _convertible(proto, notes)
    _refuse_torchvision_ops(proto)
    module, onnx_nodes = _convert(o2t, proto)
    module.eval()
    with torch.no_grad():
        init_map = _initializer_map(module, proto, onnx_nodes, notes, computed)
        try:
            with quiet_tracers():
                expected = [module(*inputs), module(*probe)]
            _specialize(module, inputs, onnx_nodes)
        except Exception as exc:  # onnx2torch's own module fails to run
            raise _locate_failure(module, onnx_nodes, exc, "PyTorch cannot run") from None
    program = _export(module, inputs, onnx_nodes)
    _verify(program, [inputs, probe], expected)
    state = program.state_dict
    # Folded masks and shapes are no initializers of the file: they stay out of the map.
    init_map = {name: key for name, key in init_map.items() if key in state and name not in computed}
    if value_nodes is not None:
        value_nodes.update(_value_nodes(program, proto, onnx_nodes))
    return program, init_map


# --------------------------------------------------------------------------- reading


def _read(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A self-contained copy of the model (no external data left), checked."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)  # the caller's proto is not touched
        p = Path(_IN_MEMORY)
        for t in _all_tensors(proto):
            if uses_external_data(t):
                raise LoadError(
                    _IN_MEMORY,
                    f"tensor {t.name!r} has external data: pass the file path, so that it is read "
                    "from inside the model directory",
                )
            _om._check_tensor(p, t)
        try:
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise LoadError(_IN_MEMORY, f"fails the ONNX checker: {_om._one_line(exc)}") from None
        return proto, _IN_MEMORY
    p = Path(model)
    proto = _om._read_model(p)
    graph = proto.graph
    for i, t in enumerate(graph.initializer):
        # Validated and read from inside the model directory (traversal and links refused).
        array = _om._to_array(p, t)
        if uses_external_data(t):
            graph.initializer[i].CopyFrom(_inline(array, t))
        del array
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and uses_external_data(a.t):
                a.t.CopyFrom(_inline(_om._to_array(p, a.t), a.t))
    left = [t.name for t in _all_tensors(proto) if uses_external_data(t)]
    if left:  # in a subgraph: onnx2torch would read it relative to the working directory
        raise LoadError(p, f"tensor {left[0]!r} inside a subgraph has external data (not supported)")
    _om._check(p, proto)
    return proto, str(p)


def _inline(array: np.ndarray, t: TensorProto) -> TensorProto:
    inline = numpy_helper.from_array(array, t.name)
    if inline.data_type != t.data_type:  # bfloat16 and friends come back as wider numpy types
        inline = helper.make_tensor(t.name, t.data_type, list(t.dims), array.reshape(-1).tolist())
    return inline


def _all_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    def walk(g: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from walk(sub)

    return walk(proto.graph)


def _example_inputs(
    proto: onnx.ModelProto, source: str, input_shape: tuple[int, ...] | None, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """An input of every real input's shape and type (the first input's shape from
    ``input_shape``): standard normal floats from ``seed``, zeros otherwise (a valid token id)."""
    generator = torch.Generator().manual_seed(seed)
    init_names = {t.name for t in proto.graph.initializer}
    real = [vi.name for vi in proto.graph.input if vi.name not in init_names]
    shapes = _om._fix_input_shapes(Path(source), proto, real, input_shape)
    by_name = {vi.name: vi for vi in proto.graph.input}
    example = []
    for name in real:
        dims = shapes[name]
        if dims is None or None in dims:
            shown = "?" if dims is None else "x".join("?" if d is None else str(d) for d in dims)
            raise UsageError(
                f"{source}: input {name!r} has an open shape ({shown}); give it with --input-shape"
            )
        elem = by_name[name].type.tensor_type.elem_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
            value = torch.from_numpy(np.zeros(dims, dtype=dtype))
            if value.is_floating_point():
                value = torch.randn(dims, generator=generator, dtype=torch.float64).to(value.dtype)
            example.append(value)
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"input {name!r} has element type {TensorProto.DataType.Name(elem)}, which torch cannot feed"
            ) from None
    return tuple(example)


def _decompose_gelu(proto: onnx.ModelProto) -> None:
    """Gelu (opset 20, what torch.onnx.export writes for nn.GELU) as the opset-17 exporters'
    nodes: onnx2torch has no converter for it, nor onnx.version_converter a way down. The last
    node keeps the Gelu's output name, so the layer's tap stays on the same value."""
    graph = proto.graph
    if not any(n.op_type == "Gelu" and n.domain in _DEFAULT_DOMAINS for n in graph.node):
        return
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.input, *graph.value_info)}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in _DEFAULT_DOMAINS:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        base = node.name or y
        approximate = next((a.s for a in node.attribute if a.name == "approximate"), b"none")
        dtype = types.get(x) or TensorProto.FLOAT  # the constants' type must be x's
        steps: list[tuple[str, list[str | float]]] = (
            [("Div", [x, math.sqrt(2.0)]), ("Erf", [0])]
            if approximate != b"tanh"
            else [
                ("Pow", [x, 3.0]),
                ("Mul", [0, 0.044715]),
                ("Add", [x, 0]),
                ("Mul", [0, math.sqrt(2.0 / math.pi)]),
                ("Tanh", [0]),
            ]
        )
        steps += [("Add", [0, 1.0]), ("Mul", [x, 0]), ("Mul", [0, 0.5])]
        previous = ""
        for k, (op, args) in enumerate(steps):
            inputs = []
            for j, arg in enumerate(args):
                if isinstance(arg, float):
                    const = f"{base}/gelu_{k}_c{j}"
                    value = helper.make_tensor(const, dtype, [], [arg])
                    nodes.append(helper.make_node("Constant", [], [const], name=const, value=value))
                    inputs.append(const)
                else:
                    inputs.append(previous if arg == 0 else arg)
            out = y if k == len(steps) - 1 else f"{base}/gelu_{k}"
            nodes.append(helper.make_node(op, inputs, [out], name=f"{base}/gelu_{k}"))
            previous = out
    del graph.node[:]
    graph.node.extend(nodes)


def _reshape_edge_flattens(proto: onnx.ModelProto) -> None:
    """Flatten at axis 0 or at axis = rank (shapes (1, n) and (n, 1), both valid ONNX) as a
    Reshape: onnx2torch's module flattens past the last dimension there and fails. BERT's
    export of an attention mask has one."""
    graph = proto.graph
    if not any(n.op_type == "Flatten" and n.domain in _DEFAULT_DOMAINS for n in graph.node):
        return
    static = _static_shapes(proto)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        dims = static.get(node.input[0]) if node.op_type == "Flatten" and node.input else None
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        if dims is not None and axis < 0:
            axis += len(dims)
        if dims is None or node.domain not in _DEFAULT_DOMAINS or axis not in (0, len(dims)):
            nodes.append(node)
            continue
        target = f"{node.output[0]}/shape"
        value = numpy_helper.from_array(np.array([1, -1] if axis == 0 else [-1, 1], dtype=np.int64), target)
        nodes.append(helper.make_node("Constant", [], [target], name=target, value=value))
        nodes.append(helper.make_node("Reshape", [node.input[0], target], list(node.output), name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _fold_constant_nodes(proto: onnx.ModelProto) -> None:
    """Constant nodes holding a tensor become initializers: onnx2torch absorbs a Conv weight
    only from an initializer, and the map then names it by the Constant's output."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if (
            node.op_type == "Constant"
            and node.domain in _DEFAULT_DOMAINS
            and set(attrs) == {"value"}
            and node.output[0] not in outputs
        ):
            t = TensorProto()
            t.CopyFrom(attrs["value"].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a node reads, also from inside If/Loop bodies (outer-scope references)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                used |= _used_names(sub)
    return used


def _fold_constants(proto: onnx.ModelProto, notes: list[str]) -> set[str]:
    """Evaluate, with onnx's reference evaluator, the nodes whose inputs are all known now.

    Known: initializers, and shapes, since the program is exported for one input shape (so
    ``Shape`` is a constant). This removes whole subgraphs onnx2torch cannot convert or
    torch.export cannot trace, such as GPT-2's causal mask (``Trilu`` of a tensor sized by
    ``Shape``), and leaves less for :func:`_specialize`. Computations on weights stay in
    the graph (folding ``Transpose(W)`` would untie W from its other uses), except where
    onnx2torch needs the result as an initializer: a Conv weight or bias given by an
    ``Identity`` alias (exporters alias equal tensors, such as the zero biases) or by weight
    normalization. Those become tensors of their own, and a note says so.

    Returns the names of the other folded values (masks, shapes): never weights.
    """
    graph = proto.graph
    weights = _weights(graph)
    needed: set[str] = set()  # values onnx2torch wants as initializers
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.domain in _DEFAULT_DOMAINS:
            needed.update(node.input[1:3])
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            needed.update(node.input)
    static = _static_shapes(proto)
    inits = {t.name: t for t in graph.initializer}
    folded: dict[str, np.ndarray] = {}
    outputs = {o.name for o in graph.output}
    opsets = _opsets(proto)
    derived = set(weights)
    materialized: list[str] = []
    keep: list[onnx.NodeProto] = []

    def value(name: str) -> np.ndarray:
        return folded[name] if name in folded else numpy_helper.to_array(inits[name])

    for node in graph.node:
        ins = [i for i in node.input if i]
        constant_inputs = all(i in inits or i in folded for i in ins)
        shape_only = node.op_type in ("Shape", "Size")
        from_weights = constant_inputs and not shape_only and any(i in derived for i in ins)
        if from_weights:
            derived.update(node.output)
        result: list[np.ndarray] | None = None
        foldable = (
            node.domain in _DEFAULT_DOMAINS
            and not any(o in outputs for o in node.output)
            and not any(a.type in _SUBGRAPH_ATTRS for a in node.attribute)
            and not node.op_type.startswith("Random")
            and node.op_type not in ("Multinomial", "Bernoulli", "Dropout")
        )
        if foldable and shape_only and ins and ins[0] in static:
            dims = np.array(static[ins[0]], dtype=np.int64)
            if node.op_type == "Size":
                result = [np.array(int(np.prod(dims)), dtype=np.int64)]
            else:
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                result = [dims[attrs.get("start", 0) : attrs.get("end", len(dims))]]
        elif foldable and constant_inputs and (not from_weights or any(o in needed for o in node.output)):
            with contextlib.suppress(Exception):
                evaluator = ReferenceEvaluator(node, opsets={"": opsets.get("", 1)})
                result = list(evaluator.run(None, {i: value(i) for i in ins}))
        small = result is not None and (from_weights or sum(r.size for r in result) <= _FOLD_LIMIT)
        if not small or result is None or len(result) != len([o for o in node.output if o]):
            keep.append(node)
            continue
        for name, array in zip([o for o in node.output if o], result, strict=True):
            folded[name] = np.asarray(array)
            graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
            if from_weights:
                materialized.append(name)
    if len(keep) == len(graph.node):
        return set()
    del graph.node[:]
    graph.node.extend(keep)
    used = _used_names(graph) | outputs
    unused = [i for i, t in enumerate(graph.initializer) if t.name not in used]
    for i in reversed(unused):
        del graph.initializer[i]
    listed = {t.name for t in graph.initializer}
    for i in reversed([i for i, vi in enumerate(graph.input) if vi.name in inits and vi.name not in listed]):
        del graph.input[i]  # IR < 4 lists initializers as inputs too
    if materialized:
        shown = ", ".join(repr(n) for n in materialized[:3]) + (" ..." if len(materialized) > 3 else "")
        notes.append(
            f"{len(materialized)} Conv weight(s) computed in the graph ({shown}: aliases or weight "
            "normalization) became tensors of their own; resampling draws them independently"
        )
    return set(folded) - set(materialized)


# --------------------------------------------------------------------------- onnx2torch


def _import_onnx2torch() -> types.ModuleType:
    """onnx2torch, importable whether torchvision is absent, broken or fine (module docstring)."""
    global _torchvision_stubbed
    with _import_lock:
        loaded = sys.modules.get("onnx2torch")
        if loaded is not None and hasattr(loaded, "convert"):
            return loaded
        try:
            return importlib.import_module("onnx2torch")
        except ModuleNotFoundError as exc:
            if exc.name == "onnx2torch":
                raise ConversionError(
                    "onnx2torch is not installed (pip install --no-deps onnx2torch)"
                ) from None
            first = exc
        except Exception as exc:  # a broken torchvision raises anything: RuntimeError, OSError...
            first = exc
        _forget("onnx2torch")
        saved = {name: sys.modules[name] for name in _TORCHVISION if name in sys.modules}
        sys.modules.update(_torchvision_stub())
        try:
            module = importlib.import_module("onnx2torch")
        except Exception as exc:
            _forget("onnx2torch")
            raise ConversionError(
                f"onnx2torch cannot be imported ({_om._one_line(exc)}; first try: {_om._one_line(first)})"
            ) from None
        finally:
            for name in _TORCHVISION:
                if name in saved:
                    sys.modules[name] = saved[name]
                else:
                    sys.modules.pop(name, None)
        _torchvision_stubbed = True
        return module


def _forget(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """Just the names onnx2torch's NMS and RoiAlign converters take at import time."""

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchvision is not available: NonMaxSuppression and RoiAlign cannot run")

    root = types.ModuleType("torchvision", "initaudit's stand-in while onnx2torch is imported")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = unavailable  # type: ignore[attr-defined]
    root.ops = ops  # type: ignore[attr-defined]
    root.__path__ = []  # a package, so that `from torchvision.ops import ...` resolves
    return {"torchvision": root, "torchvision.ops": ops}


def _refuse_torchvision_ops(proto: onnx.ModelProto) -> None:
    if not _torchvision_stubbed:
        return
    for node in proto.graph.node:
        if node.op_type in _TORCHVISION_OPS and node.domain in _DEFAULT_DOMAINS:
            raise ConversionError(
                f"op {node.op_type} (node {node.name!r}) needs torchvision, which is missing or broken here",
                op=node.op_type,
                node=node.name,
            )


def _registry() -> Any:
    return importlib.import_module("onnx2torch.node_converters.registry")


def _opsets(proto: onnx.ModelProto) -> dict[str, int]:
    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in proto.opset_import}
    return opsets


def _missing(proto: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """(domain, op, opset) of every top-level node onnx2torch has no converter for, once each."""
    registry = _registry()
    opsets = _opsets(proto)
    missing: list[tuple[str, str, int]] = []
    for node in proto.graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""  # onnx2torch looks opsets up by the literal domain
        version = opsets.get(node.domain, 1)
        try:
            registry.get_converter(operation_type=node.op_type, version=version, domain=node.domain)
        except NotImplementedError:
            key = (node.domain, node.op_type, version)
            if key not in missing:
                missing.append(key)
    return missing


def _op_name(domain: str, op: str) -> str:
    return f"{domain}::{op}" if domain else op


def _convertible(proto: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """The model, converted to an older opset where onnx2torch lacks a converter at its own."""
    missing = _missing(proto)
    if not missing:
        return proto
    names = ", ".join(f"{_op_name(d, op)} (opset {v})" for d, op, v in missing[:5])
    first = missing[0]
    custom = [m for m in missing if m[0]]
    if custom:
        d, op, _ = custom[0]
        raise ConversionError(
            f"op {_op_name(d, op)} is not a standard ONNX op; onnx2torch has no converter for it",
            op=_op_name(d, op),
            node=_node_name(proto, d, op),
        )
    registered = {(d.domain, d.operation_type) for d in _registry()._CONVERTER_REGISTRY}
    unknown = [(d, op) for d, op, _ in missing if (d, op) not in registered]
    if unknown:  # at no opset: converting down cannot help
        d, op = unknown[0]
        raise ConversionError(
            f"onnx2torch has no converter for op {_op_name(d, op)} (at any opset)",
            op=_op_name(d, op),
            node=_node_name(proto, d, op),
        )
    opset = _opsets(proto).get("", 0)
    failure = ""
    for target in range(min(opset - 1, SUPPORTED_OPSET), _LOWEST_TARGET - 1, -1):
        try:
            converted = _convert_version(proto, target)
        except Exception as exc:
            reason = _om._one_line(exc, 400).rsplit("failed: ", 1)[-1]
            failure = f"; onnx.version_converter cannot take it to opset {target} ({reason[:160]})"
            break
        if not _missing(converted):
            notes.append(
                f"converted from opset {opset} to {target} with onnx.version_converter: onnx2torch "
                f"has no converter for {names}"
            )
            return converted
    raise ConversionError(
        f"onnx2torch has no converter for op {names}{failure}",
        op=first[1],
        node=_node_name(proto, first[0], first[1]),
    )


def _convert_version(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``onnx.version_converter``, past the ops it has no down-adapter for.

    For ops whose newer versions only add element types (ConstantOfShape-20/21, Cast-19...)
    or an attribute a small rewrite removes (Split-18's ``num_outputs``), the nodes are moved
    to a private domain while the converter runs (it leaves other domains alone) and put
    back after, as they are: onnx2torch's older converter reads them the same way."""
    shielded: set[str] = set()
    while True:
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        if shielded:
            static = _static_shapes(work) if "Split" in shielded else {}
            for node in work.graph.node:
                if node.op_type in shielded and node.domain in _DEFAULT_DOMAINS:
                    if node.op_type == "Split":
                        _split_without_num_outputs(work.graph, node, static)
                    node.domain = _SHIELD
            work.opset_import.append(helper.make_opsetid(_SHIELD, 1))
        try:
            converted = onnx.version_converter.convert_version(work, target)
        except Exception as exc:
            match = re.search(r"No Adapter (?:From|To) Version \$?\d+ for (\w+)", str(exc))
            if match is None or match.group(1) not in _SHIELDABLE or match.group(1) in shielded:
                raise
            shielded.add(match.group(1))
            continue
        for node in converted.graph.node:
            if node.domain == _SHIELD:
                node.domain = ""
        kept = [o for o in converted.opset_import if o.domain != _SHIELD]
        del converted.opset_import[:]
        converted.opset_import.extend(kept)
        return converted


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True).graph
    except Exception:
        return {}
    return {
        vi.name: dims
        for vi in (*inferred.input, *inferred.value_info, *inferred.output)
        if (dims := _om._dims_of(vi)) is not None and None not in dims
    }


def _split_without_num_outputs(
    graph: onnx.GraphProto, node: onnx.NodeProto, static: dict[str, tuple[int, ...]]
) -> None:
    """Split-18 ``num_outputs=n`` as Split-13 reads it: chunks of ceil(d/n), the last smaller,
    given as a ``split`` input where the size along the axis is known."""
    attrs = {a.name: a for a in node.attribute}
    if "num_outputs" not in attrs:
        return
    count = int(attrs["num_outputs"].i)
    axis = int(attrs["axis"].i) if "axis" in attrs else 0
    kept = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)
    dims = static.get(node.input[0])
    if (len(node.input) > 1 and node.input[1]) or dims is None:
        return  # sizes given, or an equal split, which Split-13 does by itself
    size = dims[axis % len(dims)]
    chunk = -(-size // count)
    sizes = [chunk] * (count - 1) + [size - chunk * (count - 1)]
    name = f"{node.output[0]}__split_sizes"
    graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
    if len(node.input) > 1:
        node.input[1] = name
    else:
        node.input.append(name)


def _node_name(proto: onnx.ModelProto, domain: str, op: str) -> str | None:
    return next((n.name for n in proto.graph.node if n.op_type == op and n.domain == domain), None)


def _convert(
    o2t: types.ModuleType, proto: onnx.ModelProto
) -> tuple[fx.GraphModule, dict[str, onnx.NodeProto]]:
    """onnx2torch's GraphModule (from the in-memory proto) and {module name -> ONNX node}."""
    from onnx2torch.onnx_graph import OnnxGraph

    with quiet_tracers():
        try:
            module = o2t.convert(proto, attach_onnx_mapping=True)
        except Exception as exc:
            raise _locate_conversion_failure(o2t, proto, exc) from None
    names = [OnnxGraph.generate_node_name(n) for n in proto.graph.node]
    counts: dict[str, int] = {}
    onnx_nodes: dict[str, onnx.NodeProto] = {}
    for name, node in zip(names, proto.graph.node, strict=True):  # onnx2torch's own unique names
        k = counts.get(name, 0)
        counts[name] = k + 1
        onnx_nodes[name if k == 0 else f"{name}_{k}"] = node
    return module, onnx_nodes


def _locate_conversion_failure(
    o2t: types.ModuleType, proto: onnx.ModelProto, exc: Exception
) -> ConversionError:
    """Run each node's converter on its own to name the one that failed."""
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    problem = _om._one_line(exc)
    with contextlib.suppress(Exception):
        graph = OnnxGraph(safe_shape_inference(proto).graph)
        opsets = _opsets(proto)
        for node in graph.nodes.values():
            converter = _registry().get_converter(
                operation_type=node.operation_type, version=opsets.get(node.domain, 1), domain=node.domain
            )
            try:
                converter(node, graph)
            except Exception as inner:
                op = _op_name(node.domain, node.operation_type)
                reason = _om._one_line(inner)
                if isinstance(inner, KeyError) and inner.args and inner.args[0] in node.input_values:
                    # onnx2torch reads Conv weights and the like from initializers only.
                    reason = f"it needs input {inner.args[0]!r} as an initializer, but the graph computes it"
                return ConversionError(
                    f"onnx2torch cannot convert node {node.name!r} (op {op}): {reason}",
                    op=op,
                    node=node.name,
                )
    return ConversionError(f"onnx2torch failed: {problem}")


# --------------------------------------------------------------------------- initializers


def _uses(
    module: fx.GraphModule, onnx_nodes: dict[str, onnx.NodeProto], inits: dict[str, TensorProto]
) -> list[tuple[str, str, Any]]:
    """(module name, initializer name, get_attr node) for every initializer onnx2torch
    passes to a module at run time (as a buffer of its ``initializers`` container).

    A converted module's arguments are its ``onnx_mapping.inputs`` in order (those after a
    missing optional input as keyword arguments, still in order), so the get_attr arguments
    line up with the mapping's initializer inputs. Should they not, each buffer is matched by
    value among that node's initializers: a weight left unmapped would be taken for a
    constant and burnt into the program, never resampled."""
    uses = []
    for fx_node in module.graph.nodes:
        if fx_node.op != "call_module" or str(fx_node.target) not in onnx_nodes:
            continue
        mapping = getattr(module.get_submodule(str(fx_node.target)), "onnx_mapping", None)
        if mapping is None:
            continue
        wanted = [name for name in mapping.inputs if name in inits]
        attrs = [a for a in (*fx_node.args, *fx_node.kwargs.values()) if getattr(a, "op", None) == "get_attr"]
        if len(wanted) == len(attrs):
            pairs = list(zip(wanted, attrs, strict=True))
        else:
            pairs = []
            for attr in attrs:
                tensor = module.get_buffer(str(attr.target))
                name = next((n for n in wanted if _same(tensor, numpy_helper.to_array(inits[n]))), None)
                if name is not None:
                    wanted.remove(name)
                    pairs.append((name, attr))
        uses.extend((str(fx_node.target), name, attr) for name, attr in pairs)
    return uses


def _initializer_map(
    module: fx.GraphModule,
    proto: onnx.ModelProto,
    onnx_nodes: dict[str, onnx.NodeProto],
    notes: list[str],
    computed: AbstractSet[str] = frozenset(),
) -> dict[str, str]:
    """{ONNX initializer -> state-dict key}, merging duplicate buffers and promoting weights.

    Matching is local, never global: zero biases, unit BatchNorm gammas and unit variances are
    all equal to each other, so matching values across the whole model would be hopeless.

    - An initializer onnx2torch passes at run time is a get_attr argument of the call of the
      module converted from the consuming node: it is found by position (see :func:`_uses`)
      and then checked to hold exactly the initializer's values.
    - An initializer a converter absorbs into its module (Gemm, Conv, the norms) is one of
      that module's own tensors: the one equal to it, or to its transpose, or (Gemm) to it
      times alpha or beta. Two equal candidates in one module (a BatchNorm at init: gamma =
      running_var = 1, beta = running_mean = 0) are told apart by the attribute the op's
      input becomes (:data:`_ROLES`); failing that, the first candidate in state-dict order
      is taken and a note says so.

    A tensor used by several nodes appears once per use: copies in the container are merged
    into one buffer (ties survive resampling); copies inside modules cannot be (they may be
    transposed), the map names the first and a note says resampling unties them.
    """

    graph = proto.graph
    # Read one array at a time when needed: a second copy of every weight is gigabytes.
    inits = {t.name: t for t in graph.initializer}
    # fx drops the container when no initializer is passed at run time (all absorbed).
    container = getattr(module, "initializers", None)
    keys: dict[str, list[str]] = {}

    # Run-time initializers: one buffer per use; merge the copies.
    uses = _uses(module, onnx_nodes, inits)
    runtime = {(mod_name, name) for mod_name, name, _attr in uses}
    for _mod_name, name, attr in uses:
        target = str(attr.target)
        tensor = module.get_buffer(target)
        if not _same(tensor, numpy_helper.to_array(inits[name])):
            notes.append(f"initializer {name!r} does not match its torch buffer {target!r}; left unmapped")
            continue
        first = keys.setdefault(name, [target])[0]
        if first != target:
            attr.target = first
            container._buffers.pop(target.split(".", 1)[1], None)
    module.graph.lint()
    module.recompile()

    # Absorbed initializers: among the module's own tensors.
    modules = dict(module.named_children())
    for mod_name, onnx_node in onnx_nodes.items():
        sub = modules.get(mod_name)
        if sub is None:
            continue
        own = {
            f"{mod_name}.{k}": v
            for k, v in sub.state_dict().items()
            if v.is_floating_point() and not k.endswith("num_batches_tracked")
        }
        if not own:
            continue
        taken: set[str] = set()
        roles = _ROLES.get(onnx_node.op_type, {})
        for index, name in enumerate(onnx_node.input):
            if name not in inits or inits[name].data_type not in _om._FLOAT_TYPES:
                continue
            if (mod_name, name) in runtime:
                continue
            array = numpy_helper.to_array(inits[name])
            candidates = [
                k for k, v in own.items() if k not in taken and _matches(v, array, onnx_node, index)
            ]
            if not candidates:
                continue
            role = roles.get(index)
            by_role = [k for k in candidates if role is not None and k.rsplit(".", 1)[-1] == role]
            key = by_role[0] if by_role else candidates[0]
            if len(candidates) > 1 and not by_role:
                notes.append(
                    f"initializer {name!r} equals {len(candidates)} tensors of {mod_name!r} "
                    f"({', '.join(candidates)}); mapped to the first"
                )
            taken.add(key)
            keys.setdefault(name, []).append(key)

    # Weights become parameters, so that resampling redraws exactly the program's parameters.
    for name in _weights(graph) - computed:
        target = keys.get(name, [""])[0]
        if target.startswith("initializers.") and torch.is_floating_point(module.get_buffer(target)):
            attr = target.split(".", 1)[1]
            tensor = container._buffers.pop(attr)
            container.register_parameter(attr, torch.nn.Parameter(tensor))

    untied = {name: ks for name, ks in keys.items() if len(ks) > 1}
    for name, ks in list(untied.items())[:5]:
        notes.append(
            f"initializer {name!r} is copied into {len(ks)} torch tensors ({', '.join(ks)}); "
            f"the map names {ks[0]!r}, and resampling draws the copies independently"
        )
    if len(untied) > 5:
        notes.append(f"... and {len(untied) - 5} more initializers copied into several torch tensors")
    mapped = {name: ks[0] for name, ks in keys.items()}
    for node in graph.node:  # exporters alias shared tensors (one zero bias for all) by Identity
        if node.op_type == "Identity" and node.input and node.input[0] in mapped:
            mapped.setdefault(node.output[0], mapped[node.input[0]])
    return mapped


def _weights(graph: onnx.GraphProto) -> set[str]:
    """Float initializers that are weights of the network: every use, followed through
    value-preserving ops (Identity, Transpose, Cast...), is an operand of a compute op
    (:data:`_WEIGHT_INPUTS`), never a shape, an exponent, a bound or a norm statistic."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    def weight(value: str, depth: int = 0) -> bool:
        uses = consumers.get(value, [])
        if not uses or depth > 16:
            return False
        for node, index in uses:
            if node.domain not in _DEFAULT_DOMAINS:
                return False
            if node.op_type in ("Shape", "Size"):
                continue  # reads the shape only
            if node.op_type in _PASS_THROUGH and index == 0:
                if not weight(node.output[0], depth + 1):
                    return False
                continue
            allowed = _WEIGHT_INPUTS.get(node.op_type, ())
            if allowed is not None and index not in allowed:
                return False
        return True

    return {
        t.name
        for t in graph.initializer
        if t.data_type in _om._FLOAT_TYPES and weight(t.name) and not _is_mask(t)
    }


def _is_mask(t: TensorProto) -> bool:
    """A tensor of zeros and ones, both present: a mask to multiply by, not a weight (no
    initializer draws exactly those two values). Most weights fail on the first element."""
    if math.prod(t.dims) < 2:
        return False
    array = numpy_helper.to_array(t)
    first = array.flat[0]
    if first != 0 and first != 1:
        return False
    values = np.unique(array)
    return values.size == 2 and values[0] == 0 and values[1] == 1


def _same(tensor: torch.Tensor, array: np.ndarray) -> bool:
    other = torch.from_numpy(np.array(array, copy=True))
    return tuple(tensor.shape) == tuple(other.shape) and bool(
        torch.equal(tensor.cpu(), other.to(tensor.dtype))
    )


def _matches(tensor: torch.Tensor, array: np.ndarray, node: onnx.NodeProto, index: int) -> bool:
    """Whether a module's tensor holds the initializer: as is, transposed, or Gemm-scaled
    (computed exactly as onnx2torch computes it, so equality is exact)."""

    w = torch.from_numpy(np.array(array, copy=True))
    forms = [w]
    if w.ndim == 2:
        forms.append(w.T)
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        factor = attrs.get("alpha", 1.0) if index == 1 else attrs.get("beta", 1.0)
        forms += [f * factor for f in list(forms)]
    for f in forms:
        if tuple(f.shape) == tuple(tensor.shape) and torch.equal(tensor.cpu(), f.to(tensor.dtype)):
            return True
    return False


# --------------------------------------------------------------------------- specialization


def _specialize(
    module: fx.GraphModule, inputs: tuple[Any, ...], onnx_nodes: dict[str, onnx.NodeProto]
) -> None:
    """Bake constant operands into the modules that read their values.

    onnx2torch keeps shape operands (Reshape's shape, Slice's starts, Unsqueeze's axes...) as
    tensors and reads them in Python (``.tolist()``, ``.numpy()``, ``torch.Size(t)``), which
    torch.export, tracing with fake tensors, cannot do. Those operands are constants: buffers
    that are not weights, and whatever is computed from them and from tensor shapes (``Shape``
    ops: the export is for fixed shapes anyway). Each module reading one is traced on its own
    with real values (``make_fx``, real mode), its signal operands as inputs, and replaced by
    the trace; the constant computations then have no users and go. Whatever depended on a
    value of the signal would be baked in too: :func:`_verify` compares the program with
    onnx2torch's own module on a second input to catch that.
    """
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.node import map_arg

    graph = module.graph
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            if not isinstance(_attr_of(module, str(node.target)), torch.nn.Parameter):
                constant.add(node)
        elif node.op in ("call_module", "call_function"):
            onnx_node = onnx_nodes.get(str(node.target)) if node.op == "call_module" else None
            shape_only = onnx_node is not None and onnx_node.op_type in ("Shape", "Size")
            if shape_only or (node.all_input_nodes and all(n in constant for n in node.all_input_nodes)):
                constant.add(node)
    targets = [
        node
        for node in graph.nodes
        if node.op == "call_module"
        and node not in constant
        and any(n in constant for n in node.all_input_nodes)
        and not _has_state(module.get_submodule(str(node.target)))
    ]
    if not targets:
        return
    wanted = set(targets)
    traces: dict[fx.Node, tuple[Any, list[fx.Node]]] = {}

    class _Tracer(torch.fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            if node in wanted:
                signals = [n for n in node.all_input_nodes if n not in constant]
                values = {n: self.env[n] for n in node.all_input_nodes}
                sub = self.module.get_submodule(str(node.target))

                def call(*signal_values: Any, node: fx.Node = node, sub: Any = sub) -> Any:
                    env = {**values, **dict(zip(signals, signal_values, strict=True))}
                    args = map_arg(node.args, env.__getitem__)
                    kwargs = map_arg(node.kwargs, env.__getitem__)
                    return sub(*args, **kwargs)

                try:
                    # Real mode, values may be read: the constants' values are burnt in (the point).
                    traced = make_fx(call, tracing_mode="real", _error_on_data_dependent_ops=False)(
                        *[values[n] for n in signals]
                    )
                    traced.graph.eliminate_dead_code()
                    _drop_unused_constants(traced)
                    traces[node] = (_Specialized(traced, sub), signals)
                except Exception:
                    pass  # left as it is: the export then says which op it cannot trace
            return super().run_node(node)

    with quiet_tracers():
        _Tracer(module).run(*inputs)
    for node, (traced, signals) in traces.items():
        module.add_module(str(node.target), traced)
        node.args = tuple(signals)
        node.kwargs = {}
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    used = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    container = getattr(module, "initializers", None)
    if container is not None:
        for name in list(container._buffers):
            if f"initializers.{name}" not in used:
                del container._buffers[name]
    module.delete_all_unused_submodules()
    graph.lint()
    module.recompile()


def _drop_unused_constants(traced: fx.GraphModule) -> None:
    """make_fx keeps every constant it met (the shape tensor a Reshape read) as an attribute;
    once the reads are gone, they would be exported as buffers nobody uses."""
    used = {str(n.target) for n in traced.graph.nodes if n.op == "get_attr"}
    for name in [b for b in traced._buffers if b not in used]:
        del traced._buffers[name]
    for name in [k for k, v in vars(traced).items() if isinstance(v, torch.Tensor) and k not in used]:
        delattr(traced, name)
    traced.recompile()


class _Specialized(torch.nn.Module):
    """A converted module with its constant operands burnt in. A plain module around the
    trace, because torch.export records no module stack for an ``fx.GraphModule`` child:
    its ops would belong to no ONNX node, and give no tap."""

    def __init__(self, traced: fx.GraphModule, original: nn.Module) -> None:
        super().__init__()
        self.traced = traced
        self.original = type(original).__name__

    def forward(self, *args: Any) -> Any:
        return self.traced(*args)


def _attr_of(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _verify(program: Any, inputs: list[tuple[Any, ...]], expected: list[Any]) -> None:
    """The program must compute what onnx2torch's module computes, on the example input and
    on a second one (where a value of the signal baked into the program shows)."""
    run = program.module()
    for which, (args, want) in enumerate(zip(inputs, expected, strict=True)):
        with torch.no_grad():
            got = run(*args)
        got_leaves, want_leaves = list(tensor_leaves(got)), list(tensor_leaves(want))
        if len(got_leaves) != len(want_leaves):
            raise ConversionError(
                f"the exported program returns {len(got_leaves)} tensors, "
                f"onnx2torch's module {len(want_leaves)}"
            )
        for g, w in zip(got_leaves, want_leaves, strict=True):
            if g.shape != w.shape or not _close(g, w):
                on = "the example input" if which == 0 else "a second input"
                raise ConversionError(
                    f"the exported program does not compute what onnx2torch's module computes on {on}: "
                    "some op's output depends on the input's values in a way the export fixed "
                    "(data-dependent shapes or control flow)"
                )


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if not want.is_floating_point():
        return bool(torch.equal(got, want))
    g, w = got.double(), want.double()
    finite = torch.isfinite(w)
    if not torch.equal(finite, torch.isfinite(g)):
        return False
    scale = float(w[finite].abs().max()) if bool(finite.any()) else 0.0
    return bool(torch.allclose(g[finite], w[finite], rtol=1e-4, atol=1e-5 * scale + 1e-30))


# --------------------------------------------------------------------------- export


def _export(module: fx.GraphModule, inputs: tuple[Any, ...], onnx_nodes: dict[str, onnx.NodeProto]) -> Any:
    """torch.export (non-strict); again with real values beside the fake ones when an op reads
    a constant's values (``torch.Size(shape)``, ``shape.tolist()``, ``if torch.any(shape == 0)``)."""
    try:
        with quiet_tracers():
            return torch.export.export(module, inputs, strict=False)
    except Exception as exc:
        first = exc
    try:
        import torch._functorch.config as functorch_config

        with quiet_tracers(), functorch_config.patch(fake_tensor_propagate_real_tensors=True):
            program = torch.export.export(module, inputs, strict=False)
    except Exception as exc:
        located = _locate_failure(module, onnx_nodes, exc)
        raise (located if located.op is not None else _locate_failure(module, onnx_nodes, first)) from None
    _drop_constant_asserts(program, onnx_nodes)
    return program


def _drop_constant_asserts(program: Any, onnx_nodes: dict[str, onnx.NodeProto]) -> None:
    """Remove the runtime asserts a real-value export leaves, once sure they test constants.

    A guard resolved from real values holds for every run only if the values came from
    constants (initializer buffers, shapes): one reaching back to the input or to a parameter
    would bake one draw into the program, so that is refused instead."""
    sig = program.graph_signature
    variable = set(sig.user_inputs) | set(sig.inputs_to_parameters)
    graph = program.graph_module.graph
    asserts = [n for n in graph.nodes if n.op == "call_function" and _target_name(n.target) in _ASSERT_OPS]
    for node in asserts:
        roots = _placeholder_ancestors(node)
        if roots & variable:
            owner = _owner(node)
            onnx_node = onnx_nodes.get(owner or "")
            op = onnx_node.op_type if onnx_node is not None else None
            raise ConversionError(
                f"node {onnx_node.name if onnx_node else owner!r} (op {op}) has an output shape that "
                "depends on the values of the input or weights; torch.export cannot trace it",
                op=op,
                node=onnx_node.name if onnx_node else None,
            )
    for node in reversed(asserts):
        graph.erase_node(node)
    graph.eliminate_dead_code()
    program.graph_module.recompile()


def _target_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _placeholder_ancestors(node: Any) -> set[str]:
    seen: set[Any] = set()
    roots: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            roots.add(current.name)
        stack.extend(current.all_input_nodes)
    return roots


def _owner(node: Any) -> str | None:
    """The top-level module (= converted ONNX node) that made an exported node."""
    owner = _owner_of_own(node)
    if owner is not None:
        return owner
    for inp in node.all_input_nodes:  # asserts carry no stack: ask what they test
        owner = _owner(inp)
        if owner is not None:
            return owner
    return None


def _locate_failure(
    module: fx.GraphModule,
    onnx_nodes: dict[str, onnx.NodeProto],
    exc: BaseException,
    doing: str = "torch.export cannot trace",
) -> ConversionError:
    """Name the ONNX node whose module was running when ``exc`` was raised (the innermost
    frame whose ``self`` is one of the converted modules)."""
    by_id = {id(m): name for name, m in module.named_children()}
    owner = None
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if candidate is not None and id(candidate) in by_id:
            owner = by_id[id(candidate)]
        tb = tb.tb_next
    problem = _om._one_line(exc, 300)
    node = onnx_nodes.get(owner or "")
    if node is None:
        return ConversionError(f"{doing} the converted model: {problem}")
    op = _op_name(node.domain, node.op_type)
    return ConversionError(
        f"{doing} node {node.name!r} (op {op}) of the converted model: {problem}", op=op, node=node.name
    )


# --------------------------------------------------------------------------- taps


def _value_nodes(
    program: Any, proto: onnx.ModelProto, onnx_nodes: dict[str, onnx.NodeProto]
) -> dict[str, str]:
    """{ONNX value -> exported fx node}: a module's output is its last node used outside it.

    A node that computes nothing in torch (Identity, Dropout in eval) passes its input's node
    on. Multi-output nodes are mapped only where their outputs come out as indexed items."""
    graph = program.graph_module.graph
    produced: dict[str, list[Any]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        owner = _owner_of_own(node)
        if owner is None:
            continue
        if any(user.op == "output" or _owner_of_own(user) != owner for user in node.users):
            produced.setdefault(owner, []).append(node)
    values: dict[str, str] = {}
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    init_names = {t.name for t in proto.graph.initializer}
    real_inputs = [vi.name for vi in proto.graph.input if vi.name not in init_names]
    values.update(zip(real_inputs, placeholders, strict=False))
    for mod_name, onnx_node in onnx_nodes.items():
        outs = [o for o in onnx_node.output if o]
        escaping = produced.get(mod_name, [])
        if len(outs) == 1:
            if escaping:
                values[outs[0]] = escaping[-1].name
            elif onnx_node.input and onnx_node.input[0] in values:
                values[outs[0]] = values[onnx_node.input[0]]
        elif escaping and all(_is_getitem(n) for n in escaping):
            for n in escaping:
                index = n.args[1]
                if isinstance(index, int) and index < len(outs):
                    values[outs[index]] = n.name
    return values


def _owner_of_own(node: Any) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _cls in stack.values():
        if path:
            return str(path).split(".")[0]
    return None


def _is_getitem(node: Any) -> bool:
    import operator

    return node.target is operator.getitem
