"""A weights-only layer graph: the weight tensors of a state dict or safetensors file, unconnected.

With no architecture there is nothing to propagate, so FM1/FM2 cannot be computed; what can
still be judged is each tensor's scale against the init schemes its fan-in implies (rule
IA105) and its hygiene (IA501, IA502). Pure numpy: the caller passes arrays (a safetensors
file is read without torch), one at a time, and only statistics are kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from initaudit.graph import Kind, Layer, LayerGraph
from initaudit.stats import TensorStats, tensor_stats

#: ``LayerGraph.meta["audit"]`` of a graph built here.
WEIGHTS_ONLY = "weights-only"

NOTE = (
    "weights-only audit: the file holds weights but no architecture, so FM1/FM2 are not computed "
    "(nothing to propagate) and each tensor is only checked against the init schemes its fan-in "
    "implies (IA105), assuming PyTorch's (out, in, *kernel) layout; pass `--model pkg.module:factory` "
    "to get the full analysis"
)

_EMBEDDING = re.compile(r"embed|wte|wpe|position", re.IGNORECASE)
# transformers' Conv1D (GPT-2, OpenAI GPT) stores its weight (in, out), unlike nn.Linear.
_CONV1D = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
# weight_g is weight norm's per-unit magnitude, shaped (out, 1, ...): no fan-in to speak of.
_NOT_A_MATRIX = ("weight_g",)


def weights_only_graph(tensors: Iterable[tuple[str, np.ndarray]], *, source: str, fmt: str) -> LayerGraph:
    """Build a weights-only :class:`LayerGraph` from ``(name, array)`` pairs.

    Each weight matrix becomes an unconnected DENSE (rank 2, ``(out, in)``) or CONV layer
    (rank 3-5, ``(out, in/groups, *kernel)``) named after its key without ``.weight``; a
    rank-1 ``<prefix>.bias`` becomes the bias of ``<prefix>.weight``. Everything else is
    skipped with the reason in ``meta["skipped"]`` (plain dicts: name, shape, dtype, reason,
    nonfinite). ``tensors`` is consumed once; only statistics are kept, so a caller that yields
    arrays lazily never has more than one tensor in memory.
    """
    layers: list[Layer] = []
    names: set[str] = set()
    biases: dict[str, TensorStats] = {}  # prefix -> stats; safetensors sorts "x.bias" before "x.weight"
    skipped: list[dict[str, Any]] = []
    weight_prefixes: dict[str, Layer] = {}

    for name, raw in tensors:
        # _visit keeps the only reference to the array: it is freed before the next one is read.
        kind, value = _visit(name, raw)
        del raw
        if kind == "bias":
            biases[name[: -len(".bias")]] = value
        elif kind == "skip":
            skipped.append(value)
        else:
            layer = value
            if layer.name in names:  # "x.weight" and a bare "x" both present: keep full keys
                layer.name = name if name not in names else f"{name}#{len(layers)}"
            names.add(layer.name)
            layers.append(layer)
            if name.endswith(".weight"):
                weight_prefixes[name[: -len(".weight")]] = layer

    skipped_weights = {
        row["name"][: -len(".weight")]: row["reason"] for row in skipped if row["name"].endswith(".weight")
    }
    for prefix, stats in biases.items():
        owner = weight_prefixes.get(prefix)
        if owner is not None and stats.count == (owner.width or 0):
            owner.bias = stats
            continue
        if owner is not None:
            reason = f"bias of {stats.count} entries for {owner.width} output units"
        else:  # a LayerNorm's shift goes where its scale went
            reason = skipped_weights.get(prefix, "bias with no `.weight` beside it")
        skipped.append(_skipped(stats.name, stats.shape, stats.dtype, reason, stats.nonfinite))

    notes = [NOTE]
    transposed = [layer.weight.name for layer in layers if layer.weight and "layout" in layer.attrs]
    if transposed:
        notes.append(
            f"weights-only audit: {len(transposed)} tensors named like transformers' Conv1D "
            f"(`c_attn`, `c_proj`, `c_fc`; e.g. `{transposed[0]}`) were read as (in, out)"
        )
    if skipped:
        kinds: dict[str, int] = {}
        for row in skipped:
            kinds[_reason_kind(row["reason"])] = kinds.get(_reason_kind(row["reason"]), 0) + 1
        listed = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        notes.append(f"weights-only audit: {len(skipped)} tensors not checked for scale ({listed})")
    if not layers:
        notes.append("weights-only audit: no weight matrix or conv kernel found in the file")
    return LayerGraph(
        layers=layers,
        inputs=[],
        outputs=[],
        source=source,
        format=fmt,
        notes=notes,
        meta={"audit": WEIGHTS_ONLY, "layout": "pytorch (out, in/groups, *kernel)", "skipped": skipped},
    )


def _visit(name: str, raw: np.ndarray) -> tuple[str, Any]:
    """("layer", Layer), ("bias", TensorStats) or ("skip", row) for one tensor."""
    array = np.asarray(raw)
    if not _floating(array.dtype):
        reason = f"{_dtype_word(array.dtype)} tensor, not a weight"
        return "skip", _skipped(name, array.shape, str(array.dtype), reason, 0)
    # One pass over every float tensor, skipped or not: a NaN in an embedding or a norm scale
    # corrupts the model as surely as one in a weight matrix (IA501 reports both).
    stats = tensor_stats(name, array)
    leaf = name.rsplit(".", 1)[-1]
    reason = _skip_reason(name, leaf, array)
    if reason is None and array.ndim == 1:
        if leaf == "bias":
            return "bias", stats
        reason = "rank-1 tensor (a normalization scale or shift): no fan-in"
    if reason is not None:
        return "skip", _skipped(name, array.shape, str(array.dtype), reason, stats.nonfinite)
    prefix = name[: -len(".weight")] if name.endswith(".weight") else name
    return "layer", _layer(name, prefix, array, stats)


def _skipped(name: str, shape: tuple[int, ...], dtype: str, reason: str, nonfinite: int) -> dict[str, Any]:
    """A ``meta["skipped"]`` row: plain data, so the JSON report carries it as is."""
    return {
        "name": name,
        "shape": [int(d) for d in shape],
        "dtype": dtype,
        "reason": reason,
        "nonfinite": nonfinite,
    }


def _floating(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16 / float8 are numpy "void" kinds; they still cast to float64.
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def _dtype_word(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "boolean"
    if dtype.kind in "iu":
        return "integer"
    if dtype.kind == "c":
        return "complex"
    return f"non-float ({dtype})"


def _skip_reason(name: str, leaf: str, array: np.ndarray) -> str | None:
    """Why ``name`` is not a weight matrix in the init sense, or None if it is one."""
    if leaf in _RUNNING:
        return "normalization running statistic"
    if array.ndim == 0:
        return "scalar"
    if array.ndim == 1:
        return None  # a bias (attached later) or a normalization parameter
    if _EMBEDDING.search(name):
        return "embedding (a lookup table: no fan-in sets its scale)"
    if array.size == 0:
        return "empty tensor"
    if array.ndim > 5:
        return f"rank-{array.ndim} tensor: no known layer layout"
    if "weight" not in leaf:
        # Linear and Conv weights are called `weight` (`in_proj_weight` in nn.MultiheadAttention);
        # tokens, positional tables, LayerScale and custom parameters have no fan-in we can trust.
        return "not named like a layer weight (`.weight`): layout unknown"
    if leaf in _NOT_A_MATRIX:
        return "weight-norm magnitude: no fan-in"
    return None


def _reason_kind(reason: str) -> str:
    """A short word for the skip summary note."""
    for word, kind in (
        ("embedding", "embedding"),
        ("running", "running statistic"),
        ("rank-1", "norm parameter"),
        ("bias", "unattached bias"),
        ("scalar", "scalar"),
        ("integer", "integer"),
        ("boolean", "integer"),
        ("not named", "other parameter"),
    ):
        if word in reason:
            return kind
    return "other"


def _layer(key: str, name: str, array: np.ndarray, stats: TensorStats) -> Layer:
    out, inner, *kernel = (int(d) for d in array.shape)
    attrs: dict[str, Any] = {"tensor": key}
    if array.ndim == 2 and _CONV1D.search(key):
        out, inner = inner, out
        attrs["layout"] = "(in, out): transformers Conv1D"
    receptive = math.prod(kernel)
    conv = array.ndim > 2
    return Layer(
        name=name,
        kind=Kind.CONV if conv else Kind.DENSE,
        op=f"conv{array.ndim - 2}d" if conv else "linear",
        inputs=[],
        width=out,
        fan_in=inner * receptive,
        fan_out=out * receptive,  # PyTorch's fan_out (kaiming mode="fan_out")
        weight=stats,
        shape=tuple(int(d) for d in array.shape),
        attrs=attrs,
    )
