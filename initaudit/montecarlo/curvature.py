"""Curvature and gradients at initialization (Orvieto et al. 2022; Hanin 2018).

For a few random inits of a network and one fixed input ``x``, this measures the loss landscape a
first optimizer step sees: the loss is ``0.5 * ||f(x) - y||^2 / N`` (``N`` = number of output
entries) with random targets ``y ~ N(0, 1)`` drawn once per init. Per init it estimates

- the top Hessian eigenvalue (the largest, not the largest in magnitude) by power iteration on
  Hessian-vector products; if the dominant eigenvalue is negative, a second power iteration on the
  shifted operator ``H - lambda I`` finds the top one;
- the Hessian trace by Hutchinson's estimator with Rademacher probes, with its standard error;
- the gradient norm of every parameter tensor (by state-dict key): a network whose first layers
  get gradients orders of magnitude smaller than its last ones will not train them.

Hessian-vector products come from double backward through one retained graph (one forward per
init). Ops without a double backward (e.g. fused attention kernels on CUDA) fall back to central
finite differences of gradients, with the RNG replayed so dropout masks agree.

The module runs in the mode it is in (train/eval), with copies of its buffers, so it is never
modified. Inits: init 0 is the module's own parameters (unless ``keep_own=False``); the others
come from ``resample(params)``, by default :func:`gaussian_redraw` (each tensor redrawn from
``N(0, std^2)`` with its own std; constant tensors such as zero biases or norm gammas kept).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from initaudit.errors import UsageError

if TYPE_CHECKING:
    import torch

#: params -> params with the same keys, shapes, dtypes and devices (one fresh init).
Resample = Callable[[dict[str, "torch.Tensor"]], dict[str, "torch.Tensor"]]
#: flat vector (P,) -> H v (P,); batched: (B, P) -> (B, P).
Operator = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass
class InitCurvature:
    """What one init measured."""

    top_eigenvalue: float
    iterations: int  # Hessian-vector products spent in power iteration (both stages)
    converged: bool
    trace: float
    trace_se: float  # standard error of the Hutchinson mean (nan with one probe)
    loss: float
    grad_norms: dict[str, float]  # state-dict key -> ||dL/dtheta||_2
    method: str  # "autograd" (double backward) or "finite-difference"
    param_norms: dict[str, float] = field(default_factory=dict)  # state-dict key -> ||theta||_2


@dataclass
class CurvatureResult:
    """Medians over inits, and every init's numbers."""

    top_eigenvalue: float
    trace: float
    grad_norms: dict[str, float]  # state-dict key -> median over inits
    per_init: list[InitCurvature]
    parameters: int  # scalar parameters the Hessian is over
    output_entries: int  # N in the loss
    seconds: float
    shapes: dict[str, list[int]] = field(default_factory=dict)  # state-dict key -> shape

    def relative_gradients(self) -> dict[str, float]:
        """Weight matrix/kernel (2-D or more, nonzero) -> median over inits of ||dL/dW|| / ||W||.

        This is the step SGD takes on a layer relative to the layer's size, per unit learning
        rate: where it differs by orders of magnitude across layers, one learning rate cannot
        train them all (Hanin 2018's exploding and vanishing gradients)."""
        out: dict[str, float] = {}
        for key, shape in self.shapes.items():
            if len(shape) < 2:
                continue
            ratios = [
                r.grad_norms[key] / r.param_norms[key]
                for r in self.per_init
                if r.param_norms.get(key, 0.0) > 0 and key in r.grad_norms
            ]
            if ratios:
                out[key] = float(np.median(ratios))
        return out

    @property
    def top_eigenvalues(self) -> list[float]:
        return [r.top_eigenvalue for r in self.per_init]

    @property
    def traces(self) -> list[float]:
        return [r.trace for r in self.per_init]

    @property
    def trace_ses(self) -> list[float]:
        return [r.trace_se for r in self.per_init]

    @property
    def iterations(self) -> list[int]:
        return [r.iterations for r in self.per_init]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (nan becomes None). Shapes and parameter norms stay out: the report
        schema has no place for them (IA402's evidence carries the relative gradients)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(u) for k, u in v.items()}
            if isinstance(v, list):
                return [clean(u) for u in v]
            return v

        data = asdict(self)
        data.pop("shapes", None)
        for init in data["per_init"]:
            init.pop("param_norms", None)
        return clean(data)


def gaussian_redraw(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each floating tensor redrawn from N(0, std^2) with its own std, about zero.

    Constant tensors (std 0: zero biases, norm gammas of ones), single entries and non-floating
    tensors are kept as they are: their value is a choice of the architecture, not a random draw.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, t in params.items():
        if not t.is_floating_point() or t.numel() < 2:
            out[key] = t
            continue
        std = float(t.detach().double().std())
        if not math.isfinite(std) or std == 0.0:
            out[key] = t
            continue
        draw = torch.randn(t.shape, generator=generator, device=generator.device, dtype=torch.float64)
        out[key] = (draw * std).to(dtype=t.dtype, device=t.device)
    return out


def power_iteration(
    op: Operator, v0: torch.Tensor, *, iters: int, tol: float = 1e-5
) -> tuple[float, int, bool]:
    """Largest (algebraic) eigenvalue of the symmetric operator ``op``: (value, products, converged).

    Stops when the Rayleigh quotient changes by at most ``tol`` relative. If the eigenvalue of
    largest magnitude is negative, a second run on ``op - lambda I`` (``iters`` more products at
    most) finds the top one: ``top - lambda`` is then the dominant, non-negative eigenvalue.
    """
    lam, used, converged = _dominant(op, v0, iters=iters, tol=tol)
    if lam >= 0.0:
        return lam, used, converged
    shift = lam

    def shifted(v: torch.Tensor) -> torch.Tensor:
        return op(v) - shift * v

    mu, used2, converged2 = _dominant(shifted, v0, iters=iters, tol=tol)
    return mu + shift, used + used2, converged and converged2


def _dominant(op: Operator, v0: torch.Tensor, *, iters: int, tol: float) -> tuple[float, int, bool]:
    v = v0 / v0.norm()
    lam_prev = math.nan
    lam = 0.0
    for k in range(1, iters + 1):
        w = op(v)
        # Rayleigh quotient accumulated in float64: float32 dot products over millions of entries drift
        lam = float(_dot64(v, w))
        norm = float(w.norm())
        if norm == 0.0:  # v is in the null space: the operator is zero on it
            return 0.0, k, True
        if k > 1 and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-30):
            return lam, k, True
        lam_prev = lam
        v = w / norm
    return lam, iters, False


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product (or row-wise dot products of 2-d inputs) in float64."""
    import torch

    return (a.to(torch.float64) * b.to(torch.float64)).sum(dim=-1)


def hutchinson(
    op_batched: Operator,
    parameters: int,
    *,
    probes: int,
    generator: torch.Generator,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[float, float]:
    """Trace of ``op`` by Hutchinson with Rademacher probes: (mean of z^T H z, its standard error)."""
    import torch

    values: list[torch.Tensor] = []
    left = probes
    while left > 0:
        b = min(batch, left)
        z = torch.randint(0, 2, (b, parameters), generator=generator, device=generator.device)
        z = (2 * z - 1).to(dtype=dtype, device=device)
        values.append(_dot64(z, op_batched(z)).cpu())
        left -= b
    q = torch.cat(values).numpy()
    se = float(q.std(ddof=1) / math.sqrt(len(q))) if len(q) > 1 else math.nan
    return float(q.mean()), se


class _Objective:
    """The loss of one init, its gradient, and Hessian-vector products on flat vectors."""

    def __init__(
        self,
        module: torch.nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        generator: torch.Generator,
        method: str,
        y: torch.Tensor | None,
    ) -> None:
        import torch

        self.module = module
        self.keys = list(params)
        self.shapes = [params[k].shape for k in self.keys]
        self.sizes = [params[k].numel() for k in self.keys]
        self.buffers = buffers
        self.inputs = inputs
        self.theta = torch.cat([params[k].detach().reshape(-1) for k in self.keys])
        self.leaves = [params[k].detach().clone().requires_grad_(True) for k in self.keys]
        self.rng_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.enable_grad(), self._fixed_rng():
            out = self._forward(self.leaves)
            self.output_entries = out.numel()
            if y is None:
                y = torch.randn(out.shape, generator=generator, device=generator.device, dtype=out.dtype)
            elif y.shape != out.shape:
                raise UsageError(f"targets have shape {tuple(y.shape)}, the output {tuple(out.shape)}")
            self.target = y.to(device=out.device, dtype=out.dtype)
            loss = self._loss(out)
            grads = torch.autograd.grad(
                loss, self.leaves, create_graph=method != "finite-difference", allow_unused=True
            )
        self.loss = float(loss.detach())
        self.grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(self.leaves, grads, strict=True)
        ]
        self.grad_norms = {
            k: float(g.detach().double().norm()) for k, g in zip(self.keys, self.grads, strict=True)
        }
        # parameters whose gradient does not depend on any parameter have zero Hessian rows and columns
        self._live = [i for i, g in enumerate(self.grads) if g.requires_grad]
        self.method = "autograd" if method != "finite-difference" else "finite-difference"
        self.fallback = method == "auto"
        self._batched_ok = True

    @property
    def parameters(self) -> int:
        return int(self.theta.numel())

    def _fixed_rng(self) -> Any:
        """Same random stream on every forward, so dropout masks agree across finite differences."""
        import contextlib

        import torch

        devices = [self.theta.device] if self.theta.device.type == "cuda" else []
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(self.rng_seed)
        return stack

    def _forward(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        import torch

        out = torch.func.functional_call(
            self.module, (dict(zip(self.keys, leaves, strict=True)), self.buffers), self.inputs
        )
        out = _first_tensor(out)
        if not out.is_floating_point():
            raise UsageError(f"the network's output is {out.dtype}, not floating point: no squared loss")
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def _loss(self, out: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out - self.target).pow(2).sum() / out.numel()

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(..., P) -> per-parameter views of shape (..., *shape)."""
        lead = flat.shape[:-1]
        return [
            part.reshape(*lead, *shape)
            for part, shape in zip(flat.split(self.sizes, dim=-1), self.shapes, strict=True)
        ]

    def _flat(self, parts: list[torch.Tensor | None], lead: tuple[int, ...]) -> torch.Tensor:
        import torch

        return torch.cat(
            [
                torch.zeros(*lead, n, dtype=self.theta.dtype, device=self.theta.device)
                if p is None
                else p.reshape(*lead, n)
                for p, n in zip(parts, self.sizes, strict=True)
            ],
            dim=-1,
        )

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat (P,) vector."""
        import torch

        if self.method == "autograd":
            try:
                return self._hvp_autograd(v, batched=False)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError) as exc:
                if not self.fallback:
                    raise UsageError(
                        f"an op in this network has no double backward ({str(exc).splitlines()[0]}): "
                        "use method 'auto' or 'finite-difference'"
                    ) from exc
                self._switch_to_fd()
        return self._hvp_fd(v)

    def hvp_batched(self, vs: torch.Tensor) -> torch.Tensor:
        """H v for each row of a (B, P) matrix."""
        import torch

        if self.method == "autograd" and self._batched_ok:
            try:
                return self._hvp_autograd(vs, batched=True)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError):
                # vmap over the backward is not supported by every op: go row by row
                self._batched_ok = False
        return torch.stack([self.hvp(v) for v in vs])

    def _switch_to_fd(self) -> None:
        self.method = "finite-difference"
        self.grads = [g.detach() for g in self.grads]  # free the double-backward graph

    def _hvp_autograd(self, v: torch.Tensor, *, batched: bool) -> torch.Tensor:
        import torch

        lead = tuple(v.shape[:-1])
        if not self._live:
            return torch.zeros_like(v)
        parts = self._split(v)
        hs = torch.autograd.grad(
            [self.grads[i] for i in self._live],
            self.leaves,
            grad_outputs=[parts[i] for i in self._live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return self._flat(list(hs), lead)

    def _grad_at(self, theta: torch.Tensor) -> torch.Tensor:
        import torch

        leaves = [p.clone().requires_grad_(True) for p in self._split(theta)]
        with torch.enable_grad(), self._fixed_rng():
            loss = self._loss(self._forward(leaves))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return self._flat(list(grads), ())

    def _hvp_fd(self, v: torch.Tensor) -> torch.Tensor:
        """Central differences of the gradient: error O(eps^2), step scaled to the parameters."""
        import torch

        vnorm = float(v.norm())
        if vnorm == 0.0:
            return torch.zeros_like(v)
        step = torch.finfo(self.theta.dtype).eps ** (1 / 3) * (1.0 + float(self.theta.norm())) / vnorm
        return (self._grad_at(self.theta + step * v) - self._grad_at(self.theta - step * v)) / (2 * step)


def _first_tensor(out: Any) -> torch.Tensor:
    """The network's main output: the tensor itself, or the first tensor of a tuple/list/dict."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # includes transformers' ModelOutput
        values = list(out.values())
    else:
        values = list(out) if isinstance(out, list | tuple) else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise UsageError(f"the network returned {type(out).__name__} with no tensor in it: no loss to take")


def _as_module(program_or_module: Any) -> torch.nn.Module:
    import torch

    if isinstance(program_or_module, torch.nn.Module):
        return program_or_module
    if isinstance(program_or_module, torch.export.ExportedProgram):
        return program_or_module.module()
    meta = getattr(program_or_module, "meta", None)  # a LayerGraph traced by torch.export
    if isinstance(meta, dict) and isinstance(meta.get("_program"), torch.export.ExportedProgram):
        return meta["_program"].module()
    kind = type(program_or_module).__name__
    raise UsageError(f"curvature needs an nn.Module or a torch.export ExportedProgram, not {kind}")


def curvature(
    program_or_module: Any,
    x: torch.Tensor | tuple[Any, ...],
    *,
    inits: int,
    generator: torch.Generator,
    resample: Resample | None = None,
    iters: int = 100,
    probes: int = 32,
    tol: float = 1e-5,
    keep_own: bool = True,
    method: str = "auto",
    probe_batch: int = 1,
    y: torch.Tensor | None = None,
) -> CurvatureResult:
    """Top Hessian eigenvalue, Hessian trace and per-parameter gradient norms at init, over ``inits`` inits.

    ``x`` is the fixed input (a tensor, or a tuple of positional inputs) on the parameters' device.
    ``resample(params) -> params`` draws one fresh init; it captures its own generator. Default:
    :func:`gaussian_redraw` with ``generator``. Per init, ``generator`` also draws the dropout seed,
    the targets, the power iteration's start and the Hutchinson probes, so a fixed seed fixes the
    result. ``y``: targets shared by every init (shape of the output) instead of random ones.
    ``tol``: relative change of the Rayleigh quotient at which power iteration stops.
    ``method``: "auto" (double backward, falling back to finite differences where an op lacks it),
    "autograd" or "finite-difference". ``probe_batch`` Hutchinson probes share one backward batched by
    vmap (``is_grads_batched``); on CPU this measured no faster than one at a time, hence default 1.
    """
    import torch

    if inits < 1 or iters < 1 or probes < 1 or probe_batch < 1:
        raise UsageError(
            f"curvature needs inits, iters, probes and probe_batch >= 1 (got {inits}, {iters}, {probes}, "
            f"{probe_batch})"
        )
    if method not in ("auto", "autograd", "finite-difference"):
        raise UsageError(f"curvature method must be auto, autograd or finite-difference, not {method!r}")
    start = time.perf_counter()
    module = _as_module(program_or_module)
    inputs = x if isinstance(x, tuple) else (x,)
    own = {k: p.detach() for k, p in module.named_parameters() if p.is_floating_point()}
    if not own:
        raise UsageError("the network has no floating-point parameters: no curvature to measure")
    buffers0 = {k: b.detach() for k, b in module.named_buffers()}
    draw = resample if resample is not None else (lambda p: gaussian_redraw(p, generator))

    per_init: list[InitCurvature] = []
    parameters = output_entries = 0
    for i in range(inits):
        params = own if (i == 0 and keep_own) else draw(own)
        missing = set(own) - set(params)
        if missing:
            raise UsageError(f"resample returned no tensor for {sorted(missing)[:3]}")
        # fresh copies: train-mode batch norm updates running stats in place
        buffers = {k: b.clone() for k, b in buffers0.items()}
        obj = _Objective(module, {k: params[k] for k in own}, buffers, inputs, generator, method, y)
        parameters, output_entries = obj.parameters, obj.output_entries
        v0 = torch.randn(parameters, generator=generator, device=generator.device, dtype=obj.theta.dtype)
        top, used, converged = power_iteration(obj.hvp, v0.to(obj.theta.device), iters=iters, tol=tol)
        trace, trace_se = hutchinson(
            obj.hvp_batched,
            parameters,
            probes=probes,
            generator=generator,
            batch=probe_batch,
            dtype=obj.theta.dtype,
            device=obj.theta.device,
        )
        per_init.append(
            InitCurvature(
                top_eigenvalue=top,
                iterations=used,
                converged=converged,
                trace=trace,
                trace_se=trace_se,
                loss=obj.loss,
                grad_norms=obj.grad_norms,
                method=obj.method,
                param_norms={k: float(params[k].detach().double().norm()) for k in own},
            )
        )
        del obj

    return CurvatureResult(
        top_eigenvalue=float(np.median([r.top_eigenvalue for r in per_init])),
        trace=float(np.median([r.trace for r in per_init])),
        grad_norms={k: float(np.median([r.grad_norms[k] for r in per_init])) for k in own},
        per_init=per_init,
        parameters=parameters,
        output_entries=output_entries,
        seconds=time.perf_counter() - start,
        shapes={k: list(p.shape) for k, p in own.items()},
    )
