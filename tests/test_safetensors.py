"""The torch-free safetensors reader: hand-written files, hostile headers, lazy reads, --model."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from initaudit.errors import LoadError
from initaudit.frontends import LoadOptions, load_graph, sniff
from initaudit.frontends.safetensors_file import SafetensorsFile

NUMPY_DTYPES = {
    "F32": "<f4",
    "F64": "<f8",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "U8": "|u1",
    "BOOL": "|b1",
}


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits by truncation (exact for values with 8 mantissa bits)."""
    return (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, np.ndarray]],
    *,
    edit: Any = None,
    data_tail: int = 0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file by the spec; ``edit(header)`` may corrupt the header first and
    ``data_tail`` (negative) cuts bytes off the end."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, (dtype, array) in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    if edit is not None:
        edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes
    data = b"".join(chunks)
    if data_tail:
        data = data[:data_tail]
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _mlp_tensors(rng: np.random.Generator) -> dict[str, tuple[str, np.ndarray]]:
    return {
        "fc1.weight": ("F32", rng.normal(0, (2 / 12) ** 0.5, (20, 12)).astype("<f4")),
        "fc1.bias": ("F32", np.zeros(20, dtype="<f4")),
        "bn.num_batches_tracked": ("I64", np.array(5, dtype="<i8")),
        "fc2.weight": ("F16", rng.normal(0, 0.05, (4, 20)).astype("<f2")),
    }


def test_roundtrip_of_every_numpy_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        name: (
            name,
            rng.normal(size=(3, 5)).astype(dt) if "f" in dt else np.arange(15).reshape(3, 5).astype(dt),
        )
        for name, dt in NUMPY_DTYPES.items()
    }
    tensors["empty"] = ("F32", np.zeros((0, 4), dtype="<f4"))
    path = write_safetensors(tmp_path / "all.safetensors", tensors, metadata={"format": "pt"})
    assert sniff(path) == "safetensors"
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt"}
    for name, (_, expected) in tensors.items():
        got = st.array(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_bf16_widens_exactly(tmp_path):
    rng = np.random.default_rng(1)
    exact = rng.normal(size=(7, 9)).astype("<f4")
    exact = (exact.view("<u4") & 0xFFFF0000).view("<f4")  # representable in bfloat16
    path = write_safetensors(tmp_path / "bf.safetensors", {"w": ("BF16", to_bf16_bits(exact))})
    got = SafetensorsFile(path).array("w")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, exact)
    assert got[0, 0] != 0 and np.abs(got).max() > 1  # not a trivially zero or tiny tensor


def test_fp8_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    values = torch.linspace(-300, 300, 257)
    tensors = {}
    for name, dtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        quantized = values.to(dtype)
        tensors[name] = (name, quantized.view(torch.uint8).numpy())
        tensors[name + "_expected"] = ("F32", quantized.float().numpy())
    st = SafetensorsFile(write_safetensors(tmp_path / "f8.safetensors", tensors))
    for name in ("F8_E4M3", "F8_E5M2"):
        np.testing.assert_array_equal(st.array(name), st.array(name + "_expected"))


def _set(name: str, key: str, value: Any):
    def edit(header: dict[str, Any]) -> None:
        header[name][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "tail", "problem"),
    [
        (_set("a", "dtype", "F128"), 0, "unknown dtype 'F128'"),
        (_set("a", "shape", [2, 3]), 0, "needs 24 bytes, data_offsets give 16"),
        (_set("a", "shape", [-1, 4]), 0, "non-negative integers"),
        (_set("a", "shape", [True, 4]), 0, "non-negative integers"),
        (_set("a", "data_offsets", [8, 4]), 0, "not an ascending pair"),
        (_set("a", "data_offsets", [0]), 0, "two integers"),
        (_set("b", "data_offsets", [8, 24]), 0, "overlap"),
        (_set("b", "data_offsets", [32, 48]), 0, "truncated"),
        (None, -4, "truncated"),
        (lambda h: h.update(__metadata__={"k": 3}), 0, "__metadata__"),
        (lambda h: h.update(c="not an object"), 0, "not an object"),
    ],
)
def test_hostile_headers_are_load_errors(tmp_path, edit, tail, problem):
    tensors = {"a": ("F32", np.ones((2, 2), "<f4")), "b": ("F32", np.ones((2, 2), "<f4"))}
    path = write_safetensors(tmp_path / "bad.safetensors", tensors, edit=edit, data_tail=tail)
    with pytest.raises(LoadError, match=problem) as info:
        load_graph(path)
    assert "\n" not in info.value.problem


def test_broken_framing(tmp_path):
    def raw(name: str, length: int, body: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", length) + body)
        return path

    with pytest.raises(LoadError, match="not valid JSON"):
        load_graph(raw("json.safetensors", 12, b"{not json!!}"))
    with pytest.raises(LoadError, match="duplicate key"):
        body = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {}}'
        load_graph(raw("dup.safetensors", len(body), body + b"\x00"))
    with pytest.raises(LoadError, match="not a JSON object"):
        SafetensorsFile(raw("list.safetensors", 2, b"[]"))
    # A header that runs past the end: sniffing cannot call it safetensors, the error still can.
    cut = raw("cut.safetensors", 1000, b'{"a": {"dtype": "F32"')
    with pytest.raises(LoadError, match=r"looks like safetensors.*truncated"):
        load_graph(cut)
    with pytest.raises(LoadError, match="truncated"):
        SafetensorsFile(cut)
    huge = raw("huge.safetensors", 10**12, b"{}")
    with pytest.raises(LoadError, match="limit"):
        SafetensorsFile(huge)


def test_weights_only_audit_without_torch(tmp_path):
    rng = np.random.default_rng(2)
    tensors = _mlp_tensors(rng)
    path = write_safetensors(tmp_path / "mlp.safetensors", tensors)
    code = (
        "import sys; from initaudit.frontends import load_graph; g = load_graph(sys.argv[1]); "
        "print(sorted(l.weight.name for l in g.linear_layers())); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['fc1.weight', 'fc2.weight']", "False"]
    graph = load_graph(path)
    assert graph.meta["audit"] == "weights-only" and graph.format == "safetensors"
    fc1 = next(layer for layer in graph.linear_layers() if layer.weight.name == "fc1.weight")
    assert fc1.fan_in == 12 and fc1.width == 20 and fc1.bias is not None
    assert fc1.weight.std == pytest.approx(float(tensors["fc1.weight"][1].astype(np.float64).std()), rel=1e-9)
    fc2 = next(layer for layer in graph.linear_layers() if layer.weight.name == "fc2.weight")
    assert fc2.weight.std == pytest.approx(float(tensors["fc2.weight"][1].astype(np.float64).std()), rel=1e-6)
    assert "bn.num_batches_tracked" in {row["name"] for row in graph.meta["skipped"]}


def test_tensors_are_mapped_one_at_a_time(tmp_path):
    rng = np.random.default_rng(3)
    count, shape = 16, (512, 1024)  # 2 MiB each, 32 MiB in all
    tensors = {f"l{i}.weight": ("F32", rng.normal(size=shape).astype("<f4")) for i in range(count)}
    path = write_safetensors(tmp_path / "big.safetensors", tensors)
    del tensors
    st = SafetensorsFile(path)
    one = st.raw("l3.weight")
    assert isinstance(one, np.memmap) and one.offset == st.data_start + 3 * 512 * 1024 * 4
    total = count * 512 * 1024 * 4
    tracemalloc.start()
    try:
        graph = load_graph(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(graph.linear_layers()) == count
    # Reading everything at once would need the whole file; one tensor at a time needs a few.
    assert peak < 0.6 * total, (peak, total)


def test_safetensors_with_a_factory_equals_the_state_dict(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pkg = tmp_path / "stfactory_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(\n"
        "        nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4)\n"
        "    )\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from stfactory_pkg.nets import build

    torch.manual_seed(4)
    state = build().state_dict()
    as_numpy = {k: v.numpy() for k, v in state.items()}
    st_path = write_safetensors(
        tmp_path / "m.safetensors",
        {
            "0.weight": ("BF16", to_bf16_bits(as_numpy["0.weight"])),
            **{k: ("F32", v) for k, v in as_numpy.items() if k != "0.weight"},
        },
    )
    options = LoadOptions(model_factory="stfactory_pkg.nets:build", input_shape=(2, 12))
    from_st = load_graph(st_path, options)
    pt_path = tmp_path / "m.pt"
    bf16_state = dict(state)
    bf16_state["0.weight"] = torch.from_numpy(SafetensorsFile(st_path).array("0.weight").copy())
    torch.save(bf16_state, pt_path)
    from_pt = load_graph(pt_path, options)
    assert from_st.format == "safetensors" and from_st.meta.get("audit") != "weights-only"
    assert [layer.weight.name for layer in from_st.linear_layers()] == ["0.weight", "2.weight", "4.weight"]
    assert [layer.weight.std for layer in from_st.linear_layers()] == [
        layer.weight.std for layer in from_pt.linear_layers()
    ]
    # A safetensors file that does not fit is refused like a state dict.
    short = write_safetensors(tmp_path / "short.safetensors", {"0.weight": ("F32", as_numpy["0.weight"])})
    with pytest.raises(LoadError, match=r"does not fit stfactory_pkg.nets:build: missing 5 key\(s\)"):
        load_graph(short, options)
    for key in [k for k in sys.modules if k.startswith("stfactory_pkg")]:
        del sys.modules[key]
