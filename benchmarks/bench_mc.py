"""Monte Carlo engines side by side: a per-sample loop, the ensemble engine, the shortcut.

    python benchmarks/bench_mc.py                       # CPU, default sample counts (~1-2 min)
    python benchmarks/bench_mc.py --quick               # a smoke run (seconds)
    python benchmarks/bench_mc.py --device cuda         # adds the fraction of matmul peak

Two networks at He init (kaiming_normal_, fan_in, zero biases):

- an MLP, 64 layers of Linear(256, 256) + ReLU, input [1, 256];
- a small residual CNN: conv 3->16, three blocks y + conv(relu(conv(relu(y)))), global
  average pool, linear 16->10, input [1, 3, 32, 32].

Three ways to get M_L for many random networks, each timed in this one run:

(a) loop: what a user would write. One nn.Module; per sample, nn.init on every layer and one
    forward pass under torch.no_grad, recording M_L = mean(out^2).
(b) ensemble: ``initaudit.montecarlo.ensemble.run_ensemble`` over the module's
    torch.export program, the weights redrawn by ``resample(..., "gaussian")`` chunk by
    chunk (drawing included in the time), M_j recorded at every activation and join.
(c) shortcut: ``initaudit.montecarlo.shortcut.shortcut_chain`` on the module's LayerGraph:
    exact in law for a dense chain, O(width) per layer. Not applicable to the CNN.

Threads: on a machine other processes are using, torch's multi-threaded CPU kernels stall at
OpenMP barriers (a 512-entry sqrt measured 1 us on one thread, 5 ms on two), and figures
taken with several threads swing by 10x between runs; ``--threads 1`` gives stable ones.
(The shortcut always runs its CPU work on one thread, for that reason.)

Samples/s are steady-state: the one-off tracing (torch.export) and a warm-up chunk are not
counted; the setup time is printed on its own. Each engine's mean and median of M_L is
printed too (He init: E[M_L]/M_0 = 1 exactly), so a fast wrong engine would show.

"draw bound" is the rate at which this device can merely draw one network's Gaussian weights
(torch.randn of the same number of entries): no engine that materializes the weights can
beat it, and on a CPU it is what bounds both the loop and the ensemble for the MLP (each
sample needs 64 x 256^2 = 4.2M normal draws for 8.4 MFLOP of matrix-vector products).
On CUDA the fraction of the device's matmul throughput is reported: the peak is measured
with a large float32 torch.matmul in the same run, and an engine's FLOPs are counted as
2 * S * sum(fan_in * width) per forward for the MLP (2 * S * MACs of every conv and linear
layer for the CNN).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Result:
    engine: str
    samples: int = 0
    seconds: float = math.nan
    values: np.ndarray | None = None
    setup_s: float = 0.0
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.samples and self.seconds > 0 else math.nan


# --------------------------------------------------------------------------- models


def mlp(depth: int, width: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 16, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        return self.head(y.mean(dim=(2, 3)))


def he_init(module: nn.Module) -> None:
    """What the loop re-runs per sample: He normal weights, zero biases, on every layer."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def forward_flops(module: nn.Module, x: torch.Tensor) -> float:
    """2 * multiply-accumulates of every conv and linear layer for one forward pass."""
    total = 0.0

    def hook(layer: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += 2.0 * layer.in_features * layer.out_features * out.numel() / out.shape[-1]
        elif isinstance(layer, nn.Conv2d):
            k = math.prod(layer.kernel_size) * layer.in_channels // layer.groups
            total += 2.0 * k * out.numel()

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        module(x)
    for handle in handles:
        handle.remove()
    return total


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def run_loop(module: nn.Module, x: torch.Tensor, samples: int, device: torch.device, budget: float) -> Result:
    """(a) re-initialize, forward, record M_L; one sample at a time."""

    def loop(n: int, deadline: float = math.inf) -> np.ndarray:
        values = torch.empty(n, dtype=torch.float64, device=device)
        for s in range(n):
            he_init(module)
            with torch.no_grad():
                out = module(x)
            values[s] = out.double().pow(2).mean()
            if time.perf_counter() > deadline:
                return values[: s + 1].cpu().numpy()
        return values.cpu().numpy()

    loop(max(2, samples // 20), time.perf_counter() + budget / 10)  # warm-up: allocator, kernels
    values, seconds = timed(lambda: loop(samples, time.perf_counter() + budget), device)
    return Result("loop", values.size, seconds, values, note=stopped(values.size, samples).lstrip("; "))


def run_ensemble_engine(
    module: nn.Module, x: torch.Tensor, samples: int, device: torch.device, seed: int, budget: float
) -> Result:
    """(b) the ensemble engine: resample chunk by chunk, run_ensemble over the export."""
    try:
        from initaudit.montecarlo.ensemble import default_chunk, program_parameters, run_ensemble
        from initaudit.montecarlo.resample import resample, resample_laws
    except ImportError:
        return Result("ensemble", note="ensemble engine not available")
    from initaudit.frontends.torch_graph import graph_from_module
    from initaudit.graph import Kind

    start = time.perf_counter()
    cpu_module = module.to("cpu")
    graph = graph_from_module(cpu_module, (x.cpu(),), source="bench", fmt="module")
    module.to(device)
    program, nodes = graph.meta.get("_program"), graph.meta.get("_nodes", {})
    if program is None:
        return Result("ensemble", note=f"no program ({graph.meta.get('extraction')})")
    taps = {
        layer.name: nodes[layer.name]
        for layer in graph
        if layer.kind in (Kind.ACTIVATION, Kind.ADD) and layer.name in nodes
    }
    taps["output"] = nodes[graph.outputs[0]]
    params = {key: value.to(device) for key, value in program_parameters(program).items()}
    laws = resample_laws(params, "gaussian")
    chunk = default_chunk(params, device, program=program, samples=samples)
    generator = torch.Generator(device=device).manual_seed(seed)
    setup = time.perf_counter() - start
    notes: list[str] = []
    draw_s = 0.0

    def ensemble(n: int, deadline: float = math.inf) -> np.ndarray:
        nonlocal draw_s
        parts = []
        for done in range(0, n, chunk):
            if time.perf_counter() > deadline:
                break
            size = min(chunk, n - done)
            sampled, seconds = timed(
                lambda size=size: resample(params, "gaussian", size, generator, laws=laws), device
            )
            draw_s += seconds
            out = run_ensemble(program, taps, x, sampled, chunk=size, device=device, notes=notes)
            parts.append(out["output"].numpy())
        return np.concatenate(parts)

    ensemble(min(chunk, samples))  # warm-up
    draw_s = 0.0
    values, seconds = timed(lambda: ensemble(samples, time.perf_counter() + budget), device)
    note = f"chunk {chunk}, {len(taps)} taps; drawing weights {100 * draw_s / seconds:.0f}% of the time"
    if notes:
        note += "; " + "; ".join(dict.fromkeys(notes))
    note += stopped(values.size, samples)
    return Result("ensemble", values.size, seconds, values, setup_s=setup, note=note)


def run_shortcut(module: nn.Module, x: torch.Tensor, samples: int, device: torch.device, seed: int) -> Result:
    """(c) the distributional shortcut on the module's LayerGraph (None: not a dense chain)."""
    from initaudit.frontends.torch_graph import graph_from_module
    from initaudit.montecarlo.shortcut import shortcut_chain

    start = time.perf_counter()
    graph = graph_from_module(module.to("cpu"), (x.cpu(),), source="bench", fmt="module")
    module.to(device)
    setup = time.perf_counter() - start
    last = graph.outputs[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    probe = shortcut_chain(graph, 2, generator, device, taps=[last])
    if probe is None:
        return Result("shortcut", note="not applicable: not a chain of dense layers (convs, residual joins)")
    shortcut_chain(graph, min(samples, 2000), generator, device)  # warm-up
    values, seconds = timed(lambda: shortcut_chain(graph, samples, generator, device), device)
    note = f"{len(values)} taps"
    m0 = float(x.double().pow(2).mean())  # the shortcut reports M_j / M_0; the others M_j
    values = m0 * (values[last] if last in values else next(reversed(values.values())))
    return Result("shortcut", samples, seconds, values, setup_s=setup, note=note)


def stopped(done: int, asked: int) -> str:
    return f"; time budget reached after {done:,} of {asked:,}" if done < asked else ""


def draw_bound(module: nn.Module, device: torch.device, seconds: float = 1.0) -> float:
    """Networks per second whose weights this device can merely draw: torch normal_ into each
    weight's own shape (cache-sized fills on a CPU, one big fill of a batch on a GPU)."""
    shapes = [tuple(p.shape) for p in module.parameters() if p.dim() > 1]
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        batch = max(1, (1 << 26) // sum(math.prod(shape) for shape in shapes))
        buffers = [torch.empty((batch, *shape), device=device) for shape in shapes]
    else:
        batch, buffers = 1, [torch.empty(shape) for shape in shapes]
    for buffer in buffers:
        buffer.normal_(generator=generator)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for buffer in buffers:
            buffer.normal_(generator=generator)
        sync(device)
        done += batch
    return done / (time.perf_counter() - start)


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large float32 matmul (the device's default precision settings)."""
    n = 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        torch.matmul(a, b)
        reps += 1
    sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


# --------------------------------------------------------------------------- report


def summary(values: np.ndarray | None) -> str:
    if values is None or values.size == 0:
        return ""
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return f"{mean:.3g} +- {se:.2g} (median {float(np.median(values)):.3g})"


def report(
    title: str, results: list[Result], bound: float, flops: float | None, peak: float | None, m0: float
) -> None:
    print(f"\n== {title}")
    print(f"   draw bound: {bound:,.0f} networks/s (only drawing the Gaussian weights)")
    header = f"   {'engine':<9} {'samples':>8} {'seconds':>8} {'samples/s':>12} {'vs loop':>8}"
    if peak:
        header += f" {'% matmul peak':>14}"
    print(header + f"   {'M_L/M_0 (mean +- se)':<34} notes")
    loop = next((r for r in results if r.engine == "loop"), None)
    for r in results:
        if not r.samples:
            print(f"   {r.engine:<9} {'-':>8} {'-':>8} {'-':>12} {'-':>8}" + (f" {'-':>14}" if peak else "")
                  + f"   {'':<34} {r.note}")  # fmt: skip
            continue
        ratio = r.rate / loop.rate if loop is not None and loop.rate > 0 else math.nan
        line = f"   {r.engine:<9} {r.samples:>8,} {r.seconds:>8.2f} {r.rate:>12,.1f} {ratio:>7.1f}x"
        if peak:
            share = 100 * r.rate * flops / peak if flops else math.nan
            tag = " (equiv.)" if r.engine == "shortcut" else ""
            line += f" {share:>13.2f}%{tag}"
        values = r.values / m0 if r.values is not None else None
        setup = f"setup {r.setup_s:.1f} s; " if r.setup_s else ""
        print(line + f"   {summary(values):<34} {setup}{r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--samples", type=int, default=None, help="ensemble samples (default: per model)")
    parser.add_argument("--loop-samples", type=int, default=None)
    parser.add_argument("--shortcut-samples", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per timed engine run, at most (default 15; quick 3)",
    )
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    scale = 0.1 if args.quick else 1.0
    budget = args.budget or (3.0 if args.quick else 15.0)

    def count(default: int, given: int | None) -> int:
        return given if given is not None else max(4, int(default * scale))

    name = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()} CPUs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {args.device} ({name}), {threads} threads, load average {load:.1f}")
    if not cuda and threads > 1 and load > (os.cpu_count() or 1) - 0.5:
        print("note: the CPUs are busy; multi-threaded torch ops then stall at OpenMP barriers and the")
        print("      figures swing 10x between runs. Compare engines with --threads 1 on a shared machine.")
    peak = matmul_peak(device) if cuda else None
    if peak:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        print(f"matmul peak (float32 8192^3, TF32 {tf32}): {peak / 1e12:.1f} TFLOP/s")

    seed = args.seed
    torch.manual_seed(seed)  # the modules' construction-time init; the engines use their own generators
    g = torch.Generator(device=device).manual_seed(seed)

    model = mlp(args.depth, args.width).to(device)
    he_init(model)
    x = torch.randn(1, args.width, generator=g, device=device)
    m0 = float(x.double().pow(2).mean())
    flops = float(
        2 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    )
    results = [
        run_loop(model, x, count(2_000 if cuda else 150, args.loop_samples), device, budget),
        run_ensemble_engine(model, x, count(50_000 if cuda else 300, args.samples), device, seed, budget),
        run_shortcut(model, x, count(2_000_000 if cuda else 30_000, args.shortcut_samples), device, seed),
    ]
    report(
        f"MLP: {args.depth} x Linear({args.width}, {args.width}) + ReLU, He; "
        f"{flops / 1e6:.1f} MFLOP per forward",
        results, draw_bound(model, device), flops, peak, m0,
    )  # fmt: skip

    cnn = SmallResNet().to(device)
    he_init(cnn)
    image = torch.randn(1, 3, 32, 32, generator=g, device=device)
    m0 = float(image.double().pow(2).mean())
    cnn_flops = forward_flops(cnn, image)
    results = [
        run_loop(cnn, image, count(2_000 if cuda else 300, args.loop_samples), device, budget),
        run_ensemble_engine(cnn, image, count(20_000 if cuda else 1_000, args.samples), device, seed, budget),
        run_shortcut(cnn, image, count(1000, args.shortcut_samples), device, seed),
    ]
    report(
        f"residual CNN: conv 3->16, 3 blocks of 2 convs 3x3 at 32x32, pool, linear; "
        f"{cnn_flops / 1e6:.1f} MFLOP per forward (M_L: the logits)",
        results, draw_bound(cnn, device), cnn_flops, peak, m0,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
