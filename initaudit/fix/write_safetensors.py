"""Apply a fix plan to a safetensors file, without torch.

A change keeps each tensor's dtype and shape, so every byte range keeps its size: the
output is the input's bytes (header, metadata and every other tensor byte-identical) with
the changed tensors' ranges replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from initaudit.atomic import CHUNK, Transaction, source_mode, write_all
from initaudit.errors import LoadError
from initaudit.fix.casting import cast
from initaudit.fix.plan import SCALE, FixPlan, new_values
from initaudit.frontends.safetensors_file import SafetensorsFile

_KINDS = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}


def key_map(names: Iterable[str], keys: Iterable[str], path: Path) -> dict[str, str]:
    """File keys for the graph's tensor names. The frontends strip a ``module.`` prefix every
    key carries (DataParallel) and a first component every key shares (Lightning's
    ``model.``) before loading into ``--model``'s module; the output keeps them."""
    names, keys = list(names), list(keys)
    present = set(keys)
    prefixes = [""]
    for strip in ("", "module."):
        rest = [k[len(strip) :] for k in keys if k.startswith(strip)]
        if strip and len(rest) != len(keys):
            continue
        prefixes.append(strip)
        heads = {k.split(".", 1)[0] for k in rest}
        if len(heads) == 1 and all("." in k for k in rest):
            prefixes.append(strip + heads.pop() + ".")
    for prefix in dict.fromkeys(prefixes):
        if all(prefix + name in present for name in names):
            return {name: prefix + name for name in names}
    missing = next(name for name in names if name not in present)
    raise LoadError(path, f"tensor {missing!r} of the plan has no key in the file")


class SafetensorsWriter:
    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.st = SafetensorsFile(path)
        self.notes: list[str] = []
        self._keys: dict[str, str] | None = None

    def editable(self, name: str) -> bool:
        try:
            key_map([name], self.st.tensors, self.path)
        except LoadError:
            return False
        return True

    def default_output(self) -> Path:
        suffix = self.path.suffix or ".safetensors"
        return self.path.with_name(f"{self.path.stem}.fixed{suffix}")

    def keys(self, plan: FixPlan) -> dict[str, str]:
        return key_map([c.tensor for c in plan.changes], self.st.tensors, self.path)

    def validate(self, plan: FixPlan) -> None:
        for change in plan.changes:
            info = self.st.tensors[self.keys(plan)[change.tensor]]
            if info.dtype not in _KINDS:
                raise LoadError(
                    self.path,
                    f"tensor {info.name!r} is {info.dtype}: only F16, BF16, F32 and F64 tensors can be "
                    "rescaled and cast back",
                )

    def write(self, plan: FixPlan, target: Path) -> list[Path]:
        self.validate(plan)
        keys = self.keys(plan)
        replaced: dict[int, tuple[int, bytes]] = {}  # begin -> (end, bytes)
        for change in plan.changes:
            info = self.st.tensors[keys[change.tensor]]
            old = None
            if change.action == SCALE:
                old = np.asarray(self.st.array(info.name), dtype=np.float64)
                if not np.all(np.isfinite(old)):
                    raise LoadError(
                        self.path, f"tensor {info.name!r} holds NaN or Inf: it cannot be rescaled"
                    )
            raw, finite = cast(new_values(change, old, info.shape, plan.seed), _KINDS[info.dtype])
            if not finite:
                raise LoadError(
                    self.path, f"tensor {info.name!r}: the new values do not fit {info.dtype} (overflow)"
                )
            assert len(raw) == info.end - info.begin
            replaced[info.begin] = (info.end, raw)
        start = self.st.data_start

        def fill(f: Any) -> None:
            with self.path.open("rb") as src:
                _copy(src, f, start)  # the header, byte for byte
                position = 0
                for begin in sorted(replaced):
                    end, raw = replaced[begin]
                    _copy(src, f, begin - position)
                    write_all(f, raw)
                    src.seek(end - begin, 1)
                    position = end
                _copy(src, f, None)

        with Transaction() as tx:
            tx.stage(target, fill, source_mode(self.path))
        return [target]


def _copy(src: Any, dst: Any, count: int | None) -> None:
    """Copy ``count`` bytes (all that is left when None) from ``src`` to ``dst``."""
    left = count
    while left is None or left > 0:
        chunk = src.read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            if left:
                raise LoadError(
                    getattr(src, "name", "input"), "changed while it was being copied (truncated)"
                )
            return
        dst.write(chunk)
        if left is not None:
            left -= len(chunk)
