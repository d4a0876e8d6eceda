"""Apply a fix plan to an ONNX file: only the changed TensorProtos are rewritten.

The original ModelProto is parsed without its external data; each changed tensor is read
through the frontend's guarded reader, changed in float64 and cast back to its own element
type, and its data replaced inside the same proto, which keeps its name, dims, doc string
and metadata. Every other field (opsets, metadata, doc strings, nodes, the other
initializers) is never touched, so it serializes to the same bytes. When the input keeps
tensors in external files, all of them go to one fresh data file beside the output (onnx's
own writer would append to an existing one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from initaudit.atomic import Transaction, source_mode, write_all
from initaudit.errors import LoadError
from initaudit.fix.casting import STORAGE, cast, from_bfloat16_bits, le_bytes
from initaudit.fix.plan import SCALE, FixPlan, TensorChange, new_values
from initaudit.frontends.onnx_model import _read_model, _to_array

#: Element types a plan can rewrite, by their :data:`casting.STORAGE` name.
_KINDS = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
}
_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type {data_type}"


def cast_back(values: np.ndarray, data_type: int, name: str, path: Path) -> bytes:
    """``values`` (float64) as the raw little-endian bytes of ``data_type``; a value that
    does not fit (float16 overflow) is an error, never a silent inf."""
    kind = _KINDS.get(data_type)
    if kind is None:
        raise LoadError(
            path,
            f"tensor {name!r} is {type_name(data_type)}: only float16, bfloat16, float32 and float64 "
            "tensors can be rescaled and cast back",
        )
    raw, finite = cast(values, kind)
    if not finite:
        raise LoadError(path, f"tensor {name!r}: the new values do not fit {type_name(data_type)} (overflow)")
    return raw


class OnnxWriter:
    """Rewrites the tensors of one ONNX file."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model = _read_model(path)
        self.protos: dict[str, TensorProto] = {t.name: t for t in self.model.graph.initializer}
        for node in self.model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.protos.setdefault(node.output[0], attr.t)
        self.notes: list[str] = []

    @property
    def external(self) -> list[TensorProto]:
        return [t for t in self.protos.values() if uses_external_data(t)]

    def editable(self, name: str) -> bool:
        return name in self.protos

    def default_output(self) -> Path:
        suffix = self.path.suffix or ".onnx"
        return self.path.with_name(f"{self.path.stem}.fixed{suffix}")

    def extra_outputs(self, target: Path) -> list[Path]:
        """Files written beside ``target``: the fresh external-data file, if the input has one."""
        return [self._data_path(target)] if self.external else []

    def validate(self, plan: FixPlan) -> None:
        """Raise :class:`LoadError` for a change the file cannot take, before anything is written."""
        for change in plan.changes:
            t = self.protos.get(change.tensor)
            if t is None:
                raise LoadError(self.path, f"tensor {change.tensor!r} is not stored in the file")
            if t.data_type not in _KINDS:
                cast_back(np.zeros(0), t.data_type, t.name, self.path)  # raises with the reason

    def apply(self, plan: FixPlan) -> None:
        """Change the tensors in the in-memory proto (external ones are collected for write)."""
        self.validate(plan)
        self._new_external: dict[str, bytes] = {}
        for change in plan.changes:
            t = self.protos[change.tensor]
            raw = self._new_bytes(t, change, plan.seed)
            if uses_external_data(t):
                self._new_external[t.name] = raw
            else:
                _set_raw(t, raw)

    def _new_bytes(self, t: TensorProto, change: TensorChange, seed: int) -> bytes:
        shape = tuple(int(d) for d in t.dims)
        old = None
        if change.action == SCALE:
            old = _to_array(self.path, t)
            if old.dtype == np.uint16 and t.data_type == TensorProto.BFLOAT16:  # raw bits (older onnx)
                old = from_bfloat16_bits(old)
            old = np.asarray(old, dtype=np.float64)
            if not np.all(np.isfinite(old)):
                raise LoadError(self.path, f"tensor {t.name!r} holds NaN or Inf: it cannot be rescaled")
        values = new_values(change, old, shape, seed)
        return cast_back(values, t.data_type, t.name, self.path)

    def write(self, plan: FixPlan, target: Path) -> list[Path]:
        """Apply ``plan`` and write the model (and a fresh external-data file) atomically."""
        self.apply(plan)
        mode = source_mode(self.path)
        written = [target]
        with Transaction() as tx:
            external = self.external
            if external:
                data_path = self._data_path(target)
                layout = self._stage_external(tx, external, data_path, mode)
                for t in external:
                    offset, length = layout[t.name]
                    _point(t, data_path.name, offset, length)
                written.insert(0, data_path)
                self.notes.append(
                    f"external data of {len(external)} tensor(s) written to a fresh file {data_path.name}"
                )
            try:
                payload = self.model.SerializeToString()
            except ValueError as exc:
                raise LoadError(target, f"cannot be serialized ({exc}); the model is over 2 GB") from None
            tx.stage(target, lambda f: write_all(f, payload), mode)
        return written

    def _data_path(self, target: Path) -> Path:
        """A data-file name beside ``target`` that the input does not read from."""
        used = set()
        for t in self.external:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            used.add((self.path.parent / location).resolve())
        base = f"{target.name}.data"
        candidate = target.with_name(base)
        k = 1
        while candidate.resolve() in used:
            candidate = target.with_name(f"{target.name}.{k}.data")
            k += 1
        return candidate

    def _stage_external(
        self, tx: Transaction, tensors: list[TensorProto], data_path: Path, mode: int | None
    ) -> dict[str, tuple[int, int]]:
        layout: dict[str, tuple[int, int]] = {}

        def fill(f: Any) -> None:
            offset = 0
            for t in tensors:
                raw = self._new_external.get(t.name)
                if raw is None:
                    raw = _stored_bytes(self.path, t)
                pad = (-offset) % 64  # aligned starts, as onnx's writer keeps them
                if pad:
                    f.write(b"\0" * pad)
                    offset += pad
                write_all(f, raw)
                layout[t.name] = (offset, len(raw))
                offset += len(raw)

        tx.stage(data_path, fill, mode)
        return layout


def _stored_bytes(path: Path, t: TensorProto) -> bytes:
    """An unchanged external tensor's bytes, read through the frontend's guarded reader."""
    array = _to_array(path, t)
    if t.data_type == TensorProto.BFLOAT16 and array.dtype.itemsize == 4:
        array = (array.view(np.uint32) >> 16).astype(np.uint16)  # exact: the values came from bf16
    kind = _KINDS.get(t.data_type)
    if kind is not None and kind != "bfloat16":
        array = array.astype(STORAGE[kind], copy=False)
    return le_bytes(array)


def _set_raw(t: TensorProto, raw: bytes) -> None:
    for name in _DATA_FIELDS:
        t.ClearField(name)
    t.raw_data = raw


def _point(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``t``'s external data at ``location``; other keys (checksum...) are dropped only
    where they described the old bytes."""
    keep = [
        (e.key, e.value) for e in t.external_data if e.key not in ("location", "offset", "length", "checksum")
    ]
    del t.external_data[:]
    for key, value in [("location", location), ("offset", str(offset)), ("length", str(length)), *keep]:
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")


def run_random_input(path: Path) -> str | None:
    """Run the model with onnxruntime on a random input, where onnxruntime is installed:
    a line saying what happened, or None when it is not installed."""
    try:
        import onnxruntime  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
            dtype = _ORT_TYPES.get(spec.type, np.float32)
            draw = rng.standard_normal(shape) if np.dtype(dtype).kind == "f" else np.zeros(shape)
            feeds[spec.name] = draw.astype(dtype)  # integer inputs (token ids): zeros are always valid
        outputs = session.run(None, feeds)
    except Exception as exc:
        return f"onnxruntime could not run the fixed model: {' '.join(str(exc).split())[:200]}"
    finite = all(
        np.all(np.isfinite(np.asarray(o, dtype=np.float64)))
        for o in outputs
        if np.asarray(o).dtype.kind == "f"
    )
    shapes = ", ".join(str(tuple(np.shape(o))) for o in outputs)
    state = "finite" if finite else "NOT finite"
    return f"onnxruntime ran the fixed model on a random input: outputs {shapes}, {state}"


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
