"""Run an ExportedProgram over many parameter samples at once and record M_j at its taps.

The lifted program takes its parameters, buffers and constants as leading placeholders
(``program.graph_signature.input_specs``), so ``program.graph_module(*lifted, *user_inputs)``
is a pure function of the weights. :func:`run_ensemble` maps that function over a leading
sample dimension with ``torch.func.vmap``: one batched op per graph node for a whole chunk of
networks, instead of a Python loop of forward passes. An fx Interpreter runs the graph and
reduces every tap node's output, as soon as it is computed, to

    M_j = mean(act_j ** 2)  over all entries of the (batch-size-1) example, in float64,

so only one scalar per tap and sample survives a chunk; the Interpreter frees every other
value after its last use, and full activations exist for one chunk at a time.

What is batched. A parameter given with a leading sample dimension is mapped over; one given
with its own shape, or as an ``expand``-ed view (stride 0 along the samples, as
:func:`initaudit.montecarlo.resample.resample` returns kept tensors), is shared by all samples
and passed once (a shared conv weight stays one ordinary conv). Tensors missing from
``params`` (buffers such as BatchNorm running statistics, lifted constants) are the program's
own. The input is shared likewise, or mapped over when it has a leading sample dimension
(the ``inputs`` scheme draws a fresh input per sample).

Fallback. When vmap cannot run the program (an op without a batching rule that cannot fall
back, data-dependent control flow, ``.item()``), the chunk is rerun as a loop of single
forward passes through the same Interpreter, and every later chunk too; a note says why.
Results are the same, only slower. An op vmap can only run through its own per-op loop
(no batching rule) is named in a note as well.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from initaudit.frontends.torch_graph import tensor_leaves

#: Bytes of sampled state (parameters and activations) one chunk may hold, per device kind.
#: Fixed rather than read from free memory, so a seed gives the same chunks on every machine.
#: On CPU the time goes to drawing random numbers (torch's normal_ at ~4-6 ns an entry); small
#: chunks reuse malloc'd memory instead of page-faulting fresh mappings in, which measured
#: faster (depth-10 width-64 MLP: 64 samples a chunk 5300/s, 256 4500/s, 1024 4000/s).
CHUNK_BUDGET = {"cpu": 16 << 20, "cuda": 2 << 30}
#: Upper bound on a default chunk: progress stays visible and cache-sized batches stay fast.
MAX_CHUNK = 1024
#: Activation bytes per sample are multiplied by this: temporaries, float64 copies at taps.
_ACTIVATION_FACTOR = 3

_NO_RULE = re.compile(r"(\S+) hit the vmap fallback which is currently disabled")


def program_inputs(program: Any) -> list[tuple[str, str, str | None]]:
    """(placeholder, kind, state-dict key) per placeholder of ``program.graph_module``, in
    call order; kind is the InputKind name (PARAMETER, BUFFER, CONSTANT_TENSOR, USER_INPUT)."""
    rows = []
    for spec in program.graph_signature.input_specs:
        rows.append((spec.arg.name, spec.kind.name, getattr(spec, "target", None)))
    return rows


def program_parameters(program: Any) -> dict[str, torch.Tensor]:
    """The program's trainable parameters by state-dict key: what resampling redraws."""
    state = program.state_dict
    return {
        key: state[key].detach()
        for _, kind, key in program_inputs(program)
        if kind == "PARAMETER" and key is not None
    }


def program_state(program: Any) -> dict[str, torch.Tensor]:
    """Every lifted tensor by state-dict key: parameters, buffers (persistent or not) and
    constants, as the program holds them."""
    state = program.state_dict
    constants = getattr(program, "constants", {}) or {}
    out: dict[str, torch.Tensor] = {}
    for _, kind, key in program_inputs(program):
        if kind == "USER_INPUT" or key is None:
            continue
        value = state.get(key, constants.get(key))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"the program's input {key!r} ({kind}) is not a tensor: cannot run an ensemble")
        out[key] = value.detach()
    return out


def activation_bytes(program: Any) -> int:
    """Bytes of every node output for one sample, from the traced shapes (an upper bound on
    the live activations of one forward pass)."""
    total = 0
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        total += sum(t.numel() * t.element_size() for t in tensor_leaves(node.meta.get("val")))
    return total


def default_chunk(
    params: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    *,
    program: Any = None,
    samples: int | None = None,
    budget: int | None = None,
) -> int:
    """Samples per chunk: the device's byte budget over one sample's parameters (and, given
    the program, its activations), at least 1 and at most :data:`MAX_CHUNK` (or ``samples``)."""
    kind = torch.device(device).type
    budget = budget or CHUNK_BUDGET.get(kind, CHUNK_BUDGET["cpu"])
    per_sample = sum(t.numel() * t.element_size() for t in params.values() if t.is_floating_point())
    if program is not None:
        per_sample += _ACTIVATION_FACTOR * activation_bytes(program)
    chunk = max(1, min(MAX_CHUNK, budget // max(per_sample, 1)))
    return min(chunk, samples) if samples else chunk


def run_ensemble(
    program: Any,
    taps: dict[str, str],
    x: torch.Tensor | Sequence[torch.Tensor],
    params: dict[str, torch.Tensor],
    *,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
    mode: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    notes: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """M_j per sample at every tap: {layer -> (samples,) float64 tensor on the CPU}.

    ``taps`` maps layer names to fx node names of ``program.graph_module.graph`` (a graph's
    ``meta["_nodes"]``); ``params`` maps state-dict keys to sampled tensors (see the module
    docstring for what is batched). ``x`` is the user input (a tuple for several), of the
    traced shape or with a leading sample dimension. ``mode`` is "auto" (vmap, falling back
    to a loop), "vmap" or "loop". ``progress(done, total)`` is called after every chunk;
    ``notes`` collects lines about how the ensemble ran. A tap whose output is not floating
    point (token ids) reads NaN.
    """
    if mode not in ("auto", "vmap", "loop"):
        raise ValueError(f"mode must be auto, vmap or loop, not {mode!r}")
    device = torch.device(device)
    notes = notes if notes is not None else []
    graph_module = program.graph_module
    node_names = {node.name for node in graph_module.graph.nodes}
    layers_of: dict[str, list[str]] = {}
    for layer, node in taps.items():
        if node in node_names:
            layers_of.setdefault(node, []).append(layer)
        else:
            notes.append(f"tap {layer!r}: no node {node!r} in the program; not measured")
    wanted = list(layers_of)

    lifted, samples = _lifted(program, params, device)
    users, user_samples = _user_inputs(program, x, device)
    samples = _agree(samples, user_samples)
    if samples is None:
        raise ValueError("nothing has a leading sample dimension: pass sampled params or a batch of inputs")
    chunk = chunk or default_chunk(params, device, program=program, samples=samples)

    def forward(lifted_args: tuple[Any, ...], user_args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        recorder = _TapRecorder(graph_module, wanted)
        recorder.run(*lifted_args, *user_args)
        return tuple(recorder.values[name] for name in wanted)

    in_dims = (tuple(d for _, d in lifted), tuple(d for _, d in users))
    batched = torch.func.vmap(forward, in_dims=in_dims, randomness="different")
    use_loop = mode == "loop"
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, samples, chunk):
            stop = min(samples, start + chunk)
            args = (_slice(lifted, start, stop, device), _slice(users, start, stop, device))
            result = None
            if not use_loop:
                try:
                    result = _vmapped(batched, args, notes, probe=start == 0)
                except Exception as error:
                    if mode == "vmap":
                        raise
                    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
                    notes.append(
                        f"vmap could not run the program ({type(error).__name__}: {reason}); "
                        "the ensemble ran as a loop of single forward passes"
                    )
                    use_loop = True
            if result is None:
                result = _looped(forward, args, in_dims, stop - start)
            parts.append(tuple(value.detach().to("cpu", torch.float64) for value in result))
            if progress is not None:
                progress(stop, samples)
    out: dict[str, torch.Tensor] = {}
    for index, node in enumerate(wanted):
        column = torch.cat([part[index].reshape(-1) for part in parts]) if parts else torch.empty(0)
        for layer in layers_of[node]:
            out[layer] = column
    return out


# --------------------------------------------------------------------------- internals


class _TapRecorder(fx.Interpreter):
    """Runs the graph and keeps mean(act^2) of the wanted nodes' outputs, nothing else."""

    def __init__(self, module: torch.nn.Module, wanted: list[str]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.wanted = set(wanted)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = _mean_square(out)
        return out


def _mean_square(value: Any) -> torch.Tensor:
    tensor = next(iter(tensor_leaves(value)), None)
    if tensor is None or not tensor.is_floating_point():
        return torch.tensor(math.nan, dtype=torch.float64)
    # float64 before squaring: a vanishing signal's squares underflow float32 long before it is 0.
    wide = tensor.to(torch.float64)
    return (wide * wide).mean()


def _lifted(
    program: Any, params: dict[str, torch.Tensor], device: torch.device
) -> tuple[list[tuple[torch.Tensor, int | None]], int | None]:
    """(tensor, in_dim) per lifted placeholder, and the sample count the batched ones share."""
    own = program_state(program)
    rows: list[tuple[torch.Tensor, int | None]] = []
    samples: int | None = None
    for _, kind, key in program_inputs(program):
        if kind == "USER_INPUT":
            continue
        if key not in own:
            raise ValueError(f"the program's input {key!r} ({kind}) cannot be supplied")
        original = own[key]
        value = params.get(key, original).detach()
        if value.dim() == original.dim() + 1 and tuple(value.shape[1:]) == tuple(original.shape):
            if value.shape[0] > 1 and value.stride(0) == 0:
                rows.append((value[0].to(device), None))  # an expanded (shared) tensor: pass it once
            else:
                rows.append((value, 0))  # moved chunk by chunk
            samples = _agree(samples, value.shape[0], key)
        elif tuple(value.shape) == tuple(original.shape):
            rows.append((value.to(device), None))
        else:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} is neither {tuple(original.shape)} "
                "nor that with a leading sample dimension"
            )
    return rows, samples


def _user_inputs(
    program: Any, x: torch.Tensor | Sequence[torch.Tensor], device: torch.device
) -> tuple[list[tuple[Any, int | None]], int | None]:
    given = [x] if isinstance(x, torch.Tensor) else list(x)
    placeholders = {node.name: node for node in program.graph_module.graph.nodes if node.op == "placeholder"}
    rows: list[tuple[Any, int | None]] = []
    samples: int | None = None
    tensors = iter(given)
    for spec in program.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        if not hasattr(spec.arg, "name") or spec.arg.name not in placeholders:
            rows.append((getattr(spec.arg, "value", None), None))  # a constant the trace specialized
            continue
        value = next(tensors, None)
        if value is None:
            raise ValueError("fewer inputs than the program takes")
        traced = placeholders[spec.arg.name].meta.get("val")
        shape = tuple(traced.shape) if isinstance(traced, torch.Tensor) else None
        if shape is not None and value.dim() == len(shape) + 1 and tuple(value.shape[1:]) == shape:
            rows.append((value, 0))
            samples = _agree(samples, value.shape[0], spec.arg.name)
        else:
            rows.append((value.to(device), None))
    if next(tensors, None) is not None:
        raise ValueError("more inputs than the program takes")
    return rows, samples


def _agree(a: int | None, b: int | None, what: str = "the input") -> int | None:
    if a is not None and b is not None and a != b:
        raise ValueError(f"{what}: {b} samples where the others have {a}")
    return a if a is not None else b


def _slice(rows: list[tuple[Any, Any]], start: int, stop: int, device: torch.device) -> tuple[Any, ...]:
    """This chunk's share: mapped tensors sliced and moved; shared ones are already there."""
    return tuple(value[start:stop].to(device) if dim == 0 else value for value, dim in rows)


def _vmapped(
    batched: Callable[..., Any], args: tuple[Any, ...], notes: list[str], probe: bool
) -> tuple[Any, ...]:
    """One vmapped chunk. SDPA runs its math backend (the fused CPU/CUDA kernels have no
    batching rule). vmap's per-op fallback (a silent loop for an op without a batching rule)
    stays on but quiet: it writes to stderr otherwise. With ``probe`` (the first chunk) the
    fallback is first switched off, so the error names the op, which goes into ``notes``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    functorch = torch._C._functorch
    set_fallback = getattr(functorch, "_set_vmap_fallback_enabled", None)
    set_warning = getattr(functorch, "_set_vmap_fallback_warning_enabled", None)
    enabled = functorch._is_vmap_fallback_enabled() if set_fallback is not None else True
    try:
        if set_warning is not None:
            set_warning(False)
        with sdpa_kernel([SDPBackend.MATH]):
            if probe and set_fallback is not None:
                set_fallback(False)
                try:
                    return batched(*args)
                except RuntimeError as error:
                    found = _NO_RULE.search(str(error))
                    if found is None:
                        raise
                    notes.append(f"vmap has no batching rule for {found.group(1)}: it ran sample by sample")
                finally:
                    set_fallback(enabled)
            return batched(*args)
    finally:
        if set_warning is not None:
            set_warning(True)


def _looped(
    forward: Callable[..., tuple[torch.Tensor, ...]],
    args: tuple[tuple[Any, ...], tuple[Any, ...]],
    in_dims: tuple[tuple[int | None, ...], tuple[int | None, ...]],
    size: int,
) -> tuple[torch.Tensor, ...]:
    rows = []
    for s in range(size):
        lifted = tuple(v[s] if d == 0 else v for v, d in zip(args[0], in_dims[0], strict=True))
        users = tuple(v[s] if d == 0 else v for v, d in zip(args[1], in_dims[1], strict=True))
        rows.append(forward(lifted, users))
    return tuple(torch.stack([row[i] for row in rows]) for i in range(len(rows[0]))) if rows else ()
