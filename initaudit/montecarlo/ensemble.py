"""Run an ExportedProgram over many parameter samples at once and record M_j at its taps.

The lifted program takes its parameters, buffers and constants as leading placeholders
(``program.graph_signature.input_specs``), so ``program.graph_module(*lifted, *user_inputs)``
is a pure function of the weights. :func:`run_ensemble` maps that function over a leading
sample dimension with ``torch.func.vmap``: one batched op per graph node for a whole chunk of
networks, instead of a Python loop of forward passes. An fx Interpreter runs the graph and
reduces every tap node's output, as soon as it is computed, to

    M_j = mean(act_j ** 2)  over all entries of the (batch-size-1) example, a float64 value,

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

Taps in float32. ``mean(act^2)`` is first reduced in float32 (a fused norm, 5-10x cheaper
than an upcast copy; on a small CNN the float64 taps took half the time). That is exact to
float32 rounding (~1e-7 relative) whenever the result is finite and at least
:data:`FAST_TAP_FLOOR`: squares that underflow (|a| < 1e-19) then weigh at most 1e-38 each
against a mean of 1e-30 or more, and an overflow anywhere shows as inf. When a chunk has a
value outside that range (a vanishing or exploding network, a tap that is exactly 0), the
chunk is rerun with float64 reductions, and so is every later chunk.

Exact Gaussian projection (:func:`projection_plan`). A dense weight drawn i.i.d. normal is
never materialized when only its action on the layer's input is needed and that is cheaper
(the derivation is in :func:`projection_plan`): the weight's placeholder receives per-sample
noise of shape (rank, width) instead, drawn by :func:`draw_noise`.

Exact shortcuts that change no value: a conv or linear bias that is one shared tensor of
zeros (He init's) is dropped from the call (vmap would add it as a separate pass over the
activations), and on Linux the first CPU run lets malloc keep freed memory for reuse
(:func:`_reuse_freed_memory`). On a small residual CNN, with chunks of ~100 samples, the
grouped convolutions vmap makes then take ~60% of the time at ~80 GFLOP/s on one core.

BatchNorm (``batchnorm="train"``). Each sample network normalizes by the statistics of its
own input (over the positions, and over the rows of the example when it has several), as
training does, instead of the running statistics the program holds (THEORY section 4,
"model it as training uses it"). A BatchNorm that sees one value per channel (BatchNorm1d on
a single vector) cannot normalize: it runs on its running statistics, and a note says so.
"""

from __future__ import annotations

import ctypes
import math
import re
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from initaudit.frontends.torch_graph import tensor_leaves

#: Bytes of sampled state (parameters and activations) one chunk may hold, per device kind.
#: Fixed rather than read from free memory, so a seed gives the same chunks on every machine.
#: CPU, one thread, CPU-time samples/s by chunk (with malloc keeping freed memory, see
#: _reuse_freed_memory): bench_mc's residual CNN 16: 1430, 32: 1640, 64: 1750, 128: 1720; with
#: BatchNorm 16: 890, 64: 1030, 128: 940; the 64 x 256 MLP with projection 64: 4700,
#: 256: 9200, 512: 9800, 1024: 9500. 64 MB gives about 100 and 500 samples for those.
CHUNK_BUDGET = {"cpu": 64 << 20, "cuda": 2 << 30}
#: Upper bound on a default chunk: progress stays visible and cache-sized batches stay fast.
MAX_CHUNK = 1024
#: Activation bytes per sample are multiplied by this: temporaries, float64 copies at taps.
_ACTIVATION_FACTOR = 3
#: A float32 tap reduction is trusted when its value is finite and at least this (module docstring).
FAST_TAP_FLOOR = 1e-30
#: A standard Gaussian draw weighed as this many flops when choosing between the Gaussian
#: projection and a full draw (normal_ costs 4-6 ns an entry on a CPU core, tens of flops of
#: a memory-bound batched product; the choice is rarely close: projection wins by the factor n/P).
DRAW_FLOPS = 10.0
BATCHNORM_MODES = ("eval", "train")

_NO_RULE = re.compile(r"(\S+) hit the vmap fallback which is currently disabled")

_aten = torch.ops.aten
#: Products of an input and a (possibly transposed) 2-D weight: target -> (input, weight, bias) arg index.
_PRODUCTS: dict[Any, tuple[int, int, int | None]] = {
    _aten.linear.default: (0, 1, 2),
    _aten.mm.default: (0, 1, None),
    _aten.matmul.default: (0, 1, None),
    _aten.addmm.default: (1, 2, 0),
}
#: BatchNorm forms in export programs: target -> (index of eps, outputs: 1, 3 or 5).
_BATCH_NORMS: dict[Any, tuple[int, int]] = {
    _aten.batch_norm.default: (7, 1),
    _aten.native_batch_norm.default: (7, 3),
    _aten._native_batch_norm_legit_no_training.default: (6, 3),
    _aten._native_batch_norm_legit.default: (7, 3),
    _aten._native_batch_norm_legit_functional.default: (7, 5),
}


#: Ops whose argument 2 is an optional bias: a bias that is zero for every sample is dropped.
_BIASED = (
    _aten.linear.default,
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.convolution.default,
)


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
    """Peak bytes of node outputs alive at once in one forward pass of one sample, from the
    traced shapes: the Interpreter frees each value after its last use (views are counted as
    if they were copies, so this errs high)."""
    nodes = list(program.graph_module.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for index, node in enumerate(nodes):
        for source in node.all_input_nodes:
            last_use[source] = index
    sizes: dict[fx.Node, int] = {}
    live = peak = 0
    for index, node in enumerate(nodes):
        if node.op == "call_function":
            size = sum(t.numel() * t.element_size() for t in tensor_leaves(node.meta.get("val")))
            sizes[node] = size
            live += size
            peak = max(peak, live)
        for source in node.all_input_nodes:
            if last_use.get(source) == index and source in sizes:
                live -= sizes.pop(source)
    return peak


def default_chunk(
    params: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    *,
    program: Any = None,
    samples: int | None = None,
    budget: int | None = None,
    projection: dict[str, Projection] | None = None,
) -> int:
    """Samples per chunk: the device's byte budget over one sample's parameters (and, given
    the program, its activations), at least 1 and at most :data:`MAX_CHUNK` (or ``samples``).
    A projected weight counts as its noise (rank x width), not its own size."""
    kind = torch.device(device).type
    budget = budget or CHUNK_BUDGET.get(kind, CHUNK_BUDGET["cpu"])
    projection = projection or {}
    per_sample = sum(
        t.numel() * t.element_size()
        for key, t in params.items()
        if t.is_floating_point() and key not in projection
    )
    per_sample += sum(p.noise_numel * p.dtype.itemsize for p in projection.values())
    if program is not None:
        per_sample += _ACTIVATION_FACTOR * activation_bytes(program)
    chunk = max(1, min(MAX_CHUNK, budget // max(per_sample, 1)))
    return min(chunk, samples) if samples else chunk


# --------------------------------------------------------------------------- Gaussian projection


@dataclass(frozen=True)
class Projection:
    """A dense weight drawn by its action on the input: see :func:`projection_plan`.

    ``placeholder``: the weight's placeholder; ``transpose``: the node transposing it on the way
    to ``product`` (None when the product reads it directly); ``product``: the linear / mm /
    matmul / addmm node; ``mean``, ``std``: the weight's normal law (resample's ``Law``);
    ``rows``: P, input rows per sample network; ``fan_in``: n; ``width``: m; ``rank``: min(P, n).
    """

    key: str
    placeholder: str
    transpose: str | None
    product: str
    mean: float
    std: float
    rows: int
    fan_in: int
    width: int
    rank: int
    dtype: torch.dtype = torch.float32

    @property
    def noise_numel(self) -> int:
        return self.rank * self.width


def projection_plan(
    program: Any, laws: dict[str, Any], *, draw_flops: float = DRAW_FLOPS
) -> dict[str, Projection]:
    """The dense weights of ``program`` to draw by exact Gaussian projection: {key -> Projection}.

    Which. A 2-D parameter whose law (``laws[key]``, from ``resample_laws``) is normal with a
    positive std, whose placeholder has exactly ONE user (tied weights take the full path),
    that user being the weight operand of ``aten.linear`` / ``mm`` / ``matmul`` / ``addmm``
    (alpha = beta = 1), directly or through one transpose (``t``, ``numpy_T``,
    ``transpose``, ``permute``) used only there; and only where it is cheaper than drawing the
    weight: counting a draw as ``draw_flops`` flops, r m draws + 2 n P r (R) + 2 P r m
    against m n draws + 2 P m n, which holds about when P < min(n, m).

    Derivation. The product computes ``O = A V^T`` (+ bias) from the sample network's input A
    (P x n: the example's rows, P = batch x tokens) and V, which is W (m x n) or W^T (a weight
    stored n x m): either way m x n with i.i.d. entries ``V = mu 1_m 1_n^T + sigma Z``,
    ``Z_kl ~ N(0, 1)``. V is drawn afresh and used by this node only, so Z is independent of
    A (a function of the input and of other tensors) and of everything upstream. Take the
    thin QR factorization ``A^T = Q R``, Q (n x r) with orthonormal columns, R (r x P),
    r = min(P, n). Then ``A Z^T = R^T (Z Q)^T``. Given A, the rows of Z are i.i.d.
    N(0, I_n), so the rows of Z Q are i.i.d. N(0, Q^T Q) = N(0, I_r): ``Z Q = G`` is an
    m x r matrix of i.i.d. N(0, 1) entries, independent of A. Hence, conditionally on A and
    therefore jointly with everything upstream,

        O  =_d  mu (A 1_n) 1_m^T + sigma R^T G^T,        G ~ N(0, 1)^(m x r) drawn fresh,

    exactly, at any size: not a large-width approximation. Nothing else reads V, so every
    tap downstream has its exact joint law too. Only R is needed (any R with
    R^T R = A A^T would do; QR in mode "r" is robust to rank deficiency). For P = 1,
    R = ||a|| and this is the dense-chain shortcut ``W a = ||a|| sigma g`` (mu = 0). The bias
    is drawn and added as before. The noise passed in place of the weight is ``H = G^T``,
    (r, m) per sample (:func:`draw_noise`).
    """
    graph = program.graph_module.graph
    keys = {placeholder: key for placeholder, kind, key in program_inputs(program) if kind == "PARAMETER"}
    state = program.state_dict
    plan: dict[str, Projection] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _PRODUCTS:
            continue
        a_index, w_index, _ = _PRODUCTS[node.target]
        if node.target is _aten.addmm.default and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
            continue
        if len(node.args) <= w_index or not isinstance(node.args[w_index], fx.Node):
            continue
        weight, transpose = node.args[w_index], None
        if weight.op == "call_function" and _is_transpose_2d(weight):
            if len(weight.users) != 1:
                continue
            weight, transpose = weight.args[0], weight
        if not isinstance(weight, fx.Node) or weight.op != "placeholder" or weight.name not in keys:
            continue
        key = keys[weight.name]
        law = laws.get(key)
        tensor = state.get(key)
        if law is None or law.kind != "normal" or not law.std > 0 or tensor is None or tensor.dim() != 2:
            continue
        if len(weight.users) != 1 or key in plan:
            continue  # tied: the same draw feeds several nodes, which the projection cannot reproduce
        a_val = node.args[a_index].meta.get("val") if isinstance(node.args[a_index], fx.Node) else None
        out_val = node.meta.get("val")
        if not isinstance(a_val, torch.Tensor) or not isinstance(out_val, torch.Tensor) or out_val.dim() < 1:
            continue
        fan_in, width = int(a_val.shape[-1]), int(out_val.shape[-1])
        if fan_in * width != tensor.numel() or not tensor.is_floating_point():
            continue
        rows = a_val.numel() // max(fan_in, 1)
        if rows > 1 and tensor.dtype not in (torch.float32, torch.float64):
            continue  # no QR in half precision
        rank = min(rows, fan_in)
        full = draw_flops * width * fan_in + 2.0 * rows * width * fan_in
        projected = draw_flops * width * rank + 2.0 * rows * rank * width
        projected += 2.0 * fan_in * rows * rank if rows > 1 else 2.0 * fan_in
        projected += rows * fan_in if law.mean else 0.0
        if rank >= fan_in or projected >= full:
            continue
        plan[key] = Projection(
            key=key,
            placeholder=weight.name,
            transpose=transpose.name if transpose is not None else None,
            product=node.name,
            mean=float(law.mean),
            std=float(law.std),
            rows=rows,
            fan_in=fan_in,
            width=width,
            rank=rank,
            dtype=tensor.dtype,
        )
    return plan


def draw_noise(
    plan: dict[str, Projection], samples: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The N(0, 1) noise every projected weight needs: {key -> (samples, rank, width)}, drawn on
    the generator's device in the weight's dtype (float32 for lower precisions), in plan order."""
    out: dict[str, torch.Tensor] = {}
    for key, proj in plan.items():
        dtype = torch.float64 if proj.dtype == torch.float64 else torch.float32
        noise = torch.empty((samples, proj.rank, proj.width), dtype=dtype, device=generator.device)
        out[key] = noise.normal_(generator=generator).to(proj.dtype)
    return out


def _is_transpose_2d(node: fx.Node) -> bool:
    """Whether ``node`` is a full transpose of a 2-D tensor."""
    source = node.args[0] if node.args else None
    val = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    if node.target in (_aten.t.default, _aten.numpy_T.default):
        return True
    if node.target is _aten.transpose.int and len(node.args) == 3:
        return {int(node.args[1]) % 2, int(node.args[2]) % 2} == {0, 1}
    if node.target is _aten.permute.default and len(node.args) == 2:
        return [int(d) % 2 for d in node.args[1]] == [1, 0]
    return False


# --------------------------------------------------------------------------- BatchNorm


def batchnorm_plan(program: Any, mode: str) -> tuple[set[str], list[str]]:
    """BatchNorm nodes to run on batch statistics under ``mode`` ("train"), and notes for those
    that cannot (one value per channel: the running statistics are used there)."""
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, not {mode!r}")
    train: set[str] = set()
    notes: list[str] = []
    if mode == "eval":
        return train, notes
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORMS:
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        if val.numel() // max(int(val.shape[1]), 1) > 1:
            train.add(node.name)
        else:
            notes.append(
                f"BatchNorm {node.name}: one value per channel (a single vector) has no batch statistics; "
                "it ran on its running statistics (inference mode)"
            )
    return train, notes


def _batch_norm_train(target: Any, args: tuple[Any, ...]) -> Any:
    """The op's outputs with batch statistics over every dimension but the channels (dim 1)."""
    eps_index, arity = _BATCH_NORMS[target]
    x, weight, bias = args[0], args[1], args[2]
    eps = float(args[eps_index]) if len(args) > eps_index else 1e-5
    out, mean, invstd = _aten.native_batch_norm.default(x, weight, bias, None, None, True, 0.0, eps)
    if arity == 1:
        return out
    if arity == 5:
        return out, mean, invstd, args[3], args[4]  # running statistics left as they are
    return out, mean, invstd


# --------------------------------------------------------------------------- the engine


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
    projection: dict[str, Projection] | None = None,
    noise: dict[str, torch.Tensor] | None = None,
    batchnorm: str = "eval",
) -> dict[str, torch.Tensor]:
    """M_j per sample at every tap: {layer -> (samples,) float64 tensor on the CPU}.

    ``taps`` maps layer names to fx node names of ``program.graph_module.graph`` (a graph's
    ``meta["_nodes"]``); ``params`` maps state-dict keys to sampled tensors (see the module
    docstring for what is batched). ``x`` is the user input (a tuple for several), of the
    traced shape or with a leading sample dimension. ``mode`` is "auto" (vmap, falling back
    to a loop), "vmap" or "loop". ``progress(done, total)`` is called after every chunk;
    ``notes`` collects lines about how the ensemble ran. A tap whose output is not floating
    point (token ids) reads NaN.

    ``projection`` (from :func:`projection_plan`) and ``noise`` (from :func:`draw_noise`, one
    (samples, rank, width) tensor per projected key): those weights are not read from
    ``params``; each product sees its exact Gaussian projection instead. ``batchnorm``:
    "eval" runs BatchNorm as the program holds it (running statistics), "train" on each
    sample network's batch statistics (module docstring).
    """
    if mode not in ("auto", "vmap", "loop"):
        raise ValueError(f"mode must be auto, vmap or loop, not {mode!r}")
    device = torch.device(device)
    notes = notes if notes is not None else []
    projection = dict(projection or {})
    noise = dict(noise or {})
    missing = [key for key in projection if key not in noise]
    if missing:
        raise ValueError(f"{missing[0]}: projected, but no noise was given for it")
    graph_module = program.graph_module
    node_names = {node.name for node in graph_module.graph.nodes}
    layers_of: dict[str, list[str]] = {}
    for layer, node in taps.items():
        if node in node_names:
            layers_of.setdefault(node, []).append(layer)
        else:
            notes.append(f"tap {layer!r}: no node {node!r} in the program; not measured")
    wanted = list(layers_of)
    train_bn, bn_notes = batchnorm_plan(program, batchnorm)
    for line in bn_notes:
        _note(notes, line)
    if projection:
        _note(
            notes,
            f"Gaussian projection: {len(projection)} dense weight(s) drawn as their exact action on each "
            "network's input, not entry by entry",
        )

    lifted, samples = _lifted(program, params, device, projection, noise)
    users, user_samples = _user_inputs(program, x, device)
    samples = _agree(samples, user_samples)
    if samples is None:
        raise ValueError("nothing has a leading sample dimension: pass sampled params or a batch of inputs")
    chunk = chunk or default_chunk(params, device, program=program, samples=samples, projection=projection)
    products = {p.product: p for p in projection.values()}
    passthrough = {p.transpose for p in projection.values() if p.transpose is not None}
    identity = _identity_args(program, *_constants(program, lifted), train_bn)
    if device.type == "cpu":
        _reuse_freed_memory()
    state = {"precise": False}
    fast: set[str] = set()

    def forward(lifted_args: tuple[Any, ...], user_args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        recorder = _TapRecorder(
            graph_module,
            wanted,
            precise=state["precise"],
            products=products,
            passthrough=passthrough,
            train_bn=train_bn,
            fast=fast,
            identity=identity,
        )
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
            for _attempt in range(2):
                fast.clear()
                result = None
                if not use_loop:
                    try:
                        result = _vmapped(batched, args, notes, probe=start == 0 and _attempt == 0)
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
                if state["precise"] or _trusted(result, wanted, fast):
                    break
                state["precise"] = True  # this chunk again, and every later one, in float64
                _note(notes, "taps reduced in float64: values beyond float32's safe range (M < 1e-30 or inf)")
            assert result is not None
            parts.append(tuple(value.detach().to("cpu", torch.float64) for value in result))
            if progress is not None:
                progress(stop, samples)
    out: dict[str, torch.Tensor] = {}
    for index, node in enumerate(wanted):
        column = torch.cat([part[index].reshape(-1) for part in parts]) if parts else torch.empty(0)
        for layer in layers_of[node]:
            out[layer] = column
    return out


def sample_ensemble(
    program: Any,
    taps: dict[str, str],
    x: torch.Tensor | Sequence[torch.Tensor],
    samples: int,
    generator: torch.Generator,
    *,
    laws: dict[str, Any] | None = None,
    scheme: str = "gaussian",
    project: bool = True,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
    batchnorm: str = "eval",
    mode: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    notes: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Draw ``samples`` networks chunk by chunk and run them: {layer -> (samples,) float64}.

    The program's parameters are resampled under ``scheme`` (or the given ``laws``, from
    ``resample_laws``); with ``project``, the weights :func:`projection_plan` selects are
    not drawn but projected (only normal laws qualify: ``gaussian``, or a normal law that
    ``scheme`` recognized; never bootstrap, uniform or inputs). Per chunk the other weights are
    drawn first, then the projection noise, both from ``generator``.
    """
    from initaudit.montecarlo.resample import resample, resample_laws

    device = torch.device(device)
    # Drawn where they are used: resample returns each draw on its tensor's device.
    params = {key: value.to(device) for key, value in program_parameters(program).items()}
    laws = laws if laws is not None else resample_laws(params, scheme)
    plan = projection_plan(program, laws) if project else {}
    rest = {key: value for key, value in params.items() if key not in plan}
    chunk = chunk or default_chunk(params, device, program=program, samples=samples, projection=plan)
    notes = notes if notes is not None else []
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        sampled = resample(rest, scheme, size, generator, laws=laws) if rest else {}
        noise = draw_noise(plan, size, generator)
        parts.append(
            run_ensemble(
                program,
                taps,
                x,
                sampled,
                chunk=size,
                device=device,
                mode=mode,
                notes=notes,
                projection=plan,
                noise=noise,
                batchnorm=batchnorm,
            )
        )
        if progress is not None:
            progress(start + size, samples)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]} if parts else {}


# --------------------------------------------------------------------------- internals


def _note(notes: list[str], line: str) -> None:
    if line not in notes:
        notes.append(line)


class _TapRecorder(fx.Interpreter):
    """Runs the graph and keeps mean(act^2) of the wanted nodes' outputs, nothing else;
    projected products, their transposes and train-mode BatchNorms run their own way."""

    def __init__(
        self,
        module: torch.nn.Module,
        wanted: list[str],
        *,
        precise: bool = False,
        products: dict[str, Projection] | None = None,
        passthrough: Collection[str] = (),
        train_bn: Collection[str] = (),
        fast: set[str] | None = None,
        identity: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.wanted = set(wanted)
        self.values: dict[str, torch.Tensor] = {}
        self.precise = precise
        self.products = products or {}
        self.passthrough = set(passthrough)
        self.train_bn = set(train_bn)
        self.fast = fast if fast is not None else set()
        self.identity = identity or {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and (
            n.name in self.passthrough
            or n.name in self.products
            or n.name in self.train_bn
            or n.name in self.identity
        ):
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                if n.name in self.identity:
                    args = tuple(None if i in self.identity[n.name] else a for i, a in enumerate(args))
                if n.name in self.passthrough:
                    out = args[0]  # the projected weight's noise, for its product
                elif n.name in self.products:
                    out = _project(self.products[n.name], n.target, args, kwargs)
                elif n.name in self.train_bn:
                    out = _batch_norm_train(n.target, args)
                else:
                    out = n.target(*args, **kwargs)
        else:
            out = super().run_node(n)
        if n.name in self.wanted:
            value, fast = _mean_square(out, self.precise)
            self.values[n.name] = value
            if fast:
                self.fast.add(n.name)
        return out


def _constants(program: Any, lifted: list[tuple[torch.Tensor, int | None]]) -> tuple[set[str], set[str]]:
    """Placeholders fed one shared tensor of zeros, and one of ones (kept zero biases, BatchNorm's
    gamma = 1 and beta = 0 at init)."""
    placeholders = [name for name, kind, _ in program_inputs(program) if kind != "USER_INPUT"]
    zeros: set[str] = set()
    ones: set[str] = set()
    for name, (value, dim) in zip(placeholders, lifted, strict=True):
        if dim is not None or not value.is_floating_point() or value.numel() == 0:
            continue
        if not bool(value.any()):
            zeros.add(name)
        elif bool((value == 1).all()):
            ones.add(name)
    return zeros, ones


def _identity_args(
    program: Any, zeros: set[str], ones: set[str], train_bn: set[str]
) -> dict[str, tuple[int, ...]]:
    """{node -> argument positions to pass as None}: a zero bias of a conv/linear, and the
    identity affine (gamma = 1, beta = 0) of a BatchNorm run on batch statistics. Leaving them
    out changes no value; vmap would apply each as an extra pass over the activations."""
    out: dict[str, tuple[int, ...]] = {}

    def named(arg: Any, names: set[str]) -> bool:
        return isinstance(arg, fx.Node) and arg.name in names

    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or len(node.args) < 3:
            continue
        if node.target in _BIASED and named(node.args[2], zeros):
            out[node.name] = (2,)
        elif node.name in train_bn:
            drop = tuple(i for i, names in ((1, ones), (2, zeros)) if named(node.args[i], names))
            if drop:
                out[node.name] = drop
    return out


_MALLOC_TUNED = False


def _reuse_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse (once per process, Linux only).

    Chunk-sized activations (a few MB) are allocated and freed at every node. By default glibc
    returns the freed top of its heap to the system beyond a small, dynamic threshold, and the
    next allocation page-faults fresh zeroed pages in: ~200 faults per sample on a small CNN at
    32-64 samples a chunk, 10-40% of the run (measured with getrusage). Raising the mmap
    threshold to 32 MB and the trim threshold to 256 MB (mallopt) keeps that memory in the
    process for reuse; nothing else changes. The process keeps up to 256 MB of freed heap.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(32 << 20))
    mallopt(ctypes.c_int(m_trim_threshold), ctypes.c_int(256 << 20))


def _project(proj: Projection, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """``O = mu (A 1) 1^T + sigma R^T H (+ bias)`` for one sample network (see projection_plan)."""
    a_index, w_index, b_index = _PRODUCTS[target]
    a, noise = args[a_index], args[w_index]
    bias = args[b_index] if b_index is not None and len(args) > b_index else kwargs.get("bias")
    rows = a.reshape(-1, a.shape[-1])
    if rows.shape[0] == 1:
        factor = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)  # R = ||a||, 1 x 1
        out = (proj.std * factor) * noise
    else:
        r_t = torch.linalg.qr(rows.mT, mode="r").R.mT  # (P, r)
        out = proj.std * (r_t @ noise)
    if proj.mean:
        out = out + proj.mean * rows.sum(-1, keepdim=True)
    if bias is not None:
        out = out + bias
    return out.reshape(*a.shape[:-1], out.shape[-1])


def _mean_square(value: Any, precise: bool) -> tuple[torch.Tensor, bool]:
    """mean(value^2) as a float64 scalar, and whether it was reduced in float32 (module docstring)."""
    tensor = next(iter(tensor_leaves(value)), None)
    if tensor is None or not tensor.is_floating_point():
        return torch.tensor(math.nan, dtype=torch.float64), False
    count = max(tensor.numel(), 1)
    if precise or tensor.dtype == torch.float64:
        # float64 squares: a vanishing signal's squares underflow float32 long before it is 0.
        return torch.linalg.vector_norm(tensor, dtype=torch.float64).square() / count, False
    narrow = tensor if tensor.dtype == torch.float32 else tensor.float()
    return torch.linalg.vector_norm(narrow).double().square() / count, True


def _trusted(result: tuple[torch.Tensor, ...], wanted: list[str], fast: set[str]) -> bool:
    """Whether every float32-reduced tap value is in the range where float32 is exact enough."""
    for name, value in zip(wanted, result, strict=True):
        if name in fast:
            value = value.detach()
            if not bool(torch.isfinite(value).all()) or bool((value < FAST_TAP_FLOOR).any()):
                return False
    return True


def _lifted(
    program: Any,
    params: dict[str, torch.Tensor],
    device: torch.device,
    projection: dict[str, Projection] | None = None,
    noise: dict[str, torch.Tensor] | None = None,
) -> tuple[list[tuple[torch.Tensor, int | None]], int | None]:
    """(tensor, in_dim) per lifted placeholder, and the sample count the batched ones share.
    A projected weight's placeholder gets its noise (mapped)."""
    own = program_state(program)
    projection, noise = projection or {}, noise or {}
    rows: list[tuple[torch.Tensor, int | None]] = []
    samples: int | None = None
    for _, kind, key in program_inputs(program):
        if kind == "USER_INPUT":
            continue
        if key in projection:
            value = noise[key]
            proj = projection[key]
            if value.dim() != 3 or tuple(value.shape[1:]) != (proj.rank, proj.width):
                expected = f"(samples, {proj.rank}, {proj.width})"
                raise ValueError(f"{key}: noise of shape {tuple(value.shape)}, expected {expected}")
            rows.append((value, 0))
            samples = _agree(samples, value.shape[0], key)
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
