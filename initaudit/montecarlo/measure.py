"""Monte Carlo orchestration: resample the weights, run the real graph, estimate per tap.

The analytic prediction rests on assumptions (independent branches, Gaussian-like
pre-activations, pass-through for unmodeled ops); this measures what the network does
with fresh weights drawn ``samples`` times. Measured numbers are put on the prediction's
scale (each layer relative to its segment's reference), so the two sit side by side.

Engines: the distributional shortcut for chains of dense layers under Gaussian resampling
(exact in law, O(n) per layer), else the ensemble engine over the traced ExportedProgram.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from initaudit.errors import InitauditError
from initaudit.graph import LayerGraph
from initaudit.theory.propagate import Prediction

RESAMPLE_SCHEMES = ("gaussian", "bootstrap", "scheme", "inputs")

#: progress(done, total): called after every chunk of samples.
Progress = Callable[[int, int], None]


class MonteCarloUnavailable(InitauditError):
    """The graph cannot be run (no architecture, an op that does not convert): the analytic
    report stands, and this says why."""


@dataclass
class MCOptions:
    samples: int
    resample: str = "gaussian"
    device: str = "auto"
    seed: int = 0
    batch: int | None = None  # samples per chunk; None: chosen from memory
    curvature: bool = False
    curvature_inits: int = 5


@dataclass
class Measurement:
    """Per-tap estimates (``estimates.TapEstimate``, on the prediction's scale) and the run."""

    samples: int
    resample: str
    device: str
    engine: str
    seconds: float
    taps: dict[str, Any]
    var_hat: tuple[float, float]  # E[Var^[M]] over the last segment's taps, and its standard error
    curvature: Any = None
    notes: list[str] = field(default_factory=list)
    #: Whether measurement and prediction describe the same thing (IA401 compares them only then).
    comparable: bool = True

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MonteCarloUnavailable("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise MonteCarloUnavailable(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def measure(
    graph: LayerGraph, prediction: Prediction, options: MCOptions, progress: Progress | None = None
) -> Measurement:
    """Run ``options.samples`` fresh networks and estimate M_j at every tap of ``prediction``."""
    if graph.meta.get("audit") == "weights-only":
        raise MonteCarloUnavailable("Monte Carlo needs an architecture: pass --model pkg.module:factory")
    if options.resample not in RESAMPLE_SCHEMES:
        raise MonteCarloUnavailable(
            f"--resample {options.resample!r}: expected one of {', '.join(RESAMPLE_SCHEMES)}"
        )
    if options.samples < 2:
        raise MonteCarloUnavailable("--mc needs at least 2 samples")
    import torch

    device = resolve_device(options.device)
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    start = time.perf_counter()
    values: dict[str, np.ndarray] | None = None
    engine = "ensemble"
    notes: list[str] = []
    if options.resample == "gaussian":
        from initaudit.montecarlo.shortcut import shortcut_chain

        values = shortcut_chain(graph, options.samples, generator, device)
        if values is not None:
            engine = "shortcut"
            if progress is not None:
                progress(options.samples, options.samples)
    program, taps = None, {}
    if values is None:
        program, taps, notes = _program(graph)
        values = _run_ensemble(program, taps, graph, options, generator, device, progress)
    seconds = time.perf_counter() - start
    estimates, var_hat = _estimates(prediction, values)
    result = Measurement(
        samples=options.samples,
        resample=options.resample,
        device=device,
        engine=engine,
        seconds=seconds,
        taps=estimates,
        var_hat=var_hat,
        notes=notes,
    )
    if any(layer.attrs.get("norm") == "batch" for layer in graph):
        # The program runs BatchNorm on its running statistics (inference); at init those are
        # (0, 1), while training normalizes by batch statistics, as the prediction does.
        result.comparable = False
        result.notes.append(
            "BatchNorm ran on its running statistics (inference mode); the prediction normalizes as in "
            "training, so the two are shown side by side but not compared"
        )
    if options.curvature:
        from initaudit.montecarlo.curvature import curvature

        if program is None:
            program, taps, more = _program(graph)
            result.notes.extend(more)
        x = _input(program, graph, generator)
        # A few inits at a working precision: the top eigenvalue to 0.1% is plenty for a verdict.
        result.curvature = curvature(
            program, x, inits=options.curvature_inits, generator=generator, iters=50, tol=1e-3, probes=16
        )
    return result


def _program(graph: LayerGraph) -> tuple[Any, dict[str, str], list[str]]:
    """The ExportedProgram to run and {layer -> fx node} for its taps."""
    program = graph.meta.get("_program")
    if program is not None:
        return program, dict(graph.meta.get("_nodes", {})), []
    if graph.format == "onnx":
        return _onnx_program(graph)
    extraction = graph.meta.get("extraction", "this tracer")
    raise MonteCarloUnavailable(f"the graph came from {extraction}, which gives no runnable program")


def _onnx_program(graph: LayerGraph) -> tuple[Any, dict[str, str], list[str]]:
    """Convert through onnx2torch; taps are matched to the ONNX layers by position, kind and width."""
    from initaudit.frontends.torch_graph import graph_from_exported
    from initaudit.montecarlo.onnx_bridge import onnx_program

    input_layer = graph[graph.inputs[0]] if graph.inputs else None
    shape = tuple(input_layer.shape or ()) if input_layer is not None else ()
    if not shape or any(d is None for d in shape):
        raise MonteCarloUnavailable("the ONNX input shape is symbolic: pass --input-shape")
    try:
        program, _ = onnx_program(graph.source, shape)
    except InitauditError as error:
        raise MonteCarloUnavailable(f"cannot run the ONNX graph in torch: {error}") from None
    torch_graph = graph_from_exported(program, source=graph.source, fmt="onnx")
    nodes = torch_graph.meta["_nodes"]
    ours = [layer for layer in graph if layer.kind.value in ("activation", "add", "dense", "conv")]
    theirs = [layer for layer in torch_graph if layer.kind.value in ("activation", "add", "dense", "conv")]
    if [(a.kind, a.width) for a in ours] != [(b.kind, b.width) for b in theirs]:
        raise MonteCarloUnavailable("the converted torch graph does not line up with the ONNX graph's layers")
    taps = {a.name: nodes[b.name] for a, b in zip(ours, theirs, strict=True) if b.name in nodes}
    for name in graph.inputs:
        taps.setdefault(name, nodes.get(torch_graph.inputs[0], ""))
    return program, taps, ["Monte Carlo ran the ONNX graph converted by onnx2torch"]


def _input(program: Any, graph: LayerGraph, generator: Any) -> Any:
    """The fixed input: N(0, 1) entries (or small integer ids) of the traced example's shape."""
    import torch

    spec = next(s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    node = next(n for n in program.graph_module.graph.nodes if n.name == spec.arg.name)
    val = node.meta["val"]
    if val.dtype.is_floating_point:
        return _unit(torch.randn(tuple(val.shape), generator=generator)).to(val.dtype)
    return torch.randint(0, 2, tuple(val.shape), generator=generator, dtype=val.dtype)


def _run_ensemble(
    program: Any,
    taps: dict[str, str],
    graph: LayerGraph,
    options: MCOptions,
    generator: Any,
    device: str,
    progress: Progress | None,
) -> dict[str, np.ndarray]:
    import torch

    from initaudit.montecarlo.ensemble import default_chunk, program_parameters, run_ensemble
    from initaudit.montecarlo.resample import resample, resample_laws

    params = program_parameters(program)
    fan_in = {
        layer.weight.name: layer.fan_in for layer in graph.linear_layers() if layer.weight and layer.fan_in
    }
    laws = resample_laws(params, options.resample, fan_in=fan_in)  # tensor statistics once, not per chunk
    x = _input(program, graph, generator)
    chunk = options.batch or default_chunk(params, device, program=program, samples=options.samples)
    done, parts, m0s = 0, [], []
    while done < options.samples:
        size = min(chunk, options.samples - done)
        sampled = resample(params, options.resample, size, generator, fan_in=fan_in, laws=laws)
        xs = x
        if options.resample == "inputs" and x.is_floating_point():
            xs = _unit(torch.randn((size, *x.shape), generator=generator).to(x.dtype), batched=True)
        parts.append(run_ensemble(program, taps, xs, sampled, chunk=size, device=device))
        m0s.append(_mean_square(xs, size))
        done += size
        if progress is not None:
            progress(done, options.samples)
    m0 = np.concatenate(m0s)
    return {name: np.concatenate([p[name].cpu().numpy() for p in parts]) / m0 for name in parts[0]}


def _unit(x: Any, batched: bool = False) -> Any:
    """``x`` scaled to mean square 1 (per sample when batched): the prediction's M_0 = 1, which
    matters once biases make M_j/M_0 depend on the input's length."""
    dims = tuple(range(1, x.dim())) if batched else tuple(range(x.dim()))
    return x / x.double().pow(2).mean(dim=dims, keepdim=True).sqrt().to(x.dtype)


def _mean_square(x: Any, size: int) -> np.ndarray:
    if not x.is_floating_point():
        return np.ones(size)  # token ids: the embedding is the input, and its scale is its own
    if x.dim() and x.shape[0] == size and size > 1 and x.dim() > 1:
        return x.double().pow(2).flatten(1).mean(1).cpu().numpy()
    return np.full(size, float(x.double().pow(2).mean()))


def _estimates(
    prediction: Prediction, values: dict[str, np.ndarray]
) -> tuple[dict[str, Any], tuple[float, float]]:
    """Estimates on the prediction's scale: each layer over its segment's reference length."""
    from initaudit.montecarlo.estimates import estimate, var_hat

    estimates: dict[str, Any] = {}
    last: list[np.ndarray] = []
    tap_rows = [row for row in prediction.layers if row.tap]
    last_segment = tap_rows[-1].segment if tap_rows else 0
    for row in prediction.layers:
        if row.name not in values:
            continue
        state = prediction.states.get(row.name)
        reference = state.m2 / row.mean if state is not None and row.mean > 0 else 1.0
        relative = values[row.name] / reference
        estimates[row.name] = estimate(relative, 1.0)
        if row.tap and row.segment == last_segment:
            last.append(relative)
    if last:
        return estimates, var_hat(np.stack(last, axis=1))
    return estimates, (math.nan, math.nan)
