"""Loading PyTorch files safely: trust, hostile files, --model factories, checkpoint layouts, config.

The security tests build pickles whose payload creates a marker file when unpickled, and
check that no combination of flags short of trust lets it run (and that trust does, so the
tests can fail).
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

from initaudit.cli import main
from initaudit.config import find_pyproject, load_config
from initaudit.errors import LoadError, UsageError
from initaudit.frontends import LoadOptions, load_graph, sniff
from initaudit.frontends.torch_load import scan_pickle

FACTORY_SOURCE = """
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, depth=6, width=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def build():
    return MLP()


def build_wide():
    return MLP(width=24)


def not_a_module():
    return {"layers": 3}
"""


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears iff the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def factory_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package in a fresh working directory, importable the way a user's project is; returns
    its module name (unique, so sys.modules caches from other tests cannot answer for it)."""
    name = f"nets_{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text("")
    (project / name / "models.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(project)
    yield f"{name}.models"
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def _build(module: str, attr: str = "build"):
    import importlib

    sys.path.insert(0, str(Path.cwd()))
    try:
        return getattr(importlib.import_module(module), attr)()
    finally:
        sys.path.remove(str(Path.cwd()))


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# ----------------------------------------------------------------------------- hostile pickles


def _hostile_files(torch, where: Path, marker: Path) -> dict[str, Path]:
    files = {}
    bare = where / "bare.pkl"
    bare.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=4))
    files["bare pickle"] = bare
    bare2 = where / "bare2.pt"
    bare2.write_bytes(pickle.dumps([Payload(marker)], protocol=2))
    files["bare pickle, protocol 2"] = bare2
    state = {"layers.0.weight": torch.ones(2, 2), "evil": Payload(marker)}
    zipped = where / "zipped.pt"
    torch.save(state, zipped)
    files["torch.save zip"] = zipped
    legacy = where / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    files["legacy torch.save"] = legacy
    assert not marker.exists()  # writing the files did not run the payload
    return files


FLAG_SETS = [
    [],
    ["--model", "nets_absent.models:build"],
    ["--input-shape", "1,16"],
    ["--model", "nets_absent.models:build", "--input-shape", "1,16", "--input-dtype", "float32"],
    ["--no-trust-model"],
    ["--format", "json"],
]


def test_malicious_pickle_never_runs_without_trust(torch, tmp_path, monkeypatch, capsys):
    models, project = tmp_path / "models", tmp_path / "project"
    models.mkdir()
    project.mkdir()
    monkeypatch.chdir(project)
    marker = tmp_path / "PWNED"
    files = _hostile_files(torch, models, marker)
    for label, path in files.items():
        assert sniff(path) in ("pickle", "torch-zip"), label
        for flags in FLAG_SETS:
            assert main(["check", str(path), *flags]) == 2, (label, flags)
            line = _one_error_line(capsys)
            assert str(path) in line and "--trust-model" in line, (label, flags, line)
            assert "arbitrary code" in line, line
            assert not marker.exists(), (label, flags)


def test_trust_lying_next_to_the_model_is_not_trust(torch, tmp_path, monkeypatch, capsys):
    downloaded, project = tmp_path / "downloaded", tmp_path / "project"
    downloaded.mkdir()
    project.mkdir()
    marker = tmp_path / "PWNED"
    files = _hostile_files(torch, downloaded, marker)
    # The download ships a config granting itself trust; we run from our own project.
    (downloaded / "pyproject.toml").write_text("[tool.initaudit]\ntrust-model = true\n")
    (project / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    monkeypatch.chdir(project)
    assert load_config().trust_model is None
    for path in files.values():
        assert main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        warning, error = (line for line in err.splitlines() if line.strip())
        # The config beside the model is read for policy only, and says its trust is ignored.
        assert "trust-model ignored" in warning and str(downloaded / "pyproject.toml") in warning
        assert error.startswith("initaudit: error: ") and "--trust-model" in error
    assert not marker.exists()


def test_trust_does_run_the_payload(torch, tmp_path, monkeypatch, capsys):
    """Proof that the security tests can fail: with trust the same files do run."""
    monkeypatch.chdir(tmp_path)
    for i, flags in enumerate((["--trust-model"], ["--model", "x.y:z", "--trust-model"])):
        marker = tmp_path / f"PWNED{i}"
        files = _hostile_files(torch, tmp_path, marker)
        for path in files.values():
            marker.unlink(missing_ok=True)
            main(["check", str(path), *flags])
            capsys.readouterr()
            assert marker.exists(), path


def test_trust_from_the_working_directory_config(torch, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[tool.initaudit]\ntrust-model = true\n")
    marker = tmp_path / "PWNED"
    files = _hostile_files(torch, tmp_path, marker)
    monkeypatch.chdir(project / "sub")  # found from the working directory upward
    main(["check", str(files["torch.save zip"])])
    err = capsys.readouterr().err
    assert marker.exists()
    assert "trust-model = true in" in err and str(project / "pyproject.toml") in err
    # A flag overrides the config: --no-trust-model refuses again.
    marker.unlink()
    assert main(["check", str(files["torch.save zip"]), "--no-trust-model"]) == 2
    assert "--trust-model" in _one_error_line(capsys)
    assert not marker.exists()


def test_malicious_pickle_as_a_real_process(torch, tmp_path):
    marker = tmp_path / "PWNED"
    files = _hostile_files(torch, tmp_path, marker)
    for path in (files["torch.save zip"], files["bare pickle"]):
        done = subprocess.run(
            [sys.executable, "-m", "initaudit", "check", str(path), "--model", "a.b:c"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "--trust-model" in lines[0], done.stderr
        assert "Traceback" not in done.stderr + done.stdout
    assert not marker.exists()


def test_scan_names_the_import_without_running_it(torch, tmp_path):
    marker = tmp_path / "PWNED"
    files = _hostile_files(torch, tmp_path, marker)
    for label, path in files.items():
        kind, names = scan_pickle(path, sniff(path))
        assert kind == "objects", label
        assert "builtins.open" in names or "io.open" in names, (label, names)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": [1, 2.0, "x"]}, protocol=4))
    assert scan_pickle(plain, "pickle") == ("plain", [])
    assert not marker.exists()


# ----------------------------------------------------------------------------- code-carrying archives


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _scripted_and_exported(torch, tmp_path: Path) -> tuple[Path, Path]:
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), scripted)
    exported = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 8),)), exported)
    return scripted, exported


def test_torchscript_and_pt2_need_trust(torch, tmp_path, capsys):
    scripted, exported = _scripted_and_exported(torch, tmp_path)
    assert sniff(scripted) == "torchscript" and sniff(exported) == "pt2"
    for path, word in ((scripted, "TorchScript"), (exported, "torch.export")):
        for flags in ([], ["--model", "a.b:c"], ["--input-shape", "2,8"]):
            assert main(["check", str(path), *flags]) == 2
            line = _one_error_line(capsys)
            assert word in line and "--trust-model" in line and "code" in line


def test_trusted_archives_bring_their_own_graph(torch, tmp_path):
    scripted, exported = _scripted_and_exported(torch, tmp_path)
    trusted = LoadOptions(trust_model=True, input_shape=(2, 8), model_factory="ignored.mod:build")
    graph = load_graph(exported, trusted)
    assert graph.format == "torch.export"
    assert [layer.width for layer in graph.linear_layers()] == [8, 2]
    assert any("ignored.mod:build ignored" in note for note in graph.notes)
    assert any("--input-shape ignored" in note for note in graph.notes)
    scripted_graph = load_graph(scripted, trusted)
    assert [layer.fan_in for layer in scripted_graph.linear_layers()] == [8, 8]


# ----------------------------------------------------------------------------- broken files


def _broken_files(torch, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3, 3)}, good)
    data = good.read_bytes()
    cases = {
        "empty": (b"", "empty"),
        "truncated zip": (data[: len(data) // 2], "truncated or corrupt"),
        "random bytes": (np.random.default_rng(0).bytes(4096), "unrecognized"),
        "broken pickle": (b"\x80\x04\x95" + b"\x00" * 40, "corrupt or truncated"),
        "cut pickle": (pickle.dumps({"a": list(range(100))}, protocol=2)[:50], "corrupt or truncated"),
    }
    out = {}
    for name, (content, problem) in cases.items():
        path = tmp_path / (name.replace(" ", "_") + ".pt")
        path.write_bytes(content)
        out[name] = (path, problem)
    # A well-formed zip whose tensor storage is cut short.
    short = tmp_path / "short_storage.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(short, "w") as dst:
        for info in src.infolist():
            member = src.read(info.filename)
            dst.writestr(info.filename, member[:10] if info.filename.endswith("data/0") else member)
    out["short storage"] = (short, "not a readable PyTorch checkpoint")
    return out


def test_broken_files_exit_two_with_one_line(torch, tmp_path, capsys):
    for label, (path, problem) in _broken_files(torch, tmp_path).items():
        for flags in ([], ["--trust-model"]):
            assert main(["check", str(path), *flags]) == 2, label
            line = _one_error_line(capsys)
            assert str(path) in line, line
            if not flags:
                assert problem in line, (label, line)


def test_checkpoint_without_a_state_dict_is_named(torch, tmp_path):
    path = tmp_path / "stats.pt"
    torch.save({"epoch": 3, "loss": 0.5}, path)
    with pytest.raises(
        LoadError,
        match=r"'epoch', 'loss', not a module or a state dict of tensors \(looked under 'state_dict'",
    ):
        load_graph(path)


# ----------------------------------------------------------------------------- --model factories


def test_state_dict_with_factory_end_to_end(torch, factory_pkg, tmp_path, capsys):
    torch.manual_seed(0)
    net = _build(factory_pkg)
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    code = main(["check", str(path), "--model", f"{factory_pkg}:build", "--format", "json"])
    report = json.loads(capsys.readouterr().out)["reports"][0]
    assert code == 1  # PyTorch's default init shrinks the mean length ~6x per ReLU layer
    assert report["verdicts"]["fm1"] == "error"
    weights = [layer["weight"]["name"] for layer in report["layers"] if layer.get("weight")]
    assert weights == [*(f"layers.{i}.weight" for i in range(6)), "head.weight"]
    named = [f for f in report["findings"] if f["code"] == "IA103"]
    assert {f"`layers.{i}.weight`" for i in range(6)} <= {f["message"].split(" ")[0] for f in named}
    # The loaded values are the file's, not the factory's fresh init.
    first = next(layer for layer in report["layers"] if layer.get("weight"))
    std = float(net.layers[0].weight.detach().double().std(unbiased=False))
    assert first["weight"]["std"] == pytest.approx(std, rel=1e-6)


def test_checkpoint_layouts_reach_the_same_graph(torch, factory_pkg, tmp_path):
    torch.manual_seed(1)
    state = _build(factory_pkg).state_dict()
    variants = {
        "plain": state,
        "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 7},
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
        "training loop": {"model_state_dict": state, "optimizer_state_dict": {}, "step": 10},
        "bf16": {k: v.to(torch.bfloat16) for k, v in state.items()},
    }
    options = LoadOptions(model_factory=f"{factory_pkg}:build")
    stds = {}
    for label, obj in variants.items():
        path = tmp_path / f"{label}.ckpt"
        torch.save(obj, path)
        graph = load_graph(path, options)
        stds[label] = [layer.weight.std for layer in graph.linear_layers()]
        names = [layer.weight.name for layer in graph.linear_layers()]
        assert names == [*(f"layers.{i}.weight" for i in range(6)), "head.weight"], label
        if label == "lightning":
            assert any("checkpoint['state_dict']" in n for n in graph.notes)
            assert any("'model.'" in n for n in graph.notes)
        if label == "dataparallel":
            assert any("'module.'" in n for n in graph.notes)
    for label in ("lightning", "dataparallel", "training loop"):
        assert stds[label] == stds["plain"], label
    # bf16 rounds each weight to 8 mantissa bits: the std moves by well under 1%.
    assert stds["bf16"] == pytest.approx(stds["plain"], rel=1e-2)
    assert stds["bf16"] != stds["plain"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda sd: sd.pop("head.bias"), "missing 1 key(s): head.bias"),
        (lambda sd: sd.update(extra=sd["head.bias"]), "unexpected 1 key(s): extra"),
        (lambda sd: sd.update({"head.weight": sd["head.weight"][:2]}), "head.weight has shape (2, 16)"),
    ],
)
def test_state_dict_that_does_not_fit_the_factory(torch, factory_pkg, tmp_path, capsys, mutate, expected):
    state = dict(_build(factory_pkg).state_dict())
    mutate(state)
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    assert main(["check", str(path), "--model", f"{factory_pkg}:build"]) == 2
    line = _one_error_line(capsys)
    assert f"state dict does not fit {factory_pkg}:build" in line and expected in line, line


def test_wrong_width_factory_names_the_shape(torch, factory_pkg, tmp_path, capsys):
    path = tmp_path / "narrow.pt"
    torch.save(_build(factory_pkg).state_dict(), path)
    assert main(["check", str(path), "--model", f"{factory_pkg}:build_wide"]) == 2
    assert "shape (16, 16) in the file, (24, 24) in the model" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_colon", "expected MODULE:FACTORY"),
        ("nets_missing_zz.models:build", "cannot import nets_missing_zz.models"),
        ("{pkg}:absent", "has no attribute absent"),
        ("{pkg}:not_a_module", "not a torch.nn.Module"),
    ],
)
def test_bad_factories_are_usage_errors(torch, factory_pkg, tmp_path, capsys, spec, expected):
    path = tmp_path / "w.pt"
    torch.save(_build(factory_pkg).state_dict(), path)
    assert main(["check", str(path), "--model", spec.format(pkg=factory_pkg)]) == 2
    assert expected in _one_error_line(capsys)


def test_weights_only_without_a_factory(torch, tmp_path):
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20), torch.nn.Linear(20, 5))
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    graph = load_graph(path)
    assert graph.meta["audit"] == "weights-only" and graph.format == "pytorch state dict"
    by_name = {layer.weight.name: layer for layer in graph.linear_layers()}
    assert set(by_name) == {"0.weight", "2.weight"}
    assert by_name["0.weight"].fan_in == 10 and by_name["2.weight"].fan_in == 20
    expected = float(net[0].weight.detach().double().std(unbiased=False))
    assert by_name["0.weight"].weight.std == pytest.approx(expected, rel=1e-6)
    skipped = {row["name"] for row in graph.meta["skipped"]}
    assert "1.num_batches_tracked" in skipped  # an int64 buffer: listed, not audited


def test_trusted_full_module(torch, factory_pkg, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(_build(factory_pkg), path)  # pickles the class by reference: importable from cwd
    with pytest.raises(LoadError, match=r"e\.g\. nets_\w+\.models\.MLP"):
        load_graph(path)
    graph = load_graph(path, LoadOptions(trust_model=True, input_shape=(4, 16)))
    assert graph.format == "pytorch module"
    assert [layer.width for layer in graph.linear_layers()] == [16] * 6 + [3]
    assert any("weights_only=False because of --trust-model" in n for n in graph.notes)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": _build(factory_pkg), "epoch": 1}, wrapped)
    graph = load_graph(wrapped, LoadOptions(trust_model=True, input_shape=(4, 16)))
    assert [layer.width for layer in graph.linear_layers()] == [16] * 6 + [3]
    assert any("module read from checkpoint['model']" in n for n in graph.notes)


def test_onnx_with_a_factory_keeps_its_graph(samples):
    graph = load_graph(samples / "wide_he_mlp.onnx", LoadOptions(model_factory="some.pkg:build"))
    assert graph.format == "onnx"
    assert any("some.pkg:build ignored" in note for note in graph.notes)


# ----------------------------------------------------------------------------- config


def test_config_from_the_working_directory_upward(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text(
        "[tool.initaudit]\ntrust-model = true\nmodel = 'pkg.m:f'\ninput-shape = [1, 3, 8, 8]\n"
        "input_dtype = 'int64'\ncolour = 'blue'\n"
    )
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert find_pyproject() == tmp_path / "pyproject.toml"
    config = load_config()
    assert (config.trust_model, config.model, config.input_shape) == (True, "pkg.m:f", (1, 3, 8, 8))
    assert config.input_dtype is None  # misspelt: a warning, not a setting
    assert len(config.warnings) == 2
    assert "did you mean 'input-dtype'" in config.warnings[0] and "'colour'" in config.warnings[1]


def test_explicit_config_and_type_errors(tmp_path):
    standalone = tmp_path / "initaudit.toml"
    standalone.write_text("input-shape = '2,5'\n")
    assert load_config(standalone).input_shape == (2, 5)
    for text in ("trust-model = 'yes'", "input-shape = '1,x'", "model = 'no_colon'", "input-shape = [0]"):
        bad = tmp_path / "pyproject.toml"
        bad.write_text(f"[tool.initaudit]\n{text}\n")
        with pytest.raises(UsageError):
            load_config(bad)
    with pytest.raises(UsageError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_config_model_and_shape_flow_into_the_cli(torch, factory_pkg, tmp_path, capsys):
    torch.manual_seed(3)
    path = tmp_path / "w.pt"
    torch.save(_build(factory_pkg).state_dict(), path)
    Path("pyproject.toml").write_text(
        f"[tool.initaudit]\nmodel = '{factory_pkg}:build'\ninput-shape = '2,16'\n"
    )
    assert main(["check", str(path), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)["reports"][0]
    assert report["audit"] != "weights-only" and report["verdicts"]["fm1"] == "error"
    assert not any("guessed" in note for note in report["notes"])  # the shape came from the config


def test_bad_flags_are_usage_errors(tmp_path, capsys, samples):
    model = str(samples / "wide_he_mlp.onnx")
    assert main(["check", model, "--input-dtype", "complex7"]) == 2
    assert "--input-dtype" in _one_error_line(capsys)
    assert main(["check", model, "--model", "nocolon"]) == 2
    assert "MODULE:FACTORY" in _one_error_line(capsys)
    assert main(["check", model, "--config", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in _one_error_line(capsys)


def test_torch_zip_sniffing_corner_cases(tmp_path):
    member_only = tmp_path / "odd.zip"
    with zipfile.ZipFile(member_only, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(LoadError, match="zip archive but not a PyTorch or ONNX model"):
        load_graph(member_only)
    assert os.path.getsize(member_only) > 0
