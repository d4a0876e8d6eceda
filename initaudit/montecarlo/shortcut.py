"""The distributional shortcut: Monte Carlo of a dense chain in O(width) per layer.

For a chain ``input -> dense -> activation -> ... -> dense -> activation`` under Gaussian
resampling, the full simulation draws every weight matrix. It does not have to.

Derivation. Dense layer j computes ``z = W a + b`` with entries ``W_kl ~ N(mu_w, s^2)`` and
``b_k ~ N(mu_b, s_b^2)``, all i.i.d. and drawn afresh for layer j, hence independent of its
input ``a`` (a function of the input and of the earlier layers only). Given ``a``, the rows
``w_k`` are i.i.d. ``N(mu_w 1, s^2 I)``, so the ``z_k = w_k . a + b_k`` are i.i.d. Gaussians:

    z | a  ~  N( (mu_w sum_l a_l + mu_b) 1,  (s^2 ||a||^2 + s_b^2) I_n )
    z     =_d  sqrt(s^2 ||a||^2 + s_b^2) g + (mu_w sum_l a_l + mu_b) 1,    g ~ N(0, I_n) new

Because this holds conditionally on the whole past, drawing ``g`` layer after layer gives
the joint law of the full trajectory (every ``z_j`` and ``a_j``, so every tap and the
per-network FM2 quantity), exactly, at any width: this is not a mean-field or large-width
approximation. The cost is O(n_j) per layer and sample instead of O(n_{j-1} n_j).
Activations, scales and reshapes then act on the drawn vector as the network would.

The input: the first layer sees only ``||x||`` (and ``sum x`` when a weight mean is kept),
by rotation invariance of the isotropic Gaussian, so no input direction is needed. We start
from ``||x||^2 = m0 n_0``, i.e. ``M_0 = m0`` (1 by default, as the analytic path assumes).
Only if something elementwise acts on the raw input (an activation before the first dense
layer) or the first weight keeps a mean is an input vector needed; it is ``x`` when given,
else one fixed draw of N(0, 1) entries rescaled to mean square ``m0``.

Means: the same law as ``resample``'s "gaussian" scheme, so both engines sample alike. Each
tensor is drawn from ``N(m, s^2)`` with ``s^2 = E[(w - m)^2]``, and its mean ``m`` is kept only
where it is real, not sampling noise: ``means="auto"`` keeps it when
``|mean| > 4 std / sqrt(count)`` (a constant bias of 0.01, or any tensor with std 0, is then
reproduced exactly) and else sets ``m = 0``, so that ``s^2`` is the second moment ``E[w^2]``,
the number the analytic prediction reads. The He/Xavier/LeCun/PyTorch-default laws are
zero-mean; their empirical means are noise of order std/sqrt(count). ``"keep"`` and
``"zero"`` force either choice. A kept weight mean is still exact (the rank-one term above).

What the shortcut does not reproduce: the weights' own law when it is not Gaussian (a
uniform init has kurtosis 1.8); by THEORY section 3 the kurtosis enters the length only at
order 1/(n_{j-1} n_j). A SCALE layer is applied as its scalar ``value`` (exact for a scalar
constant; a per-unit constant is represented by its root mean square in the layer graph).
Graphs that are not such a chain (joins, convs, norms, pools, unmodeled ops, per-token dense
layers) return None: the caller then runs the ensemble engine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from initaudit.graph import Kind, Layer, LayerGraph

#: Elements per (chunk x width) tensor. The work is elementwise and memory-bound, so on CPU a
#: chunk that stays in cache (2^16 float64 = 512 KiB) ran 1.5-5x faster than one big step
#: (measured, width 32 and 256); on a GPU large steps amortize the kernel launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 25}
_SIGNIFICANT = 4.0  # a mean is real this many standard errors from zero (= resample.MEAN_SIGMAS)


def _torch_activation(layer: Layer) -> Callable[[Any], Any] | None:
    """The activation as a torch function, with the parameters ``theory.activations`` uses."""
    import torch
    import torch.nn.functional as F

    from initaudit.theory.activations import SELU_ALPHA, SELU_SCALE

    name = layer.activation or "identity"
    alpha = layer.attrs.get("alpha")
    if name in ("leaky_relu", "prelu"):
        slope = 0.01 if alpha is None else float(alpha)
        return lambda x: F.leaky_relu(x, slope)
    if name == "elu":
        a = 1.0 if alpha is None else float(alpha)
        return lambda x: F.elu(x, a)
    if name == "selu":
        a = SELU_ALPHA if alpha is None else float(alpha)
        scale = float(layer.attrs.get("gamma", SELU_SCALE))
        return lambda x: scale * F.elu(x, a)
    if name == "gelu":
        approximate = "tanh" if layer.attrs.get("approximate") == "tanh" else "none"
        return lambda x: F.gelu(x, approximate=approximate)
    fixed: dict[str, Callable[[Any], Any]] = {
        "relu": torch.relu,
        "identity": lambda x: x,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": F.softplus,
        "silu": F.silu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    return fixed.get(name)


def _law(stats: Any, means: str) -> tuple[float, float]:
    """(std, mean) of the Gaussian a tensor is redrawn from (see the module docstring)."""
    if stats is None:
        return 0.0, 0.0
    mean, std, count = float(stats.mean), float(stats.std), max(int(stats.count), 1)
    if means == "keep" or (means == "auto" and abs(mean) > _SIGNIFICANT * std / math.sqrt(count)):
        return std, mean
    return math.sqrt(max(float(stats.second_moment), 0.0)), 0.0


def _elements(layer: Layer) -> int | None:
    """Entries per example of the input: the product of its non-batch dimensions."""
    shape = layer.shape
    if not shape:
        return layer.width
    dims = shape[1:] if len(shape) >= 2 else shape
    if any(d is None for d in dims):
        return layer.width if len(shape) <= 2 else None
    return int(math.prod(dims))  # type: ignore[arg-type]


def _plan(graph: LayerGraph, means: str) -> list[tuple[Layer, Any]] | None:
    """Check that ``graph`` is a chain the shortcut handles; per layer what to do, or None."""
    layers = graph.layers
    if not layers or layers[0].kind is not Kind.INPUT or graph.inputs != [layers[0].name]:
        return None
    if graph.outputs != [layers[-1].name]:
        return None
    count = _elements(layers[0])
    if not count:
        return None
    plan: list[tuple[Layer, Any]] = [(layers[0], count)]
    for previous, layer in itertools.pairwise(layers):
        if layer.inputs != [previous.name] or len(graph.consumers(previous.name)) != 1:
            return None
        if layer.kind is Kind.DENSE:
            weight, bias = layer.weight, layer.bias
            width = layer.width or layer.fan_out or (weight.shape[0] if weight is not None else None)
            if weight is None or not weight.finite or not width:
                return None
            if (layer.fan_in or count) != count:
                return None  # applied per position (tokens): the outputs share W, not a chain
            if bias is not None and not bias.finite:
                return None
            op = (int(width), *_law(weight, means), *_law(bias, means))
            if not all(math.isfinite(v) for v in op):
                return None
            count = int(width)
        elif layer.kind is Kind.ACTIVATION:
            op = _torch_activation(layer)
            if op is None:
                return None
        elif layer.kind is Kind.SCALE:
            op = float(layer.attrs.get("value", 1.0))
            if not math.isfinite(op):
                return None
        elif layer.kind is Kind.RESHAPE:
            op = None
        else:
            return None
        plan.append((layer, op))
    return plan


def _default_taps(graph: LayerGraph) -> list[str]:
    taps = [layer.name for layer in graph if layer.kind is Kind.ACTIVATION]
    return taps or list(graph.outputs)


def _device_generator(generator: Any, device: Any) -> Any:
    """A generator on ``device``: the given one, or one seeded from it (deterministically)."""
    import torch

    device = torch.device(device)
    if generator is None:
        return torch.Generator(device=device).manual_seed(0)
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def shortcut_chain(
    graph: LayerGraph,
    samples: int,
    generator: Any,
    device: Any,
    *,
    taps: Iterable[str] | None = None,
    m0: float = 1.0,
    x: Any = None,
    means: str = "auto",
    chunk: int | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray] | None:
    """M_j / M_0 per sampled network at each tap, for a dense chain under Gaussian resampling.

    ``graph``: input, then dense, elementwise activation, scale and reshape layers, one input
    each (anything else: None, use the ensemble engine). ``generator``: a torch.Generator; if
    it lives on another device than ``device``, a generator on ``device`` is seeded from it.
    ``taps``: layer names to report (default: the activation layers; the output if there are
    none); any layer of the chain may be named, the input included (always 1).
    ``m0``: the input's mean square M_0; ``x``: a fixed input vector (its own mean square is
    used then); ``means``: "auto", "keep" or "zero" (module docstring); ``chunk``: samples per
    step (default from width); ``dtype``: torch dtype of the simulation (float64 by default:
    a 64-layer PyTorch-default chain reaches 6^-64 ~ 1e-50, below float32's range).

    Returns {tap: float64 array of shape (samples,)}, row s of every array from network s.
    """
    import torch

    if means not in ("auto", "keep", "zero"):
        raise ValueError(f"means={means!r}: expected 'auto', 'keep' or 'zero'")
    plan = _plan(graph, means)
    if plan is None:
        return None
    wanted = list(_default_taps(graph) if taps is None else taps)
    unknown = [name for name in wanted if name not in graph]
    if unknown:
        raise KeyError(f"no layer named {unknown[0]!r} in the graph")
    device = torch.device(device)
    dtype = dtype or torch.float64
    gen = _device_generator(generator, device)
    n0 = int(plan[0][1])
    x_vec = None
    if x is not None:
        x_vec = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1), dtype=dtype, device=device)
        if x_vec.numel() != n0:
            raise ValueError(f"x has {x_vec.numel()} entries, the input layer {n0}")
        m0 = float(x_vec.double().pow(2).mean())
    if not m0 > 0:
        raise ValueError("the input's mean square M_0 must be positive")
    widest = max(int(op[0]) if layer.kind is Kind.DENSE else 0 for layer, op in plan)
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    chunk = chunk or max(1, budget // max(widest, n0, 1))
    out = {name: np.empty(samples, dtype=np.float64) for name in wanted}
    if x_vec is None and _needs_vector(plan):
        # One fixed input for the whole run, as the full simulation has.
        x_vec = torch.randn(n0, generator=gen, device=device, dtype=dtype)
        x_vec = x_vec * math.sqrt(m0 / float(x_vec.double().pow(2).mean()))
    with _one_thread(device):
        done = 0
        while done < samples:
            size = min(chunk, samples - done)
            values = _run_chunk(plan, set(wanted), size, gen, device, dtype, m0, x_vec)
            for name in wanted:
                out[name][done : done + size] = values[name]
            done += size
    return out


@contextmanager
def _one_thread(device: Any) -> Iterator[None]:
    """Run CPU work on one intra-op thread, restoring the setting after. The noise is drawn
    sequentially anyway and each op is a small cache-sized step, so a second thread gains
    little; but some kernels (sqrt, pow) split even 512 entries across the OpenMP pool, and
    on a loaded machine each such barrier costs milliseconds (measured: 1 us -> 5 ms)."""
    import torch

    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _normal(shape: tuple[int, int], gen: Any, device: Any, dtype: Any) -> Any:
    """Standard normal noise in ``dtype``. On CPU a float64 draw costs 4-5x a float32 one, so
    the noise is drawn in float32 (Gaussian to 2^-24) and the arithmetic stays in float64."""
    import torch

    if dtype == torch.float64 and torch.device(device).type == "cpu":
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def _squared_norm(a: Any) -> Any:
    """||a||^2 per row: one fused pass (4x faster on CPU than a.pow(2).sum(1))."""
    import torch

    return torch.linalg.vector_norm(a, dim=1).square()


def _needs_vector(plan: list[tuple[Layer, Any]]) -> bool:
    """Whether the input's direction matters: something elementwise before the first dense
    layer, or a first dense layer that keeps a weight mean."""
    for layer, op in plan[1:]:
        if layer.kind is Kind.DENSE:
            return op[2] != 0.0
        if layer.kind is Kind.ACTIVATION:
            return True
    return False


def _run_chunk(
    plan: list[tuple[Layer, Any]],
    wanted: set[str],
    size: int,
    gen: Any,
    device: Any,
    dtype: Any,
    m0: float,
    x_vec: Any,
) -> dict[str, np.ndarray]:
    """One chunk of ``size`` networks. State: the activations ``a`` (size, n); before any
    elementwise op only their squared norm ``sq`` is needed (the direction is irrelevant)."""
    import torch

    n = int(plan[0][1])
    a = x_vec.expand(size, n) if x_vec is not None else None
    sq: Any = torch.full((size,), m0 * n, dtype=dtype, device=device)  # ||a||^2, None when stale
    values: dict[str, np.ndarray] = {}
    for layer, op in plan:
        if layer.kind is Kind.DENSE:
            width, std, w_mean, b_std, b_mean = op
            if sq is None:
                sq = _squared_norm(a)
            shift = w_mean * a.sum(1, keepdim=True) + b_mean if w_mean else b_mean
            scale = torch.sqrt(std * std * sq + b_std * b_std).unsqueeze(1)
            a = _normal((size, width), gen, device, dtype).mul_(scale)
            if not isinstance(shift, float) or shift != 0.0:
                a = a.add_(shift)
            n, sq = width, None
        elif layer.kind is Kind.ACTIVATION:
            a, sq = op(a), None
        elif layer.kind is Kind.SCALE:
            a = a * op if a is not None else None
            sq = sq * (op * op) if sq is not None else None
        if layer.name in wanted:
            if sq is None:
                sq = _squared_norm(a)
            values[layer.name] = (sq / (n * m0)).double().cpu().numpy()
    return values
