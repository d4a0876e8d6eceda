"""Apply a fix plan to a PyTorch file: a state dict in, a state dict out.

A state dict (or a checkpoint holding one under ``state_dict``/``model``..., with any
``module.`` prefix) is loaded with ``weights_only=True``, its changed entries replaced, and the
whole object saved again with ``torch.save``: the other entries of the checkpoint (epoch,
optimizer state) and the keys stay as they were, and the output loads with
``weights_only=True``. Full pickled modules, TorchScript and ``.pt2`` archives (trusted
only) are not rewritten as code: their state dict is written, and the report says so.

torch is imported here only, and only when a PyTorch file is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from initaudit.atomic import Transaction, source_mode
from initaudit.errors import LoadError
from initaudit.fix.plan import SCALE, FixPlan, new_values
from initaudit.fix.write_safetensors import key_map
from initaudit.frontends import LoadOptions
from initaudit.graph import LayerGraph

_FLOATS = ("float16", "bfloat16", "float32", "float64")


class TorchWriter:
    format = "pytorch"

    def __init__(self, path: Path, fmt: str, options: LoadOptions) -> None:
        from initaudit.frontends import torch_load

        self.torch = torch_load._import_torch(path)
        self.path, self.fmt, self.options = path, fmt, options
        self.notes: list[str] = []
        self.module_kind: str | None = None  # what a state dict was taken from, when not a state dict
        self.root, self.container = self._load()

    def _load(self) -> tuple[Any, dict[str, Any]]:
        from initaudit.frontends import torch_load

        torch = self.torch
        if self.fmt == "torchscript":
            module = self._load_scripted()
            self.module_kind = "TorchScript archive"
            state = dict(module.state_dict())
            return state, state
        if self.fmt == "pt2":
            program = self._load_exported()
            self.module_kind = "torch.export archive"
            state = {k: v.detach() for k, v in program.state_dict.items()}
            return state, state
        obj = torch_load._torch_load(self.path, self.fmt, self.options, [])
        module = _held_module(obj)
        if isinstance(module, torch.nn.Module):
            self.module_kind = "pickled module"
            state = dict(module.state_dict())
            return state, state
        state, where = torch_load.find_state_dict(obj)
        if state is None:
            raise LoadError(self.path, "holds no state dict of tensors to rewrite")
        container = obj if where is None else obj[where]
        return obj, container

    def _load_scripted(self) -> Any:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.torch.jit.load(str(self.path), map_location="cpu")

    def _load_exported(self) -> Any:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.torch.export.load(self.path)

    # ---- the writer protocol

    def editable(self, name: str) -> bool:
        try:
            key_map([name], self.container, self.path)
        except LoadError:
            return False
        return True

    def default_output(self) -> Path:
        suffix = ".pt" if self.module_kind else (self.path.suffix or ".pt")
        return self.path.with_name(f"{self.path.stem}.fixed{suffix}")

    def validate(self, plan: FixPlan) -> None:
        keys = key_map([c.tensor for c in plan.changes], self.container, self.path)
        for change in plan.changes:
            tensor = self.container[keys[change.tensor]]
            dtype = str(tensor.dtype).removeprefix("torch.")
            if tensor.layout != self.torch.strided or tensor.is_quantized or dtype not in _FLOATS:
                raise LoadError(
                    self.path,
                    f"tensor {keys[change.tensor]!r} is {dtype}: only float16, bfloat16, float32 and float64 "
                    "tensors can be rescaled and cast back",
                )

    def apply(self, plan: FixPlan) -> None:
        torch = self.torch
        self.validate(plan)
        keys = key_map([c.tensor for c in plan.changes], self.container, self.path)
        aliases = self._aliases()
        for change in plan.changes:
            key = keys[change.tensor]
            old_tensor = self.container[key]
            old = None
            if change.action == SCALE:
                old = old_tensor.detach().to("cpu", torch.float64).numpy()
                if not bool(torch.isfinite(old_tensor).all()):
                    raise LoadError(self.path, f"tensor {key!r} holds NaN or Inf: it cannot be rescaled")
            values = new_values(change, old, tuple(old_tensor.shape), plan.seed)
            new = torch.from_numpy(values).to(old_tensor.dtype)
            if not bool(torch.isfinite(new).all()):
                raise LoadError(
                    self.path, f"tensor {key!r}: the new values do not fit {old_tensor.dtype} (overflow)"
                )
            for alias in aliases.get(key, [key]):
                self.container[alias] = new  # tied weights stay tied
            if len(aliases.get(key, [key])) > 1:
                self.notes.append(
                    f"`{key}` is tied to {', '.join(a for a in aliases[key] if a != key)}: changed together"
                )

    def _aliases(self) -> dict[str, list[str]]:
        """Keys whose tensors are the same view of the same storage (tied weights)."""
        groups: dict[tuple[Any, ...], list[str]] = {}
        for key, t in self.container.items():
            if not isinstance(t, self.torch.Tensor) or t.layout != self.torch.strided or t.is_quantized:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident[0]:
                groups.setdefault(ident, []).append(key)
        return {key: group for group in groups.values() for key in group}

    def write(self, plan: FixPlan, target: Path) -> list[Path]:
        self.apply(plan)
        if self.module_kind:
            self.notes.append(
                f"the input is a {self.module_kind}: the output is its state dict (load it with "
                "module.load_state_dict(torch.load(path, weights_only=True)))"
            )
        root = self.root

        def fill(f: Any) -> None:
            self.torch.save(root, f)

        with Transaction() as tx:
            tx.stage(target, fill, source_mode(self.path))
        return [target]

    # ---- proof for module inputs

    def proof_graph(self, target: Path) -> LayerGraph | None:
        """For a module input, the graph of that module with the written state dict loaded:
        the output alone (a state dict) has no architecture to audit. None for state dicts."""
        if not self.module_kind:
            return None
        from initaudit.frontends import torch_load
        from initaudit.frontends.torch_graph import example_inputs, graph_from_exported, graph_from_scripted

        torch = self.torch
        fixed = torch.load(target, map_location="cpu", weights_only=True)
        notes = [f"architecture from {self.path.name}, weights from {target.name}"]
        if self.fmt == "torchscript":
            module = self._load_scripted()
            module.load_state_dict(fixed)
            inputs = example_inputs(module, self.options.input_shape, self.options.input_dtype)
            return graph_from_scripted(module, inputs, source=str(target), fmt="torchscript", notes=notes)
        if self.fmt == "pt2":
            program = self._load_exported()
            with torch.no_grad():
                for key, value in fixed.items():
                    program.state_dict[key].copy_(value)
            return graph_from_exported(program, source=str(target), fmt="torch.export", notes=notes)
        obj = torch_load._torch_load(self.path, self.fmt, self.options, [])
        module = _held_module(obj)
        module.load_state_dict(fixed)
        return torch_load._module_graph(module, target, self.options, notes, fmt="pytorch module")


def _held_module(obj: Any) -> Any:
    """The module a trusted pickle holds: itself, or under a checkpoint key (``model``, ...)."""
    import torch

    from initaudit.frontends import torch_load

    if isinstance(obj, Mapping):
        for key in torch_load.STATE_DICT_KEYS:
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key]
    return obj
