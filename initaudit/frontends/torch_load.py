"""PyTorch files, loaded safely: state dicts, full modules, TorchScript and torch.export archives.

Safety rules (see DESIGN.md, "Loading safely"):

- ``torch.load`` always runs first with ``weights_only=True, map_location="cpu"``, spelled out,
  whatever the torch version's defaults. When that fails because the file holds arbitrary
  pickled objects, we stop and name ``--trust-model``; there is never a silent second attempt
  with ``weights_only=False``.
- TorchScript and ``.pt2`` archives run or unpickle code on load: refused without trust.
- ``--model pkg.module:factory`` imports user code: that is the user's explicit choice.

torch is imported inside functions only: ``check model.onnx`` must never import it.
"""

from __future__ import annotations

import importlib
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from initaudit.errors import LoadError, UsageError
from initaudit.graph import LayerGraph

if TYPE_CHECKING:
    import torch

    from initaudit.frontends import LoadOptions
    from initaudit.frontends.safetensors_file import SafetensorsFile

TRUST_HINT = (
    "pass --trust-model only if you trust its source (or set trust-model = true under [tool.initaudit] "
    "in your project's pyproject.toml)"
)
#: Where checkpoints commonly keep the state dict (Lightning, most training loops).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
#: Pickle opcodes that import or call: what makes a pickle more than tensors and containers.
_CODE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
#: Globals every torch.save pickle uses; never the ones to blame in a message.
_BENIGN_GLOBAL = re.compile(r"^(torch\._utils\.|torch\.\w*Storage$|collections\.OrderedDict$|torch\.Size$)")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}


def untrusted(path: str | Path, what: str) -> LoadError:
    """The refusal every code-carrying format gets without trust: names the risk and the flag."""
    return LoadError(path, f"{what}; {TRUST_HINT}")


# ----------------------------------------------------------------------------- entry points


def load_torch(path: Path, fmt: str, options: LoadOptions) -> LayerGraph:
    """A PyTorch file of format ``fmt`` (as ``sniff`` names it) as a LayerGraph."""
    notes: list[str] = []
    if fmt == "torchscript":
        return _load_torchscript(path, options, notes)
    if fmt == "pt2":
        return _load_exported(path, options, notes)
    obj = _torch_load(path, fmt, options, notes)
    return _graph_from_object(obj, path, options, notes)


def load_safetensors_into_model(path: Path, st: SafetensorsFile, options: LoadOptions) -> LayerGraph:
    """A safetensors file loaded into ``options.model_factory``'s module, then extracted."""
    torch = _import_torch(path)
    assert options.model_factory is not None
    module = build_module(options.model_factory)
    with warnings.catch_warnings():
        # Read-only memmaps: torch warns that writing would be undefined; we only read them.
        warnings.simplefilter("ignore", UserWarning)
        tensors = {name: _st_tensor(torch, st, name) for name in st.tensors}
    notes: list[str] = []
    load_into(module, tensors, options.model_factory, path, notes)
    return _module_graph(module, path, options, notes, fmt="safetensors")


# ----------------------------------------------------------------------------- torch.load


def _import_torch(path: str | Path) -> Any:
    try:
        import torch
    except ImportError:
        raise LoadError(path, "reading PyTorch files needs torch: pip install 'initaudit[torch]'") from None
    return torch


def _torch_load(path: Path, fmt: str, options: LoadOptions, notes: list[str]) -> Any:
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol-version chatter from the weights-only unpickler
            # No mmap=True: torch 2.13 then skips its record-size check and a storage cut short
            # reads the bytes after it (garbage weights, or past the mapping). Reading checks it.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        refusal = exc
    except Exception as exc:
        # Not a refusal of what the pickle holds: the bytes are broken (a bad member, short storage).
        kind, culprits = scan_pickle(path, fmt)
        why = culprits[0] if kind == "corrupt" else _one_line(exc)
        raise LoadError(path, f"is not a readable PyTorch checkpoint: {why}") from None
    kind, culprits = scan_pickle(path, fmt)
    if kind == "corrupt":
        # Refused even with trust: a broken pickle can still run the opcodes before the break.
        raise LoadError(path, f"is not a readable PyTorch checkpoint: {culprits[0]}")
    if not options.trust_model:
        raise _refusal(path, kind, culprits, refusal)
    notes.append(f"loaded with weights_only=False because of {options.trust_source}: the file's pickle ran")
    try:
        with _cwd_on_path(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LoadError(path, f"cannot be loaded even with trust: {_one_line(exc)}") from None


def _refusal(path: Path, kind: str, culprits: list[str], exc: Exception) -> LoadError:
    """Why ``weights_only=True`` refused a well-formed pickle, and the flag that allows it."""
    named = _blamed_global(str(exc)) or next((c for c in culprits if not _BENIGN_GLOBAL.match(c)), None)
    if kind == "objects":
        which = f" (e.g. {named})" if named else ""
        return untrusted(
            path,
            f"holds pickled Python objects{which}, not just tensors; unpickling them can run arbitrary code",
        )
    # A well-formed pickle without imports that torch still refused (an opcode it lacks).
    reason = _torch_reason(exc)
    return untrusted(path, f"cannot be read as weights only ({reason}); unpickling it fully can run any code")


def _torch_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.replace("WeightsUnpickler error: ", "")[:200]
    return _one_line(exc)


def _blamed_global(message: str) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def scan_pickle(path: Path, fmt: str) -> tuple[str, list[str]]:
    """Classify a pickle without running it: ("objects", globals), ("plain", []) or ("corrupt", [why]).

    ``pickletools.genops`` only decodes opcodes; nothing is imported or called. A legacy
    ``torch.save`` file is several pickles back to back followed by raw storage bytes, so
    pickles are read while the next byte is a PROTO opcode.
    """
    try:
        if fmt == "torch-zip":
            with zipfile.ZipFile(path) as zf:
                members = sorted((n for n in zf.namelist() if n.endswith("data.pkl")), key=len)
                if not members:
                    return "corrupt", ["the zip archive has no data.pkl"]
                with zf.open(members[0]) as f:
                    return _scan_stream(f, several=False)
        with path.open("rb") as f:
            return _scan_stream(f, several=True)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return "corrupt", [f"unreadable ({_one_line(exc)})"]


def _scan_stream(f: Any, *, several: bool) -> tuple[str, list[str]]:
    found: list[str] = []
    code = False
    for index in range(6 if several else 1):
        if index:
            peek = f.read(1)
            if peek != b"\x80":
                break
            f = _Prepend(peek, f)
        try:
            for op, name in _ops(f):
                code |= op in _CODE_OPS
                if name and name not in found:
                    found.append(name)
        except Exception as exc:
            if index == 0:
                return "corrupt", [f"the pickle stream is corrupt or truncated ({_one_line(exc)})"]
            break
    return ("objects" if code else "plain"), found


def _ops(f: Any) -> Iterator[tuple[str, str | None]]:
    """Opcode names, with the ``module.name`` a GLOBAL or STACK_GLOBAL imports (best effort)."""
    memo: dict[int, Any] = {}
    recent: list[Any] = [None, None]
    last: Any = None
    for opcode, arg, _ in pickletools.genops(f):
        name = opcode.name
        imported = None
        if name in _STRING_OPS:
            last = arg
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(int(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
            continue
        elif name in ("GLOBAL", "INST"):
            imported = str(arg).replace(" ", ".")
            last = None
        elif name == "STACK_GLOBAL":
            if all(isinstance(r, str) for r in recent):
                imported = f"{recent[0]}.{recent[1]}"
            last = None
        else:
            last = None
        if name in _STRING_OPS or name in ("BINGET", "LONG_BINGET", "GET"):
            recent = [recent[1], last]
        yield name, imported


class _Prepend:
    """A read-only stream with one byte pushed back in front (genops needs ``read`` only)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + (self.rest.read(n - len(data)) if n > len(data) else b"")

    def readline(self) -> bytes:
        if not self.head:
            return self.rest.readline()
        data, self.head = self.head, b""
        return data if data.endswith(b"\n") else data + self.rest.readline()


# ----------------------------------------------------------------------------- self-describing files


def _load_torchscript(path: Path, options: LoadOptions, notes: list[str]) -> LayerGraph:
    if not options.trust_model:
        raise untrusted(path, "is a TorchScript archive, whose code runs when it is loaded")
    torch = _import_torch(path)
    _ignore_factory(options, notes, "TorchScript archive")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(path, f"TorchScript archive cannot be loaded: {_one_line(exc)}") from None
    from initaudit.frontends.torch_graph import example_inputs, graph_from_scripted

    inputs = example_inputs(module, options.input_shape, options.input_dtype)
    return graph_from_scripted(module, inputs, source=str(path), fmt="torchscript", notes=notes)


def _load_exported(path: Path, options: LoadOptions, notes: list[str]) -> LayerGraph:
    if not options.trust_model:
        raise untrusted(
            path, "is a torch.export archive (.pt2): loading it unpickles Python objects, which can run code"
        )
    torch = _import_torch(path)
    _ignore_factory(options, notes, "torch.export archive")
    if options.input_shape is not None:
        notes.append("--input-shape ignored: a .pt2 archive fixes its own example inputs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(path)
    except Exception as exc:
        raise LoadError(path, f"torch.export archive cannot be loaded: {_one_line(exc)}") from None
    from initaudit.frontends.torch_graph import graph_from_exported

    return graph_from_exported(program, source=str(path), fmt="torch.export", notes=notes)


def _ignore_factory(options: LoadOptions, notes: list[str], what: str) -> None:
    # The file's own graph describes the weights it holds; a factory (often a project-wide
    # default from [tool.initaudit]) could describe another network, so it loses, with a note.
    if options.model_factory:
        notes.append(f"--model {options.model_factory} ignored: the {what} brings its own graph")


# ----------------------------------------------------------------------------- what torch.load returned


def _graph_from_object(obj: Any, path: Path, options: LoadOptions, notes: list[str]) -> LayerGraph:
    import torch

    # Only a trusted load can return modules: weights_only=True never builds one.
    held = next(
        (k for k in STATE_DICT_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), torch.nn.Module)),
        None,
    )
    if held is not None:
        notes.append(f"module read from checkpoint[{held!r}]")
        obj = obj[held]
    if isinstance(obj, torch.nn.Module):
        _ignore_factory(options, notes, "pickled module")
        return _module_graph(obj, path, options, notes, fmt="pytorch module")
    state, where = find_state_dict(obj)
    if state is None:
        looked = (
            " (looked under " + ", ".join(map(repr, STATE_DICT_KEYS)) + ")"
            if isinstance(obj, Mapping)
            else ""
        )
        raise LoadError(path, f"holds {_describe(obj)}, not a module or a state dict of tensors{looked}")
    if where:
        notes.append(f"weights read from checkpoint[{where!r}]")
    state = strip_prefix(state, "module.", notes)
    if options.model_factory:
        module = build_module(options.model_factory)
        load_into(module, state, options.model_factory, path, notes)
        return _module_graph(module, path, options, notes, fmt="pytorch state dict")
    return _weights_only(path, _numpy_tensors(state, notes), "pytorch state dict", notes)


def find_state_dict(obj: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The name -> tensor mapping in ``obj``: itself, or under a common checkpoint key."""
    if _is_tensor_map(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_tensor_map(obj.get(key)):
                return dict(obj[key]), key
    return None, None


def _is_tensor_map(obj: Any) -> bool:
    import torch

    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def strip_prefix(state: dict[str, Any], prefix: str, notes: list[str]) -> dict[str, Any]:
    """Drop a prefix every key carries (``module.`` from DataParallel / DDP)."""
    if state and all(k.startswith(prefix) for k in state):
        notes.append(f"stripped the {prefix!r} prefix every key carried (DataParallel)")
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"a {type(obj).__name__} with keys {keys}{', ...' if len(obj) > 5 else ''}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _numpy_tensors(state: Mapping[str, Any], notes: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors as numpy, one at a time: floats widened to float32 (bf16, fp16, fp8 exactly),
    integer buffers as they are (the weights-only audit lists them as skipped)."""
    import torch

    unreadable: list[str] = []
    for name, tensor in state.items():
        if tensor.layout != torch.strided or tensor.is_quantized:
            unreadable.append(name)
            continue
        t = tensor.detach()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)
        try:
            array = t.numpy()
        except (TypeError, RuntimeError):  # a dtype numpy lacks (unsigned wide ints on old numpy)
            unreadable.append(name)
            continue
        yield name, array
    if unreadable:
        notes.append(
            f"{len(unreadable)} sparse, quantized or exotic tensor(s) not read (e.g. {unreadable[0]})"
        )


def _weights_only(
    path: Path, tensors: Iterator[tuple[str, np.ndarray]], fmt: str, notes: list[str]
) -> LayerGraph:
    from initaudit.frontends.weights_only import weights_only_graph

    graph = weights_only_graph(tensors, source=str(path), fmt=fmt)
    # The generator appends its skip note only once exhausted: after the graph is built.
    graph.notes.extend(n for n in notes if n not in graph.notes)
    return graph


def safetensors_weights_only(path: Path, st: SafetensorsFile) -> LayerGraph:
    return _weights_only(path, st.arrays(), "safetensors", [])


# ----------------------------------------------------------------------------- --model factories


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The working directory on ``sys.path`` while user code is imported and run."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def parse_factory(spec: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":")
    if not sep or not module.strip() or not attr.strip() or ":" in attr:
        raise UsageError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:build_resnet")
    return module.strip(), attr.strip()


def build_module(spec: str) -> torch.nn.Module:
    """Import ``pkg.module``, call ``factory()`` and check it returned an ``nn.Module``."""
    import torch

    module_name, attr = parse_factory(spec)
    with _cwd_on_path():
        try:
            target: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UsageError(f"--model {spec}: cannot import {module_name} ({exc})") from None
        except Exception as exc:
            raise UsageError(f"--model {spec}: importing {module_name} failed: {_one_line(exc)}") from None
        for part in attr.split("."):
            if not hasattr(target, part):
                raise UsageError(f"--model {spec}: {module_name} has no attribute {attr}")
            target = getattr(target, part)
        if not callable(target):
            raise UsageError(f"--model {spec}: {attr} is not callable")
        try:
            built = target()
        except Exception as exc:
            raise UsageError(f"--model {spec}: calling {attr}() failed: {_one_line(exc)}") from None
    if not isinstance(built, torch.nn.Module):
        raise UsageError(f"--model {spec}: {attr}() returned {_describe(built)}, not a torch.nn.Module")
    return built


def load_into(
    module: torch.nn.Module, state: dict[str, Any], spec: str, path: str | Path, notes: list[str]
) -> None:
    """``load_state_dict(strict=True)``, with a one-line diff when the state dict does not fit."""
    import torch

    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        # Lightning-style wrappers prefix every key with the attribute holding the network.
        prefix = _common_prefix(list(state))
        stripped = {k[len(prefix) :]: v for k, v in state.items()} if prefix else {}
        if prefix and set(stripped) == set(expected):
            state, missing, unexpected = stripped, [], []
            notes.append(f"stripped the {prefix!r} prefix every key carried")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        raise LoadError(path, f"state dict does not fit {spec}: {'; '.join(parts)}")
    for key, target in expected.items():
        got = tuple(state[key].shape)
        if got != tuple(target.shape):
            raise LoadError(
                path,
                f"state dict does not fit {spec}: {key} has shape {got} in the file, "
                f"{tuple(target.shape)} in the model",
            )
    try:
        with torch.no_grad():
            module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise LoadError(path, f"state dict does not fit {spec}: {_one_line(exc)}") from None


def _common_prefix(keys: list[str]) -> str | None:
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(heads) == 1 and all("." in k for k in keys):
        return heads.pop() + "."
    return None


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _module_graph(
    module: torch.nn.Module, path: Path, options: LoadOptions, notes: list[str], *, fmt: str
) -> LayerGraph:
    from initaudit.frontends.torch_graph import example_inputs, graph_from_module, guessed_shape_note

    inputs = example_inputs(module, options.input_shape, options.input_dtype)
    guessed = guessed_shape_note(module, options.input_shape)
    if guessed:
        notes.append(guessed)
    return graph_from_module(module, inputs, source=str(path), fmt=fmt, notes=notes)


def _st_tensor(torch: Any, st: SafetensorsFile, name: str) -> Any:
    """A torch view of a safetensors tensor's memmap: nothing is read until it is copied."""
    info = st.tensors[name]
    raw = st.raw(name)
    if info.dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
        view = {"BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
        carrier = np.int16 if info.dtype == "BF16" else np.int8
        return torch.from_numpy(raw.view(carrier)).view(view[info.dtype])
    if info.dtype in ("U16", "U32", "U64"):
        raw = np.asarray(raw, dtype=np.int64)  # torch lacks most unsigned dtypes
    return torch.from_numpy(raw)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
