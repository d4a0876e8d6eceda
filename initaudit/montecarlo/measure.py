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
    #: {tensor name in the graph -> state-dict key in the measured program} where they differ
    #: (ONNX initializers); curvature's per-parameter numbers are keyed by the latter.
    tensor_keys: dict[str, str] = field(default_factory=dict)

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
    """Run ``options.samples`` fresh networks and estimate M_j at every tap of ``prediction``.

    With ``samples == 0`` and ``curvature``, only the curvature is measured (no taps)."""
    if graph.meta.get("audit") == "weights-only":
        raise MonteCarloUnavailable("Monte Carlo needs an architecture: pass --model pkg.module:factory")
    if options.resample not in RESAMPLE_SCHEMES:
        raise MonteCarloUnavailable(
            f"--resample {options.resample!r}: expected one of {', '.join(RESAMPLE_SCHEMES)}"
        )
    if options.samples < 2 and not (options.samples == 0 and options.curvature):
        raise MonteCarloUnavailable("--mc needs at least 2 samples")
    import torch

    device = resolve_device(options.device)
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    start = time.perf_counter()
    values: dict[str, np.ndarray] | None = None
    engine = "ensemble"
    notes: list[str] = []
    if options.samples == 0:
        values, engine = {}, "none"
    elif options.resample == "gaussian":
        from initaudit.montecarlo.shortcut import shortcut_chain

        values = shortcut_chain(graph, options.samples, generator, device)
        if values is not None:
            engine = "shortcut"
            if progress is not None:
                progress(options.samples, options.samples)
    program, taps, names = None, {}, {}
    if values is None:
        program, taps, notes, names = _program(graph)
        values = _run_ensemble(program, taps, graph, options, generator, device, progress, names, notes)
        notes[:] = list(dict.fromkeys(notes))
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
        tensor_keys=dict(names),
    )
    heavy = [name for name, est in estimates.items() if est.second_se_approximate and est.samples > 1]
    if heavy:
        from initaudit.montecarlo.estimates import HEAVY_TAIL_LOG_VAR

        result.notes.append(
            f"second moments (E[(M/M0)^2], spread): their standard errors are approximate, 10-50% low, at "
            f"{len(heavy)} tap(s) where Var ln M > {HEAVY_TAIL_LOG_VAR} (heavy tails; first: `{heavy[0]}`); "
            "the mean, median and log-moments are not affected"
        )
    if any(note.startswith("BatchNorm ") and "running statistics" in note for note in result.notes):
        # BatchNorm normally runs on each sampled network's batch statistics, as training (and the
        # prediction) normalizes; one that saw a single vector fell back to its running statistics
        # and says so: then the two are shown side by side but not compared.
        result.comparable = False
    if options.curvature:
        from initaudit.montecarlo.curvature import curvature

        if program is None:
            program, taps, more, names = _program(graph)
            result.notes.extend(more)
            result.tensor_keys = dict(names)
        x = _input(program, graph, generator)
        # A few inits at a working precision: the top eigenvalue to 0.1% is plenty for a verdict.
        result.curvature = curvature(
            program, x, inits=options.curvature_inits, generator=generator, iters=50, tol=1e-3, probes=16
        )
    return result


def _program(graph: LayerGraph) -> tuple[Any, dict[str, str], list[str], dict[str, str]]:
    """The ExportedProgram to run, {layer -> fx node} for its taps, notes, and {tensor name in
    the graph -> the program's state-dict key} where the two differ (ONNX initializers)."""
    program = graph.meta.get("_program")
    if program is not None:
        return program, dict(graph.meta.get("_nodes", {})), [], {}
    if graph.format == "onnx":
        return _onnx_program(graph)
    extraction = graph.meta.get("extraction", "this tracer")
    raise MonteCarloUnavailable(f"the graph came from {extraction}, which gives no runnable program")


#: Layer kinds whose output is a float signal worth a tap.
_TAPPED = frozenset({"input", "dense", "conv", "activation", "norm", "scale", "pool", "add", "concat"})


def _onnx_program(graph: LayerGraph) -> tuple[Any, dict[str, str], list[str], dict[str, str]]:
    """Convert through onnx2torch; each layer taps the fx node computing its ONNX value.

    The ONNX frontend records in ``attrs["onnx_value"]`` the value each layer stands for (a
    fused MatMul + bias Add: the Add's output; an embedding: its Gather's). The bridge maps
    ONNX values to the fx nodes computing them, so a tap sits on exactly that value.
    """
    from initaudit.montecarlo.onnx_bridge import onnx_program

    # The file's first input, as load_onnx fixed its shape (token ids where an embedding
    # starts the signal: then no layer stands for the input itself).
    shapes = graph.meta.get("input_shapes") or {}
    shape = tuple(next(iter(shapes.values()), None) or ())
    if not shape or any(d is None for d in shape):
        raise MonteCarloUnavailable("the ONNX input shape is symbolic: pass --input-shape")
    values: dict[str, str] = {}
    try:
        program, init_map = onnx_program(graph.source, shape, value_nodes=values)
    except InitauditError as error:
        raise MonteCarloUnavailable(f"cannot run the ONNX graph in torch: {error}") from None
    taps = {
        layer.name: values[value]
        for layer in graph
        if layer.kind.value in _TAPPED and (value := layer.attrs.get("onnx_value")) in values
    }
    if not any(layer.kind.value in ("activation", "add") and layer.name in taps for layer in graph):
        raise MonteCarloUnavailable(
            "no layer of the ONNX graph could be found in the converted torch program"
        )
    return program, taps, ["Monte Carlo ran the ONNX graph converted by onnx2torch"], init_map


def _input(program: Any, graph: LayerGraph, generator: Any) -> Any:
    """The fixed input: N(0, 1) entries (or small integer ids) of the traced example's shape;
    a tuple where the program takes several (an ONNX file's token ids and attention mask)."""
    import torch

    nodes = {n.name: n for n in program.graph_module.graph.nodes if n.op == "placeholder"}
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT" or getattr(spec.arg, "name", None) not in nodes:
            continue  # parameters, and constants the trace specialized
        val = nodes[spec.arg.name].meta["val"]
        if val.dtype.is_floating_point:
            inputs.append(_unit(torch.randn(tuple(val.shape), generator=generator)).to(val.dtype))
        else:
            inputs.append(torch.randint(0, 2, tuple(val.shape), generator=generator, dtype=val.dtype))
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


def _run_ensemble(
    program: Any,
    taps: dict[str, str],
    graph: LayerGraph,
    options: MCOptions,
    generator: Any,
    device: str,
    progress: Progress | None,
    names: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """M_j/M_0 per sample at every tap, chunk by chunk; the engine's notes go to ``notes``
    (once each: every chunk would repeat them)."""
    import torch

    from initaudit.montecarlo.ensemble import (
        default_chunk,
        draw_noise,
        program_parameters,
        projection_plan,
        run_ensemble,
    )
    from initaudit.montecarlo.resample import resample, resample_laws

    params = program_parameters(program)
    fan_in = resample_fan_in(graph, names or {})
    laws = resample_laws(params, options.resample, fan_in=fan_in)  # tensor statistics once, not per chunk
    # Exact in law only for the i.i.d. Gaussian redraw (see projection_plan); other schemes draw W.
    plan = projection_plan(program, laws) if options.resample == "gaussian" else {}
    rest = {key: value for key, value in params.items() if key not in plan}
    x = _input(program, graph, generator)
    chunk = options.batch or default_chunk(
        params, device, program=program, samples=options.samples, projection=plan
    )
    done, parts, m0s = 0, [], []
    while done < options.samples:
        size = min(chunk, options.samples - done)
        sampled = resample(rest, options.resample, size, generator, fan_in=fan_in, laws=laws)
        noise = draw_noise(plan, size, generator)
        xs = x
        first = x if isinstance(x, torch.Tensor) else x[0]  # the others (masks) stay as they are
        if options.resample == "inputs" and first.is_floating_point():
            first = _unit(
                torch.randn((size, *first.shape), generator=generator).to(first.dtype), batched=True
            )
            xs = first if isinstance(x, torch.Tensor) else (first, *x[1:])
        values = run_ensemble(
            program,
            taps,
            xs,
            sampled,
            chunk=size,
            device=device,
            projection=plan,
            noise=noise,
            batchnorm="train",
            notes=notes,
        )
        parts.append(values)
        m0s.append(_mean_square(first, size))
        done += size
        if progress is not None:
            progress(done, options.samples)
    measured = {name: np.concatenate([p[name].cpu().numpy() for p in parts]) for name in parts[0]}
    m0 = np.concatenate(m0s)
    sources = [name for name in graph.inputs if name in measured]
    if not first.is_floating_point() and sources:
        # Token ids are not a signal: the embeddings start it, and the prediction starts every
        # source at M = 1. So M_0 is each network's mean source length (a GPT-2 table of std
        # 0.02 is then 1, not 4e-4, and token + position sum to 2, as predicted).
        m0 = np.mean([measured[name] for name in sources], axis=0)
    return {name: values / m0 for name, values in measured.items()}


def resample_fan_in(graph: LayerGraph, names: dict[str, str]) -> dict[str, int]:
    """{program state-dict key -> fan-in} of every weight, for ``--resample scheme``.

    The graph names a weight as its file does (an ONNX initializer); the program by its
    state-dict key, through ``names`` where the two differ. An ONNX MatMul weight is stored
    (in, out), so PyTorch's layout rule would swap its fans: the graph's fan-in is the truth.
    """
    return {
        names.get(layer.weight.name, layer.weight.name): layer.fan_in
        for layer in graph.linear_layers()
        if layer.weight and layer.fan_in
    }


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
