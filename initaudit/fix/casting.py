"""Casting new float64 values back to a file's element type, without torch or ml_dtypes."""

from __future__ import annotations

import sys

import numpy as np

#: Storage dtype (little-endian) by a short element-type name; bfloat16 is stored as its bits.
STORAGE = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float values -> bfloat16 bit patterns (uint16), rounded to nearest even like torch."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def le_bytes(array: np.ndarray) -> bytes:
    """The array's elements as little-endian bytes."""
    array = np.ascontiguousarray(array)
    if sys.byteorder == "big" and array.dtype.byteorder in ("=", "|") and array.dtype.itemsize > 1:
        array = array.byteswap()
    return array.tobytes()


def cast(values: np.ndarray, kind: str) -> tuple[bytes, bool]:
    """``values`` as the raw bytes of element type ``kind`` (a :data:`STORAGE` key), and
    whether every value survived the cast finite (a float16 overflow does not)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "bfloat16":
            stored = to_bfloat16_bits(values)
            check = from_bfloat16_bits(stored)
        else:
            stored = np.asarray(values).astype(STORAGE[kind])
            check = stored
    return le_bytes(stored), bool(np.all(np.isfinite(check)))
