"""Time ``initaudit check`` against a bare ``onnx.load`` on ONNX models of growing size.

    python benchmarks/bench_check.py                      # 1, 10, 100, 1000 MB of weights
    python benchmarks/bench_check.py --sizes 1,10 --keep --workdir /tmp/bench

For each size it writes an MLP of square MatMul + Add + Relu layers with He normal weights
(few wide layers, so the cost is in the tensors, not the node count), then runs, each in a
fresh interpreter: (a) ``onnx.load(path)``, (b) ``python -m initaudit check PATH --format json``.
Wall time and peak RSS are taken per child with ``os.wait4`` (in a small spawner process; see
SPAWNER). Sizes are MiB of float32 weights; from ``--external-mb`` (512) on, the weights go to
an external data file, since a protobuf file is capped at 2 GB. ``check`` exiting 0 or 1 with
JSON on stdout is a normal run (1 means it found problems); anything else is reported as failed,
with the last line of its stderr, and makes this script exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIB = 1 << 20
ALIGN = 4096  # page-aligned offsets in the data file, so a reader can mmap tensors
LOAD_CODE = "import sys, onnx; onnx.load(sys.argv[1])"


@dataclass
class Run:
    """One child process: exit code, wall seconds, peak RSS in MiB, captured output."""

    rc: int
    wall_s: float
    rss_mib: float
    stdout: str
    stderr: str


@dataclass
class Spec:
    """The model written for one requested size."""

    size_mb: float
    width: int
    layers: int
    path: Path
    data_path: Path | None

    @property
    def file_mib(self) -> float:
        total = self.path.stat().st_size
        if self.data_path is not None:
            total += self.data_path.stat().st_size
        return total / MIB


def _width_for(size_mb: float, layers: int) -> int:
    # layers square float32 matrices of side n hold about size_mb MiB.
    return max(8, round(math.sqrt(size_mb * MIB / 4 / layers)))


def write_model(directory: Path, size_mb: float, layers: int, external_mb: float, seed: int) -> Spec:
    """Write an MLP with about ``size_mb`` MiB of float32 weights; external data above a threshold.

    External tensors are streamed to the data file one at a time instead of going through
    ``onnx.save_model(..., save_as_external_data=True)``, which needs every tensor in memory at
    once, as numpy arrays and again as protobuf bytes. The result is the same format:
    TensorProtos with ``data_location = EXTERNAL`` and a relative ``location``.
    """
    n = _width_for(size_mb, layers)
    stem = f"bench_{size_mb:g}mb"
    path = directory / f"{stem}.onnx"
    external = size_mb >= external_mb
    data_path = directory / f"{stem}.data" if external else None
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    data = open(data_path, "wb") if data_path is not None else None  # noqa: SIM115 (closed below)
    try:

        def add_param(name: str, array: np.ndarray) -> str:
            if data is None or array.nbytes < ALIGN:
                inits.append(numpy_helper.from_array(array, name))
                return name
            pos = data.tell()
            offset = pos + (-pos) % ALIGN
            data.seek(offset)
            data.write(array.tobytes())
            proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
            proto.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", offset), ("length", array.nbytes)):
                entry = proto.external_data.add()
                entry.key, entry.value = key, str(value)
            inits.append(proto)
            return name

        h = "input"
        for i in range(1, layers + 1):
            w = rng.standard_normal((n, n), dtype=np.float32)
            w *= np.float32(math.sqrt(2.0 / n))
            wn = add_param(f"fc{i}.weight", w)
            bn = add_param(f"fc{i}.bias", np.zeros(n, np.float32))
            mm = f"/fc{i}/MatMul_output_0"
            add = f"/fc{i}/Add_output_0"
            nodes.append(helper.make_node("MatMul", [h, wn], [mm], name=f"/fc{i}/MatMul"))
            nodes.append(helper.make_node("Add", [mm, bn], [add], name=f"/fc{i}/Add"))
            h = f"/act{i}/Relu_output_0"
            nodes.append(helper.make_node("Relu", [add], [h], name=f"/act{i}/Relu"))
        w = rng.standard_normal((n, 10), dtype=np.float32)
        w *= np.float32(math.sqrt(1.0 / n))
        wn = add_param("head.weight", w)
        bn = add_param("head.bias", np.zeros(10, np.float32))
        nodes.append(helper.make_node("MatMul", [h, wn], ["/head/MatMul_output_0"], name="/head/MatMul"))
        nodes.append(helper.make_node("Add", ["/head/MatMul_output_0", bn], ["output"], name="/head/Add"))
    except BaseException:
        if data is not None:
            data.close()
            data_path.unlink(missing_ok=True)
        raise
    if data is not None:
        data.close()
    graph = helper.make_graph(
        nodes,
        stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="initaudit-bench"
    )
    onnx.save_model(model, path)
    onnx.checker.check_model(str(path))  # validates the external references without loading them
    return Spec(size_mb, n, layers, path, data_path)


# Peak RSS is measured by a bare interpreter that spawns the child and reaps it with wait4. Not
# from here: Linux folds the RSS high-water mark of the mm a child was forked (or vforked) from
# into the child's ru_maxrss at exec, so a child of this process would report at least this
# process's own peak (numpy, onnx and the last model written). The spawner's floor is about
# 9 MiB, below any child measured here.
SPAWNER = r"""
import json, os, signal, sys, time
out, err, timeout, argv = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
w = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
actions = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, out, w, 0o600),
    (os.POSIX_SPAWN_OPEN, 2, err, w, 0o600),
]
t0 = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss": usage.ru_maxrss}))
"""


def run_child(argv: list[str], timeout_s: float) -> Run:
    """Run ``argv`` to completion: exit code, wall time and peak RSS of exactly this child.

    Wall time runs from spawn to reap inside the spawner, so its own start-up is not counted.
    A child killed at ``timeout_s`` reports rc -9.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        spawner = [sys.executable, "-S", "-c", SPAWNER, str(out), str(err), str(timeout_s), *argv]
        res = subprocess.run(spawner, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"spawner failed: {res.stderr.strip()}")
        info = json.loads(res.stdout)
        stdout = out.read_text(errors="replace")
        stderr = err.read_text(errors="replace")
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = info["maxrss"] / (MIB if sys.platform == "darwin" else 1024)
    return Run(info["rc"], info["wall_s"], rss, stdout, stderr)


def best_of(argv: list[str], repeat: int, timeout_s: float) -> Run:
    """Fastest of ``repeat`` runs (noise on a shared machine only adds time)."""
    runs = [run_child(argv, timeout_s) for _ in range(repeat)]
    return min(runs, key=lambda r: r.wall_s)


def check_failure(run: Run) -> str | None:
    """Why a check run is not a normal result, or None. rc 1 alone is ambiguous:
    Python also exits 1 for 'No module named initaudit.__main__', so require JSON too."""
    if run.rc in (0, 1):
        try:
            json.loads(run.stdout)
            return None
        except ValueError:
            pass
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else "no stderr; stdout is not JSON"
    return f"rc={run.rc}: {reason}"


def _parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad --sizes {text!r}: {e}") from e
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("--sizes needs positive numbers, e.g. 1,10,100")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=_parse_sizes, default=[1, 10, 100, 1000], help="MiB of weights")
    parser.add_argument("--layers", type=int, default=8, help="hidden layers per model (default 8)")
    parser.add_argument("--workdir", type=Path, help="where to write models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--repeat", type=int, default=1, help="runs per child; the fastest is reported")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child before it is killed")
    parser.add_argument(
        "--external-mb", type=float, default=512.0, help="store weights as external data from this size"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="initaudit-bench-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    written: list[Path] = []
    failures: list[str] = []
    print(
        f"python {sys.version.split()[0]}, onnx {onnx.__version__}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs; workdir {workdir}",
        file=sys.stderr,
    )
    try:
        base = best_of([py, "-c", "import onnx"], args.repeat, args.timeout)
        print(f"baseline `python -c 'import onnx'`: {base.wall_s:.3f} s, {base.rss_mib:.0f} MiB peak RSS")
        header = (
            f"{'size':>7} {'width x layers':>15} {'on disk':>9} {'load s':>8} {'load MiB':>9} "
            f"{'check s':>8} {'check MiB':>10} {'t ratio':>8} {'mem ratio':>9}  check"
        )
        print(header)
        print("-" * len(header))
        for size in args.sizes:
            t0 = time.perf_counter()
            spec = write_model(workdir, size, args.layers, args.external_mb, args.seed)
            written += [p for p in (spec.path, spec.data_path) if p is not None]
            print(f"  wrote {spec.path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            load = best_of([py, "-c", LOAD_CODE, str(spec.path)], args.repeat, args.timeout)
            if load.rc != 0:
                failures.append(f"{size:g} MB load rc={load.rc}: {load.stderr.strip().splitlines()[-1:]}")
            check_argv = [py, "-m", "initaudit", "check", str(spec.path), "--format", "json"]
            check = best_of(check_argv, args.repeat, args.timeout)
            why = check_failure(check)
            if why is None:
                status = f"ok (rc={check.rc})"
                ratios = f"{check.wall_s / load.wall_s:>8.2f} {check.rss_mib / load.rss_mib:>9.2f}"
            else:
                status = "FAILED"
                ratios = f"{'-':>8} {'-':>9}"
                failures.append(f"{size:g} MB check {why}")
            print(
                f"{size:>5g}MB {f'{spec.width} x {spec.layers}':>15} {spec.file_mib:>7.1f}Mi "
                f"{load.wall_s:>8.3f} {load.rss_mib:>9.0f} {check.wall_s:>8.3f} {check.rss_mib:>10.0f} "
                f"{ratios}  {status}",
                flush=True,
            )
        for line in failures:
            print(f"failed: {line}")
    finally:
        if not args.keep:
            for p in written:
                p.unlink(missing_ok=True)
            if own_dir:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept models in {workdir}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
