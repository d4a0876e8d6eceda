"""A safetensors reader that needs neither torch nor the ``safetensors`` package.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte buffer that
follows the header), then the buffer. The header is validated in full before any tensor is
touched; tensors are then mapped one at a time with ``numpy.memmap``, so a 10 GB file costs
the memory of its largest tensor, not of the file.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from initaudit.errors import LoadError

#: The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype -> (numpy storage dtype, itemsize). BF16 and the 8-bit floats have no
#: numpy dtype: they are stored as unsigned ints of their width and decoded on read.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("|b1", 1),
    "U8": ("|u1", 1),
    "I8": ("|i1", 1),
    "U16": ("<u2", 2),
    "I16": ("<i2", 2),
    "U32": ("<u4", 4),
    "I32": ("<i4", 4),
    "U64": ("<u8", 8),
    "I64": ("<i8", 8),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "F32": ("<f4", 4),
    "F64": ("<f8", 8),
    "F8_E4M3": ("|u1", 1),
    "F8_E5M2": ("|u1", 1),
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class SafetensorsFile:
    """A validated safetensors header plus lazy, per-tensor access to the data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    self._fail(f"is too short for a safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER_BYTES:
                    self._fail(f"safetensors header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
                if 8 + header_len > size:
                    self._fail(
                        f"safetensors header claims {header_len} bytes but the file has only {size - 8} "
                        "after the length prefix (truncated?)"
                    )
                raw = f.read(header_len)
        except OSError as exc:
            self._fail(f"cannot be read ({exc.strerror or type(exc).__name__})")
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        self.tensors = self._parse(raw)

    def _fail(self, problem: str) -> Any:
        raise LoadError(self.path, problem)

    def _parse(self, raw: bytes) -> dict[str, TensorInfo]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._fail(f"safetensors header is not valid JSON ({first})")
        if not isinstance(header, dict):
            self._fail("safetensors header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            self._fail("safetensors __metadata__ must map strings to strings")
        self.metadata = meta
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._entry(name, entry)
        # Overlapping tensors would let one name alias another's bytes: refuse, as safetensors does.
        spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
        for (_, end_a, name_a), (begin_b, _, name_b) in itertools.pairwise(spans):
            if begin_b < end_a:
                self._fail(f"safetensors tensors {name_a!r} and {name_b!r} overlap")
        return tensors

    def _entry(self, name: str, entry: Any) -> TensorInfo:
        where = f"safetensors tensor {name!r}"
        if not isinstance(entry, dict):
            self._fail(f"{where}: entry is not an object")
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            self._fail(f"{where}: unknown dtype {dtype!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            self._fail(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            self._fail(f"{where}: data_offsets must be two integers, got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            self._fail(f"{where}: data_offsets {offsets} are not an ascending pair")
        if end > self.data_size:
            self._fail(
                f"{where}: data ends at byte {end} but the file holds only {self.data_size} data bytes "
                "(truncated?)"
            )
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            self._fail(
                f"{where}: shape {tuple(shape)} of {dtype} needs {expected} bytes, "
                f"data_offsets give {end - begin}"
            )
        return TensorInfo(name, dtype, tuple(shape), begin, end)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only array of its storage dtype (uint16 for BF16)."""
        info = self.tensors[name]
        storage = np.dtype(DTYPES[info.dtype][0])
        if info.numel == 0:
            return np.empty(info.shape, dtype=storage)
        try:
            return np.memmap(
                self.path, dtype=storage, mode="r", offset=self.data_start + info.begin, shape=info.shape
            )
        except (OSError, ValueError) as exc:
            raise LoadError(self.path, f"safetensors tensor {name!r} cannot be mapped ({exc})") from None

    def array(self, name: str) -> np.ndarray:
        """The tensor as numpy: BF16 and the 8-bit floats widened exactly to float32, the rest as stored."""
        info = self.tensors[name]
        data = self.raw(name)
        if info.dtype == "BF16":
            # bfloat16 is the top half of a float32: shifting the bits back up is exact.
            return (data.astype(np.uint32) << 16).view(np.float32)
        if info.dtype == "F8_E5M2":
            # E5M2 is the top byte of a float16, the same way.
            return (data.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
        if info.dtype == "F8_E4M3":
            return _E4M3FN[data]
        return data

    def arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor, one at a time in file order (the weights-only audit sorts out the rest)."""
        for info in sorted(self.tensors.values(), key=lambda t: t.begin):
            yield info.name, self.array(info.name)


def _e4m3fn_table() -> np.ndarray:
    """All 256 float8_e4m3fn values (bias 7, no infinities, S.1111.111 is NaN)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(
        exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent.astype(float) - 7)
    )
    value = np.where((exponent == 0xF) & (mantissa == 0x7), np.nan, value)
    return (sign * value).astype(np.float32)


_E4M3FN = _e4m3fn_table()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result
