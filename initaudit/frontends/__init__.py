"""Frontends: recognise a model file by its bytes and translate it into a LayerGraph.

``sniff`` never trusts the extension: a ``.onnx`` that is really a Git LFS pointer or a
``.pt`` that is really a full pickle must be told apart before anything parses it.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from initaudit.errors import LoadError
from initaudit.graph import LayerGraph

LFS_PREFIX = b"version https://git-lfs.github.com/spec/v1"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
TORCH_FORMATS = ("torch-zip", "torchscript", "pt2", "pickle")


@dataclass(frozen=True)
class LoadOptions:
    """How to turn a file into a graph: what the file alone cannot say, and what the user allows.

    ``trust_model`` lets formats that run code on load (full pickles, TorchScript, ``.pt2``)
    be loaded; ``trust_source`` says where that permission came from, for the report.
    ``model_factory`` ("pkg.module:factory") supplies the architecture for a state dict or
    safetensors file. ``input_dtype`` is a torch dtype name ("float32", "int64").
    """

    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    trust_model: bool = False
    model_factory: str | None = None
    trust_source: str = "--trust-model"


# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_MAX_TOP_FIELDS = 100_000


def sniff(path: str | Path) -> str:
    """Name the format of ``path`` from its leading bytes.

    One of "onnx", "torch-zip", "torchscript", "pt2", "pickle", "safetensors",
    "shard-index" (JSON text: a sharded checkpoint's index, if it is anything we read),
    "git-lfs-pointer" or "unknown" (also for an empty file). Raises :class:`LoadError` when
    the path cannot be opened.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(64)
            size = p.stat().st_size
    except OSError as exc:
        raise LoadError(path, _os_problem(exc)) from None
    if not head:
        return "unknown"
    if head.startswith(LFS_PREFIX):
        return "git-lfs-pointer"
    if head.startswith(ZIP_MAGICS):
        return _sniff_zip(p)
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
        return "shard-index"
    # Protocol 2+ pickles, including legacy (pre-zip) torch.save files.
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if protobuf_model_check(p) is not False:
        return "onnx"
    return "unknown"


def _sniff_zip(p: Path) -> str:
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    parts = [name.split("/") for name in names]
    # torch.export (.pt2): an archive_format member; the pre-2.6 layout had a JSON program.
    if any(q[-1] in ("archive_format", "serialized_exported_program.json") for q in parts):
        return "pt2"
    if any(len(q) >= 2 and q[-2] == "models" for q in parts):
        return "pt2"
    # TorchScript archives also hold data.pkl, so they must be told apart first.
    if any(q[-1] == "constants.pkl" or "code" in q[:-1] for q in parts):
        return "torchscript"
    if any(q[-1] == "data.pkl" for q in parts):
        return "torch-zip"
    return "unknown"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _read_varint(f) -> int | None:
    result = shift = 0
    for _ in range(10):
        byte = f.read(1)
        if not byte:
            return None
        b = byte[0]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
    return None


def protobuf_model_check(path: str | Path) -> bool | str | None:
    """Walk the top-level protobuf fields of ``path`` as an ONNX ModelProto, skipping bodies.

    Returns True when every field is a ModelProto field and the walk ends exactly at the end
    of the file; "truncated" when the leading fields look right but one runs past the end;
    False when it is not a ModelProto. Cheap on a 1 GB file: the graph body is seeked over.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        f = p.open("rb")
    except OSError:
        return False
    with f:
        fields = 0
        while f.tell() < size and fields < _MAX_TOP_FIELDS:
            key = _read_varint(f)
            if key is None:
                return "truncated" if fields else False
            number, wire = key >> 3, key & 7
            if _MODEL_FIELDS.get(number) != wire:
                return False
            if wire == 0:
                if _read_varint(f) is None:
                    return "truncated" if fields else False
            else:
                length = _read_varint(f)
                if length is None or f.tell() + length > size:
                    # One plausible field is not enough to call random bytes a truncated model.
                    return "truncated" if fields else False
                f.seek(length, 1)
            fields += 1
        return fields > 0


def _os_problem(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a model file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def load_graph(
    path: str | Path,
    options: LoadOptions | tuple[int, ...] | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
) -> LayerGraph:
    """Read ``path`` into a :class:`LayerGraph`, choosing the frontend by the file's bytes.

    ``input_shape`` (also ``options.input_shape``, which it overrides) fixes the shape of the
    model's first input where the file leaves it open. Every failure is a :class:`LoadError`
    with a one-line reason; a file that can run code on load is refused unless
    ``options.trust_model``.
    """
    if isinstance(options, tuple):  # the old positional ``load_graph(path, input_shape)``
        options, input_shape = None, options
    options = options or LoadOptions()
    if input_shape is not None:
        options = replace(options, input_shape=input_shape)
    p = Path(path)
    if not p.exists():
        raise LoadError(path, "no such file")
    if p.is_dir():
        raise LoadError(path, "is a directory, not a model file")
    try:
        empty = p.stat().st_size == 0
    except OSError as exc:
        raise LoadError(path, _os_problem(exc)) from None
    if empty:
        raise LoadError(path, "is empty (0 bytes)")
    fmt = sniff(p)
    if fmt == "onnx":
        from initaudit.frontends.onnx_model import load_onnx

        graph = load_onnx(p, input_shape=options.input_shape)
        if options.model_factory:
            graph.notes.append(f"--model {options.model_factory} ignored: an ONNX file brings its own graph")
        return graph
    if fmt == "git-lfs-pointer":
        raise LoadError(path, "is a Git LFS pointer, not the model; run `git lfs pull`")
    if fmt in TORCH_FORMATS:
        from initaudit.frontends.torch_load import load_torch

        return load_torch(p, fmt, options)
    if fmt == "safetensors":
        return _load_safetensors(p, options)
    if fmt == "shard-index":
        from initaudit.frontends.shards import load_sharded

        return load_sharded(p, options)
    raise LoadError(path, _unknown_problem(p))


def _load_safetensors(p: Path, options: LoadOptions) -> LayerGraph:
    from initaudit.frontends.safetensors_file import SafetensorsFile

    st = SafetensorsFile(p)  # validates the whole header before torch is even imported
    from initaudit.frontends import torch_load

    if options.model_factory:
        return torch_load.load_safetensors_into_model(p, st, options)
    return torch_load.safetensors_weights_only(p, st)


def _unknown_problem(p: Path) -> str:
    """Say more than "unrecognized" when the leading bytes promise a format the rest breaks."""
    try:
        with p.open("rb") as f:
            head = f.read(9)
        size = p.stat().st_size
    except OSError as exc:
        return _os_problem(exc)
    if head.startswith(ZIP_MAGICS):
        try:
            with zipfile.ZipFile(p):
                pass
        except (zipfile.BadZipFile, OSError, ValueError):
            return "is a zip archive that cannot be opened (truncated or corrupt)"
        return "is a zip archive but not a PyTorch or ONNX model (no data.pkl, code/ or archive_format)"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > size - 8:
            return (
                f"looks like safetensors, but its header claims {header_len} bytes and the file "
                f"has {size - 8} after the length prefix (truncated?)"
            )
    return "unrecognized file format (not ONNX, PyTorch or safetensors)"
