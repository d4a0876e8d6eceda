"""Sharded Hugging Face checkpoints: an index and its shards audited as one model, hostile indexes
refused, discovery auditing the index instead of its shards, and the ``.bin`` variant."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from initaudit.audit import audit_file, display_path
from initaudit.cli import main
from initaudit.discover import discover
from initaudit.errors import LoadError
from initaudit.frontends import LoadOptions, load_graph, sniff
from initaudit.frontends.shards import MAX_INDEX_BYTES
from initaudit.report.json_report import report_dict

ROOT = Path(__file__).resolve().parent.parent
MODEL = "small_he_cnn_bn"  # convs, batch norms (float and int64 buffers) and a linear head
FACTORY = f"sample_models.torch_models:{MODEL}"
SHAPE = (1, 3, 32, 32)
ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_ST_DTYPES = {"float32": "F32", "int64": "I64"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A safetensors file by the spec (tensors in the order given)."""
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[str(array.dtype)],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
    return path


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """The sample CNN's state dict, with conv2 scaled by 3 and fc by 0.5: a report that shows these
    scales read the files, not the factory's own init."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT))
    try:
        from sample_models.torch_models import FACTORIES
    finally:
        sys.path.remove(str(ROOT))
    torch.manual_seed(7)
    module = FACTORIES[MODEL]()
    out = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    out["conv2.weight"] *= 3
    out["fc.weight"] *= 0.5
    out["bn1.running_var"] += 0.25  # buffers too: eval-mode BN reads them
    return out


def split(names: list[str], parts: int = 3) -> list[list[str]]:
    """``names`` in ``parts`` consecutive runs, as transformers fills shards in state-dict order."""
    size = math.ceil(len(names) / parts)
    return [names[i : i + size] for i in range(0, len(names), size)]


def shard_name(stem: str, i: int, n: int, suffix: str) -> str:
    return f"{stem}-{i + 1:05d}-of-{n:05d}{suffix}"


def write_sharded(
    directory: Path, state: dict[str, np.ndarray], *, fmt: str = "safetensors", parts: int = 3
) -> Path:
    """Shards plus an index written as transformers writes them (weight_map sorted by name)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem, suffix, index_name = (
        ("model", ".safetensors", ST_INDEX) if fmt == "safetensors" else ("pytorch_model", ".bin", BIN_INDEX)
    )
    runs = split(list(state), parts)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(runs):
        name = shard_name(stem, i, len(runs), suffix)
        _write_shard(directory / name, {k: state[k] for k in names}, fmt)
        weight_map.update(dict.fromkeys(names, name))
    total = sum(a.nbytes for a in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True))
    return directory / index_name


def _write_shard(path: Path, tensors: dict[str, np.ndarray], fmt: str) -> None:
    if fmt == "safetensors":
        write_safetensors(path, tensors)
    else:
        import torch

        torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)


def _report(path: Path, options: LoadOptions | None = None) -> dict[str, Any]:
    return report_dict(audit_file(path, options=options))


def _same_numbers(a: Any, b: Any, where: str = "") -> None:
    """Equal structure, strings and ints; floats to 1e-12 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            _same_numbers(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300), where
    else:
        assert a == b, (where, a, b)


#: What differs between one model's sharded and single-file reports by design: the index adds a
#: note (and so one IA903 info finding) naming its shards.
_OWN = ("path", "format", "meta", "notes", "findings", "counts")
SHARD_NOTE = "sharded checkpoint: 20 tensors in 3 shard(s) listed by the index"


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    findings = [
        {k: v for k, v in f.items() if k != "fingerprint"}  # the fingerprint hashes the path
        for f in report["findings"]
        if not f["message"].startswith("sharded checkpoint:")
    ]
    return {**{k: v for k, v in report.items() if k not in _OWN}, "findings": findings}


# ----------------------------------------------------------------------------- one model


def test_weights_only_index_equals_the_single_file(tmp_path, state):
    index = write_sharded(tmp_path / "sharded", state)
    single = write_safetensors(tmp_path / "single.safetensors", state)
    assert sniff(index) == "shard-index"
    sharded, whole = _report(index), _report(single)
    assert sharded["audit"] == "weights-only" and sharded["format"] == "safetensors, 3 shards"
    assert sharded["meta"]["shards"] == [shard_name("model", i, 3, ".safetensors") for i in range(3)]
    assert any(note.startswith(SHARD_NOTE) for note in sharded["notes"]), sharded["notes"]
    _same_numbers(_comparable(sharded), _comparable(whole))
    # The table reads the files: conv2's std is the scaled tensor's, computed here independently.
    conv2 = next(row for row in sharded["tensors"] if row["name"] == "conv2.weight")
    assert conv2["std"] == pytest.approx(float(state["conv2.weight"].astype(np.float64).std()), rel=1e-9)
    rows = [*sharded["tensors"], *sharded["skipped"]]
    seen = {row["name"] for row in rows} | {row["bias"] for row in sharded["tensors"] if row["bias"]}
    assert seen == set(state) and len(rows) == 19  # 20 tensors, fc.bias beside fc.weight


def test_weights_only_index_reads_no_torch(tmp_path, state):
    index = write_sharded(tmp_path / "sharded", state)
    code = (
        "import sys; from initaudit.frontends import load_graph; g = load_graph(sys.argv[1]); "
        "print(len(g.linear_layers())); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(index)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "False"]  # conv1..3 and fc


def test_index_with_model_equals_the_single_file(tmp_path, state, monkeypatch):
    monkeypatch.chdir(ROOT)  # --model imports from the working directory
    index = write_sharded(tmp_path / "sharded", state)
    single = write_safetensors(tmp_path / "single.safetensors", state)
    options = LoadOptions(model_factory=FACTORY, input_shape=SHAPE)
    sharded, whole = _report(index, options), _report(single, options)
    assert sharded["audit"] != "weights-only" and sharded["layers"]
    _same_numbers(_comparable(sharded), _comparable(whole))
    stds = {layer["weight"]["name"]: layer["weight"]["std"] for layer in sharded["layers"] if layer["weight"]}
    for key in ("conv2.weight", "fc.weight"):
        assert stds[key] == pytest.approx(float(state[key].astype(np.float64).std()), rel=1e-9)
    # Strict like a single file: a checkpoint short of one tensor does not fit the factory.
    short = {k: v for k, v in state.items() if k != "conv3.weight"}
    with pytest.raises(LoadError, match=r"does not fit .*missing 1 key\(s\): conv3.weight"):
        load_graph(write_sharded(tmp_path / "short", short), options)


# ----------------------------------------------------------------------------- hostile indexes


def _edit_index(index: Path, change) -> None:
    document = json.loads(index.read_text())
    change(document["weight_map"])
    index.write_text(json.dumps(document))


def _traversal(index: Path) -> None:
    write_safetensors(index.parent.parent / "x.safetensors", {"evil.weight": np.ones((2, 2), "<f4")})
    _edit_index(index, lambda wm: wm.__setitem__("evil.weight", "../x.safetensors"))


def _absolute_name(index: Path) -> None:
    outside = write_safetensors(
        index.parent.parent / "abs.safetensors", {"evil.weight": np.ones((2, 2), "<f4")}
    )
    _edit_index(index, lambda wm: wm.__setitem__("evil.weight", str(outside.resolve())))


def _missing_shard(index: Path) -> None:
    (index.parent / shard_name("model", 1, 3, ".safetensors")).unlink()


def _tensor_missing(index: Path) -> None:
    _edit_index(index, lambda wm: wm.__setitem__("ghost.weight", shard_name("model", 0, 3, ".safetensors")))


def _duplicate(index: Path) -> None:
    # Shard 3 also holds a tensor the index places in shard 1.
    first = json.loads(index.read_text())["weight_map"]
    third = shard_name("model", 2, 3, ".safetensors")
    from initaudit.frontends.safetensors_file import SafetensorsFile

    st = SafetensorsFile(index.parent / third)
    held = {name: np.array(st.array(name)) for name in st.tensors}
    held["conv1.weight"] = np.zeros((16, 3, 3, 3), "<f4")
    assert first["conv1.weight"] != third
    write_safetensors(index.parent / third, held)


def _unlisted(index: Path) -> None:
    _edit_index(index, lambda wm: wm.pop("fc.bias"))


def _huge(index: Path) -> None:
    with index.open("r+b") as f:  # sparse: nothing past the cap is ever read
        f.truncate(MAX_INDEX_BYTES + 1)


def _link_out(index: Path) -> None:
    name = shard_name("model", 0, 3, ".safetensors")
    outside = index.parent.parent / "elsewhere.safetensors"
    (index.parent / name).rename(outside)
    (index.parent / name).symlink_to(outside)


def _repeated_key(index: Path) -> None:
    text = index.read_text().replace('"weight_map": {', '"weight_map": {"fc.bias": "a.safetensors", ', 1)
    index.write_text(text)


def _lfs_pointer(index: Path) -> None:
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n"
    (index.parent / shard_name("model", 2, 3, ".safetensors")).write_text(pointer)


def _no_weight_map(index: Path) -> None:
    index.write_text(json.dumps({"architectures": ["Net"], "hidden_size": 8}))


HOSTILE = {
    "traversal": (_traversal, "shard '../x.safetensors' (of tensor 'evil.weight') must be a file name"),
    "absolute path": (_absolute_name, "abs.safetensors' (of tensor 'evil.weight') must be a file name"),
    "missing shard": (_missing_shard, "shard model-00002-of-00003.safetensors does not exist"),
    "tensor missing from its shard": (
        _tensor_missing,
        "tensor 'ghost.weight' is listed in shard model-00001-of-00003.safetensors, which does not hold it",
    ),
    "duplicate across shards": (
        _duplicate,
        "tensor 'conv1.weight' is held by shard model-00003-of-00003.safetensors and by "
        "model-00001-of-00003.safetensors, where the index places it (a duplicate across shards)",
    ),
    "unlisted tensor": (_unlisted, "holds tensor 'fc.bias', which the index does not list"),
    "huge index": (
        _huge,
        f"sharded checkpoint index is {MAX_INDEX_BYTES + 1} bytes (limit {MAX_INDEX_BYTES})",
    ),
    "link out of the directory": (_link_out, "is a link that leaves the index's directory"),
    "tensor listed twice": (_repeated_key, "duplicate key 'fc.bias'"),
    "lfs pointer shard": (_lfs_pointer, "is a Git LFS pointer, not the weights; run `git lfs pull`"),
    "a JSON file that is no index": (_no_weight_map, "is a JSON file, not a model"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_index_is_one_error_line(tmp_path, state, monkeypatch, capsys, case):
    edit, problem = HOSTILE[case]
    index = write_sharded(tmp_path / "sharded", state)
    edit(index)
    monkeypatch.chdir(tmp_path)
    for flags in ([], ["--model", FACTORY]):
        assert main(["check", "sharded/" + index.name, *flags]) == 2, (case, flags)
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
        assert lines[0].startswith(f"initaudit: error: {display_path(index)}: "), lines[0]
        assert problem in lines[0], (case, lines[0])


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path, state):
    """In the hub cache every file of a snapshot is a link to ../../blobs/<hash>."""
    source = write_sharded(tmp_path / "plain", state)
    repo = tmp_path / "hub" / "models--org--net"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(source.parent.iterdir())):
        blob = blobs / f"{i:040x}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    graph = load_graph(snapshot / ST_INDEX)
    assert graph.format == "safetensors, 3 shards" and len(graph.linear_layers()) == 4


# ----------------------------------------------------------------------------- discovery and fix


def test_a_walk_audits_the_index_and_not_its_shards(tmp_path, state, monkeypatch, capsys):
    models = tmp_path / "models"
    index = write_sharded(models / "net", state)
    write_safetensors(models / "lone.safetensors", {"w.weight": state["fc.weight"]})
    # A shard name in another directory is not covered by this index.
    (models / "other").mkdir()
    other = write_safetensors(
        models / "other" / shard_name("model", 0, 3, ".safetensors"), {"v.weight": state["fc.weight"]}
    )
    monkeypatch.chdir(tmp_path)
    found = discover(["models"])
    assert found == sorted(
        [Path("models/net") / ST_INDEX, Path("models/lone.safetensors"), Path("models/other") / other.name]
    )
    # A shard named alone is audited alone; named beside its index, the index covers it.
    first = index.parent / shard_name("model", 0, 3, ".safetensors")
    assert discover([first]) == [first]
    assert discover([first, index]) == [index]
    assert discover(["models/net/*"]) == [Path("models/net") / ST_INDEX]
    assert main(["check", "models", "-f", "json", "-o", "r.json"]) == 0, capsys.readouterr().err
    reports = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert sorted(r["path"] for r in reports) == sorted(display_path(p) for p in found)
    net = next(r for r in reports if r["path"].endswith(ST_INDEX))
    assert len(net["tensors"]) == 4 and net["format"] == "safetensors, 3 shards"


def test_fix_refuses_an_index(tmp_path, state, capsys):
    index = write_sharded(tmp_path / "sharded", state)
    assert main(["fix", str(index), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not write sharded checkpoints" in err, err


# ----------------------------------------------------------------------------- .bin shards


def test_bin_shards_equal_the_single_file(tmp_path, state, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(ROOT)
    index = write_sharded(tmp_path / "bin", state, fmt="bin")
    assert index.name == BIN_INDEX and sniff(index) == "shard-index"
    single = tmp_path / "single.pt"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, single)
    sharded, whole = _report(index), _report(single)
    assert sharded["format"] == "pytorch state dict, 3 shards" and sharded["audit"] == "weights-only"
    _same_numbers(_comparable(sharded), _comparable(whole))
    options = LoadOptions(model_factory=FACTORY, input_shape=SHAPE)
    sharded, whole = _report(index, options), _report(single, options)
    assert sharded["layers"]
    _same_numbers(_comparable(sharded), _comparable(whole))
    # And the .bin index gives what the safetensors index gives.
    st_index = write_sharded(tmp_path / "st", state)
    _same_numbers(_comparable(_report(st_index, options)), _comparable(sharded))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_bin_shard_is_never_unpickled_unsafely(tmp_path, state, monkeypatch):
    torch = pytest.importorskip("torch")
    index = write_sharded(tmp_path / "bin", state, fmt="bin")
    marker = tmp_path / "ran"
    evil = index.parent / shard_name("pytorch_model", 1, 3, ".bin")
    held = torch.load(evil, weights_only=True)
    torch.save({**held, "payload": _Payload(marker)}, evil)
    for options in (
        LoadOptions(),
        LoadOptions(trust_model=True),
        LoadOptions(model_factory=FACTORY, trust_model=True),
    ):
        with pytest.raises(
            LoadError, match=r"shard pytorch_model-00002-of-00003.bin: holds pickled Python objects"
        ) as info:
            load_graph(index, options)
        assert "weights_only=True" in info.value.problem and "--trust-model" not in info.value.problem
    assert not marker.exists()
    # A .bin shard that lacks a listed tensor is caught as it is read.
    torch.save({k: v for k, v in held.items() if k != next(iter(held))}, evil)
    with pytest.raises(LoadError, match="which does not hold it"):
        load_graph(index)
