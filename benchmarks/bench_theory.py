"""Time the analytic path: ``predict()`` on synthetic plain and residual nets of growing depth.

    python benchmarks/bench_theory.py                         # depths 50, 200, 400, width 64
    python benchmarks/bench_theory.py --depths 100,1000 --repeat 5 --no-cli
    PYTHONPATH=/tmp/before python benchmarks/bench_theory.py   # another checkout, same script

Each graph comes from :func:`initaudit.predict.build_graph` (the graphs ``initaudit predict``
judges): a plain ReLU/He MLP of D hidden layers, and residual streams of D blocks
``y + eta F(y)`` with F = [relu -> dense] x 2, once with eta = 1 (branch-to-stream ratio T ~ 1)
and once with eta = 1/sqrt(D) (T ~ 1/D: the long Poisson mixtures of the exact log-moments,
the case the design answers' eta search hits). Times are the best of ``--repeat`` runs (the
machine is shared; the minimum is the least noisy figure), each from cold ``functools`` caches
as in a CLI run, per graph and per layer: a per-layer figure that stays flat as D grows is work
per block that does not grow with depth. Last, the wall time of ``python -m initaudit predict
--widths 64 --residual 400`` (design answers included: six predictions of 400 blocks) in a fresh
interpreter, best of ``--repeat``, with this interpreter's ``sys.path`` and ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

from initaudit.graph import LayerGraph
from initaudit.predict import build_graph
from initaudit.theory.propagate import predict

CLI_ARGS = ["predict", "--widths", "64", "--residual", "400"]


def clear_caches() -> None:
    """Empty every ``functools`` cache in initaudit, so each timed run starts cold like a CLI run
    (a repeated predict of one graph would otherwise hit the activation-moment cache)."""
    for name, module in list(sys.modules.items()):
        if name == "initaudit" or name.startswith("initaudit."):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeat`` timed calls from cold caches, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        clear_caches()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def graphs(width: int, depth: int) -> list[tuple[str, LayerGraph]]:
    return [
        ("plain", build_graph([width] * depth)),
        ("residual eta=1", build_graph([width], residual=depth, eta=1.0)),
        ("residual eta=1/sqrt(L)", build_graph([width], residual=depth, eta="1/sqrt(L)")),
    ]


def cli_seconds(repeat: int) -> tuple[float, int]:
    """Best wall time and exit code of ``python -m initaudit predict ...``, each run in a fresh
    interpreter that imports the same initaudit as this one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), *sys.path] if p)
    best, rc = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "initaudit", *CLI_ARGS], env=env, capture_output=True, check=False
        )
        best, rc = min(best, time.perf_counter() - start), done.returncode
    return best, rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="50,200,400", help="comma-separated depths (blocks)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per graph; the best counts")
    parser.add_argument("--no-cli", action="store_true", help="skip the `initaudit predict` wall time")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]

    import initaudit

    print(f"initaudit from {os.path.dirname(initaudit.__file__)}")
    print(f"{'graph':<24} {'depth':>6} {'layers':>7} {'s/graph':>10} {'us/layer':>10}")
    for depth in depths:
        for label, graph in graphs(args.width, depth):
            predict(graph)  # imports and one-off set-up; best_of then clears the caches
            seconds = best_of(args.repeat, lambda graph=graph: predict(graph))
            per_layer = seconds / len(graph.layers) * 1e6
            print(f"{label:<24} {depth:>6} {len(graph.layers):>7} {seconds:>10.4f} {per_layer:>10.1f}")
    if not args.no_cli:
        seconds, rc = cli_seconds(args.repeat)
        print(f"initaudit {' '.join(CLI_ARGS)}: {seconds:.2f} s wall, best of {args.repeat} (exit {rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
