"""Sharded Hugging Face checkpoints: an ``*.index.json`` and the shard files it lists, as one model.

The index is ``{"metadata": {...}, "weight_map": {tensor: shard_file}}`` beside its shards
(``model-00001-of-00003.safetensors`` or ``pytorch_model-00001-of-00003.bin``). It is hostile
input like any model file, so before a shard is opened: the index is size-capped and must parse
strictly (a tensor listed twice is an error); each shard must be a plain file name in the
index's directory (no separators, no ``..``, no absolute path) that exists as a regular file and
does not resolve outside that directory through a link (except into the ``blobs/`` folder of a
Hugging Face cache snapshot, where every file is such a link). Then each shard must hold exactly
the tensors the index places in it: a listed tensor missing from its shard, or a tensor held
by a shard the index does not place it in (a duplicate across shards), is an error.

safetensors shards go through the torch-free reader (headers of all shards validated before any
tensor is read, tensors mapped one at a time); ``.bin`` shards through ``torch.load`` with
``weights_only=True``, one shard in memory at a time, and never unsafely: ``--trust-model``
does not extend to shards.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from initaudit.errors import LoadError

if TYPE_CHECKING:
    import numpy as np

    from initaudit.frontends import LoadOptions
    from initaudit.frontends.safetensors_file import SafetensorsFile
    from initaudit.graph import LayerGraph

#: Index names a directory walk picks up (transformers' SAFE_WEIGHTS_INDEX_NAME and
#: WEIGHTS_INDEX_NAME end so, as do the per-component indexes of diffusers).
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
#: A 700-billion-parameter model's index is about 10 MB; anything past this is not an index.
MAX_INDEX_BYTES = 64 * 1024 * 1024

_TORCH_SHARD_FORMATS = ("torch-zip", "pickle")


def is_index_name(name: str) -> bool:
    """Whether ``name`` (a file name) is named like a sharded checkpoint's index."""
    return name.lower().endswith(INDEX_SUFFIXES)


@dataclass
class Shard:
    name: str  # as the index spells it: a plain file name
    path: Path  # the index's directory / name
    tensors: list[str] = field(default_factory=list)  # the index's order
    fmt: str = ""


@dataclass
class ShardIndex:
    path: Path
    metadata: dict[str, Any]
    weight_map: dict[str, str]
    shards: list[Shard]  # sorted by name: model-00001-of-00003 first

    def fail(self, problem: str) -> LoadError:
        return LoadError(self.path, problem)

    @property
    def kind(self) -> str:
        """What the shards hold, by their bytes: "safetensors", "pytorch" or "mixed"."""
        kinds = {"safetensors" if s.fmt == "safetensors" else "pytorch" for s in self.shards}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def label(self) -> str:
        what = {"safetensors": "safetensors", "pytorch": "pytorch state dict"}.get(self.kind, "mixed")
        return f"{what}, {len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}"

    def note(self) -> str:
        names = ", ".join(s.name for s in self.shards[:3]) + (", ..." if len(self.shards) > 3 else "")
        return (
            f"sharded checkpoint: {len(self.weight_map)} tensors in {len(self.shards)} shard(s) "
            f"listed by the index ({names}), audited as one model"
        )


# ----------------------------------------------------------------------------- the index


def read_index(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The index's metadata and weight map, checked for size, syntax and shard names only
    (nothing beside the index is touched). Raises :class:`LoadError`."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise LoadError(p, f"sharded checkpoint index is {size} bytes (limit {MAX_INDEX_BYTES})")
        raw = p.read_bytes()
    except OSError as exc:
        raise LoadError(p, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    from initaudit.frontends.safetensors_file import _no_duplicates

    try:
        document = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(p, f"is not a valid JSON sharded checkpoint index ({first})") from None
    if not isinstance(document, dict) or "weight_map" not in document:
        raise LoadError(
            p, "is a JSON file, not a model (a sharded checkpoint's index has a top-level weight_map)"
        )
    metadata = document.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise LoadError(p, "sharded checkpoint index: metadata is not a JSON object")
    weight_map = document["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoadError(p, "sharded checkpoint index: weight_map must be a non-empty object")
    checked: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise LoadError(
                p, f"sharded checkpoint index: tensor {tensor!r} maps to {shard!r}, not a file name"
            )
        problem = _bad_name(shard)
        if problem:
            raise LoadError(p, f"sharded checkpoint index: shard {shard!r} (of tensor {tensor!r}) {problem}")
        checked[tensor] = shard
    return metadata, checked


def _bad_name(name: str) -> str | None:
    """Why ``name`` is not a plain file name in the index's own directory, or None."""
    if not name or name in (".", ".."):
        return "is not a file name"
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return "must be a file name in the index's directory, not a path"
    if "\0" in name or PureWindowsPath(name).drive or Path(name).is_absolute():
        return "must be a file name in the index's directory, not a path"
    return None


def listed_shards(path: str | Path) -> set[str]:
    """The shard file names an index lists, for discovery; empty when the index is unreadable
    (auditing it will say why)."""
    try:
        _, weight_map = read_index(path)
    except LoadError:
        return set()
    return set(weight_map.values())


def load_index(path: str | Path) -> ShardIndex:
    """The validated index with each shard located, checked to be a regular file inside the
    index's directory, and sniffed. Shard contents are checked by the loaders."""
    from initaudit.frontends import sniff

    p = Path(path)
    metadata, weight_map = read_index(p)
    # The index's own name is not resolved: in a Hugging Face cache it is itself a link to a blob.
    directory = Path(os.path.abspath(p)).parent.resolve()
    allowed = [directory, *_hf_blobs(directory)]
    by_name: dict[str, Shard] = {}
    for tensor, name in weight_map.items():
        shard = by_name.get(name)
        if shard is None:
            shard = by_name[name] = Shard(name, p.parent / name)
        shard.tensors.append(tensor)
    index = ShardIndex(p, metadata, weight_map, sorted(by_name.values(), key=lambda s: s.name))
    for shard in index.shards:
        candidate = directory / shard.name
        if not os.path.lexists(candidate):
            raise index.fail(f"shard {shard.name} does not exist (listed for {len(shard.tensors)} tensor(s))")
        try:
            real = candidate.resolve(strict=True)
            mode = real.stat().st_mode
        except (OSError, RuntimeError):
            raise index.fail(f"shard {shard.name} is a broken link") from None
        if not any(real.is_relative_to(root) for root in allowed):
            raise index.fail(f"shard {shard.name} is a link that leaves the index's directory (to {real})")
        if not stat.S_ISREG(mode):
            raise index.fail(f"shard {shard.name} is not a regular file")
        try:
            shard.fmt = sniff(candidate)
        except LoadError as exc:
            raise index.fail(f"shard {shard.name}: {exc.problem}") from None
        if shard.fmt == "git-lfs-pointer":
            raise index.fail(f"shard {shard.name} is a Git LFS pointer, not the weights; run `git lfs pull`")
        if shard.fmt != "safetensors" and shard.fmt not in _TORCH_SHARD_FORMATS:
            raise index.fail(f"shard {shard.name} is not a safetensors file or a torch.save state dict")
    return index


def _hf_blobs(directory: Path) -> list[Path]:
    """The ``blobs/`` of a Hugging Face cache repository when ``directory`` lies in one of its
    snapshots (``models--org--name/snapshots/<revision>/...``): where its files link to."""
    for here in (directory, *directory.parents):
        if here.parent.name == "snapshots":
            blobs = here.parent.parent / "blobs"
            return [blobs.resolve()] if blobs.is_dir() else []
    return []


def _check_keys(index: ShardIndex, shard: Shard, held: list[str]) -> None:
    """``shard`` holds exactly the tensors the index places in it."""
    present = set(held)
    missing = [t for t in shard.tensors if t not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise index.fail(
            f"tensor {missing[0]!r} is listed in shard {shard.name}, which does not hold it{more}"
        )
    listed = set(shard.tensors)
    extra = [t for t in held if t not in listed]
    if extra:
        other = index.weight_map.get(extra[0])
        if other is not None:
            raise index.fail(
                f"tensor {extra[0]!r} is held by shard {shard.name} and by {other}, where the index "
                "places it (a duplicate across shards)"
            )
        raise index.fail(f"shard {shard.name} holds tensor {extra[0]!r}, which the index does not list")


# ----------------------------------------------------------------------------- loading


def load_sharded(path: Path, options: LoadOptions) -> LayerGraph:
    """The sharded checkpoint whose index is ``path`` as one LayerGraph: weights-only without
    ``--model``, else loaded strictly into the factory's module."""
    index = load_index(path)
    # Every safetensors header is validated before torch is imported or a tensor read.
    headers = {s.name: _safetensors(index, s) for s in index.shards if s.fmt == "safetensors"}
    notes = [index.note()]
    if options.model_factory:
        graph = _into_model(index, headers, options, notes)
    else:
        from initaudit.frontends.torch_load import _weights_only

        graph = _weights_only(path, _arrays(index, headers, notes), index.label(), notes)
    graph.meta["shards"] = [s.name for s in index.shards]
    return graph


def _safetensors(index: ShardIndex, shard: Shard) -> SafetensorsFile:
    from initaudit.frontends.safetensors_file import SafetensorsFile

    try:
        st = SafetensorsFile(shard.path)
    except LoadError as exc:
        raise index.fail(f"shard {shard.name}: {exc.problem}") from None
    # Header order is offset order after sorting; the index's check only needs the set.
    _check_keys(index, shard, list(st.tensors))
    return st


def _torch_state(index: ShardIndex, shard: Shard) -> dict[str, Any]:
    """A ``.bin`` shard's state dict, through the weights-only ``torch.load`` path."""
    from initaudit.frontends import LoadOptions
    from initaudit.frontends.torch_load import TRUST_HINT, _torch_load, find_state_dict

    try:
        obj = _torch_load(shard.path, shard.fmt, LoadOptions(trust_model=False), [])
    except LoadError as exc:
        problem = exc.problem.replace(f"; {TRUST_HINT}", "")
        if problem != exc.problem:
            problem += " (shards are only ever read with weights_only=True)"
        raise index.fail(f"shard {shard.name}: {problem}") from None
    state, _ = find_state_dict(obj)
    if state is None:
        raise index.fail(f"shard {shard.name} holds no state dict of tensors")
    _check_keys(index, shard, list(state))
    return state


def _arrays(
    index: ShardIndex, headers: dict[str, SafetensorsFile], notes: list[str]
) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor as numpy, shard by shard in name order, one shard's state dict at a time."""
    from initaudit.frontends.torch_load import _numpy_tensors

    for shard in index.shards:
        if shard.fmt == "safetensors":
            yield from headers[shard.name].arrays()
        else:
            state = _torch_state(index, shard)
            yield from _numpy_tensors(state, notes)
            del state


def _into_model(
    index: ShardIndex, headers: dict[str, SafetensorsFile], options: LoadOptions, notes: list[str]
) -> LayerGraph:
    import warnings

    from initaudit.frontends import torch_load

    torch = torch_load._import_torch(index.path)
    assert options.model_factory is not None
    module = torch_load.build_module(options.model_factory)
    state: dict[str, Any] = {}
    for shard in index.shards:
        if shard.fmt == "safetensors":
            st = headers[shard.name]
            with warnings.catch_warnings():
                # Read-only memmaps: torch warns that writing would be undefined; we only read them.
                warnings.simplefilter("ignore", UserWarning)
                state.update((name, torch_load._st_tensor(torch, st, name)) for name in st.tensors)
        else:
            state.update(_torch_state(index, shard))
    torch_load.load_into(module, state, options.model_factory, index.path, notes)
    del state
    return torch_load._module_graph(module, index.path, options, notes, fmt=index.label())
