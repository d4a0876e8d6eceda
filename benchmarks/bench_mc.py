"""Monte Carlo engines side by side: a per-sample loop, the ensemble engine (with and without
the exact Gaussian projection), the dense-chain shortcut.

    python benchmarks/bench_mc.py                       # CPU, ~3 minutes
    python benchmarks/bench_mc.py --threads 1           # steadier figures on a shared machine
    python benchmarks/bench_mc.py --quick               # a smoke run (~30 s)
    python benchmarks/bench_mc.py --device cuda         # the same on a GPU

Three networks at He init (kaiming_normal_, fan_in, zero biases; the traced weights are scaled
to He's second moment exactly, so ``gaussian`` resampling draws the loop's law):

- an MLP, 64 layers of Linear(256, 256) + ReLU, input [1, 256];
- a small residual CNN: conv 3->16, three blocks y + conv(relu(conv(relu(y)))), global
  average pool, linear 16->10, input [1, 3, 32, 32];
- the same CNN CIFAR-style with BatchNorm (conv-BN-ReLU stem, blocks
  relu(y + BN(conv(relu(BN(conv(y)))))), convs without bias), BatchNorm on batch statistics
  as training runs it: the loop runs the module in train mode, the ensemble with
  ``batchnorm="train"`` (each network normalizes over the positions of its own input).

Engines, each timed in this one run:

(a) loop: what a user would write. One nn.Module; per sample, nn.init on every layer and one
    forward pass under torch.no_grad, recording M_L = mean(out^2).
(b) ensemble: ``initaudit.montecarlo.ensemble.sample_ensemble(project=False)`` over the
    module's torch.export program: weights redrawn by ``resample(..., "gaussian")`` chunk by
    chunk (drawing included in the time), vmap over the chunk, M_j at every activation/join.
(c) ensemble+proj: the same with the exact Gaussian projection: a dense weight used once is
    not drawn; its product with the layer's input is (``projection_plan``'s docstring).
(d) shortcut: ``initaudit.montecarlo.shortcut.shortcut_chain`` on the LayerGraph; exact in law
    for a dense chain, O(width) per layer. Not applicable to the CNNs.

Timing. The engines are timed in interleaved rounds (loop, ensemble, ..., then again), so a
change in the machine's load hits them alike; samples/s is total samples over total wall time
in steady state (one-off tracing and a warm-up are not counted; setup is printed apart). On a
CPU, "per CPU s" divides by this process's CPU time instead: on a machine shared with other
work, waiting for a core inflates wall time but not CPU time, so those ratios are steadier. Each
engine's mean and median of M_L/M_0 is printed too, so a fast wrong engine would show (He MLP:
E[M_L]/M_0 = 1 exactly).

GFLOP/s counts 2 x multiply-accumulates of every conv and linear layer of one forward pass
per sample. The projection and the shortcut skip most of those FLOPs: their figure is
"equivalent" (the FLOPs of the forward passes they stand in for). The peak is a large float32
matmul measured in this run on this device (sgemm on a CPU, with torch's thread setting),
and ``ceiling`` is peak / (FLOPs per sample): the samples/s of an engine that ran every FLOP
of every forward at that peak. A loop already at a good fraction of the peak leaves an
engine that must do the same FLOPs little room: the print says how much.

"draw bound" is the rate at which this device can merely draw one network's Gaussian weights
(normal_ into each weight's shape): no engine that materializes the weights can beat it; on a
CPU it bounds the loop and the plain ensemble for the MLP (64 x 256^2 = 4.2M draws for
8.4 MFLOP of matrix-vector products). The projection draws 64 x 256 instead.

Threads: on a machine other processes are using, torch's multi-threaded CPU kernels stall at
OpenMP barriers and figures swing between runs; ``--threads 1`` gives steadier ones.
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
class Engine:
    """One way to get M_L for many networks: ``run(n)`` -> (values, samples done)."""

    name: str
    run: Callable[[int], np.ndarray] | None = None
    unit: int = 1  # samples per run() call in the timed rounds
    setup_s: float = 0.0
    note: str = ""
    equivalent: bool = False  # GFLOP/s are those of the forward passes it stands in for
    samples: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: what the machine's other users cannot inflate
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.samples and self.seconds > 0 else math.nan

    @property
    def cpu_rate(self) -> float:
        return self.samples / self.cpu_seconds if self.samples and self.cpu_seconds > 0 else math.nan


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


class BNBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class BNResNet(nn.Module):
    """CIFAR-style: conv-BN-ReLU stem, residual blocks with BatchNorm, pool, linear."""

    def __init__(self, channels: int = 16, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[BNBlock(channels) for _ in range(blocks)])
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


def exact_he(module: nn.Module) -> None:
    """Scale each weight so its second moment is exactly He's 2 / fan_in: the ``gaussian``
    resampling law (each tensor's own E[w^2]) is then the loop's kaiming_normal_ law, and all
    engines sample the same networks in law (one He draw's E[w^2] is off by ~1/sqrt(count))."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                layer.weight.mul_(math.sqrt(2.0 / fan_in / float(layer.weight.double().pow(2).mean())))


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
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(x)
    module.train(was_training)
    for handle in handles:
        handle.remove()
    return total


# --------------------------------------------------------------------------- engines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_engine(module: nn.Module, x: torch.Tensor, device: torch.device, train: bool) -> Engine:
    """(a) re-initialize, forward, record M_L; one sample at a time."""
    module.train(train)

    def run(n: int) -> np.ndarray:
        values = torch.empty(n, dtype=torch.float64, device=device)
        for s in range(n):
            he_init(module)
            with torch.no_grad():
                out = module(x)
            values[s] = out.double().pow(2).mean()
        return values.cpu().numpy()

    mode = "train mode (batch statistics)" if train and _has_bn(module) else ""
    return Engine("loop", run, unit=1 if device.type == "cpu" else 10, note=mode)


def loop_split(module: nn.Module, x: torch.Tensor, device: torch.device, seconds: float) -> str:
    """How the loop's time divides between re-initializing and the forward pass."""

    def rate(fn: Callable[[], Any]) -> float:
        fn()
        sync(device)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            done += 1
        sync(device)
        return (time.perf_counter() - start) / done

    def forward() -> None:
        with torch.no_grad():
            module(x)

    init_s, forward_s = rate(lambda: he_init(module)), rate(forward)
    return f"loop per sample: init {1e6 * init_s:,.0f} us + forward {1e6 * forward_s:,.0f} us"


def ensemble_engine(
    module: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    seed: int,
    *,
    project: bool,
    batchnorm: str,
    chunk: int | None,
) -> Engine:
    """(b)/(c) the ensemble engine over the module's export program."""
    from initaudit.frontends.torch_graph import graph_from_module
    from initaudit.graph import Kind
    from initaudit.montecarlo.ensemble import (
        default_chunk,
        program_parameters,
        projection_plan,
        sample_ensemble,
    )
    from initaudit.montecarlo.resample import resample_laws

    name = "ens+proj" if project else "ensemble"
    start = time.perf_counter()
    graph = graph_from_module(module.to("cpu").eval(), (x.cpu(),), source="bench", fmt="module")
    module.to(device)
    program, nodes = graph.meta.get("_program"), graph.meta.get("_nodes", {})
    if program is None:
        return Engine(name, note=f"no program ({graph.meta.get('extraction')})")
    taps = {
        layer.name: nodes[layer.name]
        for layer in graph
        if layer.kind in (Kind.ACTIVATION, Kind.ADD, Kind.NORM) and layer.name in nodes
    }
    taps["output"] = nodes[graph.outputs[0]]
    params = program_parameters(program)
    laws = resample_laws(params, "gaussian")
    plan = projection_plan(program, laws) if project else {}
    if project and not plan:
        return Engine(name, note="no dense weight qualifies")
    size = chunk or default_chunk(params, device, program=program, projection=plan)
    generator = torch.Generator(device=device).manual_seed(seed)
    notes: list[str] = []
    x_cpu = x.cpu()

    def run(n: int) -> np.ndarray:
        out = sample_ensemble(
            program,
            taps,
            x_cpu,
            n,
            generator,
            laws=laws,
            project=project,
            chunk=size,
            device=device,
            batchnorm=batchnorm,
            notes=notes,
        )
        return out["output"].numpy()

    run(size)  # warm-up: allocator, kernels
    engine = Engine(name, run, unit=size, setup_s=time.perf_counter() - start)
    projected = f"; {len(plan)} weights projected" if plan else ""
    engine.note = f"chunk {size}, {len(taps)} taps{projected}"
    extra = [line for line in dict.fromkeys(notes) if not line.startswith("Gaussian projection")]
    if extra:
        engine.note += "; " + "; ".join(extra)
    return engine


def shortcut_engine(module: nn.Module, x: torch.Tensor, device: torch.device, seed: int) -> Engine:
    """(d) the distributional shortcut on the module's LayerGraph (None: not a dense chain)."""
    from initaudit.frontends.torch_graph import graph_from_module
    from initaudit.montecarlo.shortcut import shortcut_chain

    start = time.perf_counter()
    graph = graph_from_module(module.to("cpu").eval(), (x.cpu(),), source="bench", fmt="module")
    module.to(device)
    last = graph.outputs[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    if shortcut_chain(graph, 2, generator, device, taps=[last]) is None:
        return Engine("shortcut", note="not applicable: not a chain of dense layers (convs, joins, norms)")
    m0 = float(x.double().pow(2).mean())  # the shortcut reports M_j / M_0; the others M_j
    unit = 5_000 if device.type == "cpu" else 1_000_000

    def run(n: int) -> np.ndarray:
        values = shortcut_chain(graph, n, generator, device)
        assert values is not None
        return m0 * (values[last] if last in values else next(reversed(values.values())))

    run(min(unit, 2000))
    return Engine("shortcut", run, unit=unit, setup_s=time.perf_counter() - start, equivalent=True)


def timed_rounds(engines: list[Engine], device: torch.device, budget: float, rounds: int) -> None:
    """Each runnable engine for budget / rounds seconds per round, the rounds interleaved."""
    for _ in range(rounds):
        for engine in engines:
            if engine.run is None:
                continue
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            while True:
                engine.values.append(engine.run(engine.unit))
                sync(device)
                engine.samples += engine.unit
                if time.perf_counter() - start >= budget / rounds:
                    break
            engine.seconds += time.perf_counter() - start
            engine.cpu_seconds += time.process_time() - cpu_start


# --------------------------------------------------------------------------- device figures


def draw_bound(module: nn.Module, device: torch.device, seconds: float = 1.0) -> float:
    """Networks per second whose weights this device can merely draw: normal_ into each
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


def matmul_peak(device: torch.device, seconds: float = 1.0) -> float:
    """FLOP/s of a large float32 matmul (sgemm) with the device's default settings."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
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
    title: str, engines: list[Engine], flops: float, peak: float, m0: float, lines: list[str], cpu: bool
) -> None:
    print(f"\n== {title}")
    for line in lines:
        print(f"   {line}")
    head = f"   {'engine':<9} {'samples':>9} {'seconds':>8} {'samples/s':>11} {'vs loop':>8}"
    head += f" {'per CPU s':>11} {'vs loop':>8}" if cpu else ""
    print(head + f" {'GFLOP/s':>8} {'% peak':>7}   {'M_L/M_0 (mean +- se)':<33} notes")
    loop = next((e for e in engines if e.name == "loop" and e.samples), None)
    for e in engines:
        if not e.samples:
            widths = (9, 8, 11, 8, 11, 8, 8, 7) if cpu else (9, 8, 11, 8, 8, 7)
            dashes = " ".join(f"{'-':>{w}}" for w in widths)
            print(f"   {e.name:<9} {dashes}   {'':<33} {e.note}")
            continue
        ratio = e.rate / loop.rate if loop is not None else math.nan
        line = f"   {e.name:<9} {e.samples:>9,} {e.seconds:>8.2f} {e.rate:>11,.1f} {ratio:>7.1f}x"
        if cpu:
            cpu_ratio = e.cpu_rate / loop.cpu_rate if loop is not None else math.nan
            line += f" {e.cpu_rate:>11,.1f} {cpu_ratio:>7.1f}x"
        tag = "*" if e.equivalent or e.name == "ens+proj" else " "
        values = np.concatenate(e.values) / m0
        setup = f"setup {e.setup_s:.1f} s; " if e.setup_s else ""
        line += f" {e.rate * flops / 1e9:>7.1f}{tag} {100 * e.rate * flops / peak:>6.1f}%"
        print(line + f"   {summary(values):<33} {setup}{e.note}")
    if loop is not None:
        ceiling = peak / flops
        print(
            f"   the loop runs at {100 * loop.rate * flops / peak:.1f}% of the matmul peak; an engine doing "
            f"every FLOP at the peak would do {ceiling:,.0f} samples/s = {ceiling / loop.rate:.1f}x the loop"
        )
    if any(e.samples and (e.equivalent or e.name == "ens+proj") for e in engines):
        print("   * equivalent GFLOP/s: the FLOPs of the forward passes the engine stands in for")


def describe(module: nn.Module, x: torch.Tensor, flops: float) -> str:
    params = sum(p.numel() for p in module.parameters())
    return f"input {list(x.shape)}, {params:,} parameters, {flops / 1e6:.1f} MFLOP per forward"


def _has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def bench_model(
    title: str,
    module: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    args: argparse.Namespace,
    peak: float,
    flops: float,
) -> None:
    bn = _has_bn(module)
    m0 = float(x.double().pow(2).mean())
    lines = [describe(module, x, flops), f"draw bound: {draw_bound(module, device):,.0f} networks/s"]
    kwargs = {"batchnorm": "train" if bn else "eval", "chunk": args.chunk}
    engines = [
        ensemble_engine(module, x, device, args.seed, project=False, **kwargs),
        ensemble_engine(module, x, device, args.seed, project=True, **kwargs),
        shortcut_engine(module, x, device, args.seed),
    ]
    module.to(device)
    loop = loop_engine(module, x, device, train=bn)
    loop.run(2)  # type: ignore[misc]  # warm-up
    lines.append(loop_split(module, x, device, min(1.0, args.budget / 10)))
    engines.insert(0, loop)
    timed_rounds(engines, device, args.budget, args.rounds)
    report(title, engines, flops, peak, m0, lines, cpu=device.type == "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="short budgets: a smoke run")
    parser.add_argument("--budget", type=float, default=None, help="seconds per engine (12; quick 1.5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--chunk", type=int, default=None, help="ensemble chunk (default: engine's)")
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--models", default="mlp,cnn,cnn-bn", help="comma-separated: mlp, cnn, cnn-bn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    args.budget = args.budget or (1.5 if args.quick else 12.0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()} CPUs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {args.device} ({name}), {threads} threads, load average {load:.1f}")
    print(f"python benchmarks/bench_mc.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    peak = matmul_peak(device)
    what = f"float32 8192^3, TF32 {torch.backends.cuda.matmul.allow_tf32}" if cuda else "sgemm 2048^3"
    print(f"matmul peak ({what}): {peak / 1e9:,.1f} GFLOP/s")

    torch.manual_seed(args.seed)  # the modules' construction-time init; the engines use their own generators
    g = torch.Generator(device=device).manual_seed(args.seed)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "mlp" in models:
        model = mlp(args.depth, args.width).to(device)
        he_init(model)
        exact_he(model)
        x = torch.randn(1, args.width, generator=g, device=device)
        flops = float(
            2 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
        )
        bench_model(f"MLP: {args.depth} x Linear({args.width}, {args.width}) + ReLU, He", model, x, device,
                    args, peak, flops)  # fmt: skip
    image = torch.randn(1, 3, 32, 32, generator=g, device=device)
    c = args.channels
    if "cnn" in models:
        cnn = SmallResNet(c).to(device)
        he_init(cnn)
        exact_he(cnn)
        bench_model(
            f"residual CNN: conv 3->{c}, 3 blocks y + conv(relu(conv(relu(y)))) 3x3 at 32x32, pool, linear "
            f"{c}->10 (M_L: the logits)",
            cnn, image, device, args, peak, forward_flops(cnn, image),
        )  # fmt: skip
    if "cnn-bn" in models:
        bn = BNResNet(c).to(device)
        he_init(bn)
        exact_he(bn)
        bench_model(
            f"residual CNN with BatchNorm (CIFAR-style): conv-BN-ReLU 3->{c}, 3 blocks "
            f"relu(y + BN(conv(relu(BN(conv(y)))))), pool, linear {c}->10; BN on batch statistics",
            bn, image, device, args, peak, forward_flops(bn, image),
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
