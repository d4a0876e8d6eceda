"""Machine formats on every sample model: JSON against its schema, SARIF against the OASIS 2.1.0
schema, GitHub workflow commands escaped as the actions toolkit does, JUnit through xml.etree,
markdown under its byte cap. Every renderer also shows a model that could not be audited.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jsonschema
import numpy as np
import onnx
import pytest

from initaudit.audit import AuditResult, audit_file, audit_graph
from initaudit.errors import LoadError
from initaudit.frontends.weights_only import weights_only_graph
from initaudit.report.common import FAMILIES, family
from initaudit.report.github import escape_data, escape_property, render_github
from initaudit.report.json_report import SCHEMA, json_schema, render_json
from initaudit.report.junit import render_junit
from initaudit.report.markdown import render_markdown
from initaudit.report.model_error import ModelError
from initaudit.report.sarif import FINGERPRINT_KEY, render_sarif
from initaudit.rules import RULES, Finding, Severity

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "sample_models").glob("*.onnx"))
SARIF_SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-2.1.0.json").read_text(encoding="utf-8"))
#: A tensor name with every character the formats must escape: the actions toolkit's , : % CR LF,
#: XML's forbidden control character, markdown's pipe and backtick, and HTML's angle brackets.
ODD_NAME = "fc1.w,eight:50%\nnext\rline\x07<b>|`"
ODD_DIR = "odd,dir:100% #1"
LEVELS = {"error": "error", "warning": "warning", "info": "note"}
COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}


@pytest.fixture(scope="module")
def results(monkeypatch_module: pytest.MonkeyPatch) -> list[AuditResult]:
    monkeypatch_module.chdir(ROOT)  # paths as the CLI shows them: relative to the working directory
    return [audit_file(path) for path in SAMPLES]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def odd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AuditResult:
    """deep_pytorch_default_mlp with fc1's weight renamed to ODD_NAME, in a directory whose
    name needs escaping too, audited from its parent (a relative path)."""
    model = onnx.load(str(ROOT / "sample_models" / "deep_pytorch_default_mlp.onnx"))
    for tensor in model.graph.initializer:
        if tensor.name == "fc1.weight":
            tensor.name = ODD_NAME
    for node in model.graph.node:
        node.input[:] = [ODD_NAME if name == "fc1.weight" else name for name in node.input]
    (tmp_path / ODD_DIR).mkdir()
    onnx.save(model, str(tmp_path / ODD_DIR / "model.onnx"))
    monkeypatch.chdir(tmp_path)
    result = audit_file(f"{ODD_DIR}/model.onnx")
    assert any(f.location == ODD_NAME for f in result.findings)  # IA103: its variance is 1/6 of He
    return result


@pytest.fixture(scope="module")
def weights_only() -> AuditResult:
    """A PyTorch-default 3-layer MLP state dict without architecture (IA105), one NaN weight."""
    rng = np.random.default_rng(7)
    state = [
        (f"layers.{j}.weight", rng.uniform(-1, 1, (64, 64)).astype(np.float32) / 8) for j in range(3)
    ] + [("ln.weight", np.ones(64, np.float32))]
    state[1][1][0, 0] = np.nan
    graph = weights_only_graph(state, source="mlp.safetensors", fmt="safetensors")
    return audit_graph(graph, "mlp.safetensors")


def fingerprint(finding: Finding, path: str) -> str:
    """DESIGN.md's fingerprint of a located finding, computed independently of rules.py (the
    formula every existing baseline and code-scanning alert holds). Findings without a location
    hash their message too: their properties are tested in test_unlocated_findings_*."""
    if not finding.location:
        return finding.fingerprint(path)
    return hashlib.sha256(f"{finding.code}|{path}|{finding.location}".encode()).hexdigest()[:16]


# JSON -----------------------------------------------------------------------------------------


def validate_report(document: dict) -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)


def test_json_validates_on_every_sample_and_round_trips(results, weights_only):
    error = ModelError.from_exception("missing.onnx", LoadError("missing.onnx", "no such file"))
    text = render_json([*results, weights_only, error])
    document = json.loads(text)
    validate_report(document)
    assert json.dumps(document, indent=2, allow_nan=False) + "\n" == text  # nothing lost in a round trip
    assert document["schema"] == SCHEMA
    assert [r["path"] for r in document["reports"]] == [r.path for r in [*results, weights_only]]
    assert document["errors"] == [{"path": "missing.onnx", "message": "no such file"}]
    weights = document["reports"][-1]
    assert weights["audit"] == "weights-only" and weights["verdicts"]["fm1"] == "not computed"
    assert {f["code"] for f in weights["findings"]} >= {"IA105", "IA501"}
    for report, result in zip(document["reports"], [*results, weights_only], strict=True):
        assert [f["fingerprint"] for f in report["findings"]] == [
            fingerprint(f, result.path) for f in result.findings
        ]


def test_model_error_from_exceptions():
    assert ModelError.from_exception("a.pt", LoadError("a.pt", "refused: a full pickle")).message == (
        "refused: a full pickle"
    )
    assert ModelError.from_exception("b.onnx", KeyError("x")).message == "internal error: KeyError: 'x'"


def test_schema_rejects_what_the_report_never_writes(results):
    """The schema is not vacuous: a misspelled field, a wrong type, NaN as null all fail."""
    document = json.loads(render_json(results[:1]))
    schema = json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    for mutate in (
        lambda d: d["reports"][0].__setitem__("verdict", "pass"),
        lambda d: d["reports"][0]["summary"].__setitem__("mean_ratio", None),
        lambda d: d["reports"][0]["summary"].__setitem__("mean_ratio", "NaN"),
        lambda d: d["reports"][0]["layers"][0].__setitem__("width", "16"),
        lambda d: d["reports"][0]["findings"][0].__setitem__("severity", "fatal"),
        lambda d: d.pop("errors"),
    ):
        broken = copy.deepcopy(document)
        mutate(broken)
        assert not validator.is_valid(broken)


def test_json_with_monte_carlo_validates(monkeypatch):
    pytest.importorskip("torch")
    from initaudit.montecarlo.curvature import CurvatureResult, InitCurvature
    from initaudit.montecarlo.measure import MCOptions

    monkeypatch.chdir(ROOT)
    result = audit_file("sample_models/wide_he_mlp.onnx", mc=MCOptions(samples=64, seed=3))
    document = json.loads(render_json([result]))
    validate_report(document)
    report = document["reports"][0]
    if report["monte_carlo"] is None:  # Monte Carlo could not run here: the note says why
        pytest.skip("; ".join(report["notes"]))
    assert report["monte_carlo"]["samples"] == 64 and report["monte_carlo"]["curvature"] is None
    taps = [layer for layer in report["layers"] if layer["tap"]]
    assert taps and all(layer["measured"] is not None for layer in taps)
    # Gaussian resampling draws the law the prediction describes: they agree within 5 se.
    last = taps[-1]["measured"]
    assert abs(last["mean"] - taps[-1]["mean"]) < 5 * last["mean_se"]
    row = next(line for line in render_markdown([result]).splitlines() if line.startswith("| `"))
    assert f"{last['mean']:.3g} ± {last['mean_se']:.3g}" in row  # the markdown's MC column

    # --curvature is slow to run: its JSON shape is checked on a result built by hand, with a
    # non-finite trace standard error (one probe), which curvature writes as null.
    one = InitCurvature(12.5, 20, True, 40.0, math.nan, 1.1, {"fc1.weight": 0.5}, "autograd")
    result.prediction.measured.curvature = CurvatureResult(
        12.5, 40.0, {"fc1.weight": 0.5}, [one], 100, 10, 0.1
    )
    validate_report(json.loads(render_json([result])))


def test_docs_examples_follow_the_schema():
    """The complete example document and the finding in docs/json-schema.md validate."""
    blocks = re.findall(r"```json\n(.*?)```", (ROOT / "docs" / "json-schema.md").read_text(), re.S)
    documents = [json.loads(b) for b in blocks if b.lstrip().startswith('{\n  "schema"')]
    assert documents, "docs/json-schema.md lost its example document"
    for document in documents:
        validate_report(document)
    schema = json_schema()
    finding = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/finding"}
    examples = [json.loads(b) for b in blocks if b.lstrip().startswith('{\n  "code"')]
    assert examples
    for example in examples:
        jsonschema.Draft202012Validator(finding).validate(example)


# SARIF ----------------------------------------------------------------------------------------

_URI_REFERENCE = re.compile(r"^[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*$")


def sarif(entries, fail_on: str = "error", root: Path | None = None) -> dict:
    document = json.loads(render_sarif(entries, fail_on, root))
    validator = jsonschema.validators.validator_for(SARIF_SCHEMA)  # the draft the schema declares
    validator.check_schema(SARIF_SCHEMA)
    checker = validator(SARIF_SCHEMA, format_checker=validator.FORMAT_CHECKER)
    checker.validate(document)
    broken = copy.deepcopy(document)  # the check has teeth: a level SARIF does not know fails it
    for item in broken["runs"][0]["results"][:1]:
        item["level"] = "fatal"
        assert not checker.is_valid(broken)
    return document


def walk(value, key=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v, key)


def test_sarif_validates_on_every_sample(results, weights_only):
    error = ModelError("broken.onnx", "truncated protobuf")
    document = sarif([*results, weights_only, error], root=ROOT)
    (run,) = document["runs"]
    driver = run["tool"]["driver"]
    assert (
        driver["name"] == "initaudit"
        and driver["version"]
        and driver["informationUri"].startswith("https://")
    )
    assert [r["id"] for r in driver["rules"]] == list(RULES)
    for rule in driver["rules"]:
        assert rule["name"] == RULES[rule["id"]].name
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"] and rule["help"]["text"]
        assert rule["defaultConfiguration"]["level"] == LEVELS[str(RULES[rule["id"]].severity)]
    # No text region anywhere: a model file is binary (DESIGN.md).
    assert not any(key == "region" for key, _ in walk(document))
    for key, value in walk(document):
        if key == "uri" and not value.startswith("file:"):
            assert _URI_REFERENCE.match(value) and not urlsplit(value).scheme, value
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == ROOT.as_uri() + "/"

    expected = [(r, f) for r in [*results, weights_only] for f in r.findings]
    assert len(run["results"]) == len(expected)
    for sarif_result, (result, finding) in zip(run["results"], expected, strict=True):
        assert sarif_result["ruleId"] == finding.code
        assert driver["rules"][sarif_result["ruleIndex"]]["id"] == finding.code
        assert sarif_result["level"] == LEVELS[str(finding.severity)]
        assert finding.message in sarif_result["message"]["text"]
        assert sarif_result["partialFingerprints"][FINGERPRINT_KEY] == fingerprint(finding, result.path)
        (location,) = sarif_result["locations"]
        artifact = location["physicalLocation"]["artifactLocation"]
        assert unquote(artifact["uri"]) == (ROOT / result.path).relative_to(ROOT).as_posix()
        assert artifact["uriBaseId"] == "%SRCROOT%"
        assert run["artifacts"][artifact["index"]]["location"]["uri"] == artifact["uri"]
        if finding.location:
            (logical,) = location["logicalLocations"]
            assert logical["name"] == finding.location and logical["kind"] in ("member", "object")
        else:
            assert "logicalLocations" not in location
        assert sarif_result["properties"]["blocking"] == (finding.severity is Severity.ERROR)

    weight_kinds = {
        loc["logicalLocations"][0]["name"]: loc["logicalLocations"][0]["kind"]
        for r in run["results"]
        for loc in r["locations"]
        if r["ruleId"] in ("IA103", "IA101")
    }
    assert weight_kinds["fc1.weight"] == "member" and weight_kinds["/act12/Relu"] == "object"
    evidence = next(r for r in run["results"] if r["ruleId"] == "IA301")["properties"]["evidence"]
    assert evidence["blocks"] == 50 and evidence["ratio"] > 10  # the unscaled residual sample

    (invocation,) = run["invocations"]
    assert invocation["executionSuccessful"] is False
    (note,) = invocation["toolExecutionNotifications"]
    assert note["level"] == "error" and "truncated protobuf" in note["message"]["text"]
    assert note["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "broken.onnx"


def test_sarif_without_errors_succeeds_and_fail_on_marks_blocking(results):
    document = sarif(results, fail_on="warning")
    assert document["runs"][0]["invocations"][0]["executionSuccessful"] is True
    for item in document["runs"][0]["results"]:
        assert item["properties"]["blocking"] == (item["level"] in ("error", "warning"))
    only_errors = sarif([ModelError("a b.onnx", "boom")])  # no result at all is still a valid log
    run = only_errors["runs"][0]
    assert run["results"] == [] and run["invocations"][0]["executionSuccessful"] is False
    assert run["artifacts"][0]["location"]["uri"] == "a%20b.onnx"


def test_sarif_escapes_odd_names_and_paths(odd, tmp_path):
    document = sarif([odd], root=tmp_path)
    artifact = document["runs"][0]["artifacts"][0]["location"]
    assert artifact["uri"] == "odd%2Cdir%3A100%25%20%231/model.onnx"
    assert unquote(artifact["uri"]) == f"{ODD_DIR}/model.onnx"
    names = [
        r["locations"][0].get("logicalLocations", [{}])[0].get("name") for r in document["runs"][0]["results"]
    ]
    assert ODD_NAME in names
    # A model outside the root gets an absolute file URI and no base id.
    outside = sarif([odd], root=tmp_path / ODD_DIR / "elsewhere")
    location = outside["runs"][0]["artifacts"][0]["location"]
    assert location["uri"].startswith("file:///") and "uriBaseId" not in location
    assert Path(unquote(urlsplit(location["uri"]).path)) == tmp_path / ODD_DIR / "model.onnx"
    assert "originalUriBaseIds" not in outside["runs"][0]


def test_sarif_fingerprints_do_not_depend_on_the_working_directory(odd, tmp_path, monkeypatch):
    """Audited from tmp_path, rendered with the root one level up: the fingerprints are those of
    an audit run from that root (the path in a fingerprint is relative to the SARIF root)."""
    document = sarif([odd], root=tmp_path.parent)
    monkeypatch.chdir(tmp_path.parent)
    again = audit_file(f"{tmp_path.name}/{ODD_DIR}/model.onnx")
    assert again.path == f"{tmp_path.name}/{ODD_DIR}/model.onnx"
    assert [r["partialFingerprints"][FINGERPRINT_KEY] for r in document["runs"][0]["results"]] == [
        fingerprint(f, again.path) for f in again.findings
    ]


# Fingerprints of findings without a location -------------------------------------------------


def _note(message: str, code: str = "IA903") -> Finding:
    return Finding(code, Severity.INFO, message)


def test_unlocated_findings_differ_by_message_but_not_by_number():
    path = "models/a.onnx"
    one = _note("weights-only audit: 12 tensors not checked for scale (ln.weight, emb.weight)")
    # Counts, ratios, exponents, signs and negative numbers change; the note stays the same note.
    for changed in (
        "weights-only audit: 13 tensors not checked for scale (ln.weight, emb.weight)",
        "weights-only audit: 1,024 tensors not checked for scale (ln.weight, emb.weight)",
    ):
        assert _note(changed).fingerprint(path) == one.fingerprint(path)
    ratio = _note("variance 0.123x of He, 6 layers, eps 1e-05, shift -3.5")
    moved = _note("variance 4.5x of He, 60 layers, eps 2E-7, shift +12")
    assert moved.fingerprint(path) == ratio.fingerprint(path)
    # Two different notes in one model, or one note in two rules or two models, differ.
    other = _note("shape inference failed (boom); shapes come from weights only")
    assert len({one.fingerprint(path), other.fingerprint(path), ratio.fingerprint(path)}) == 3
    assert _note(one.message, "IA902").fingerprint(path) != one.fingerprint(path)
    assert one.fingerprint("models/b.onnx") != one.fingerprint(path)
    # A quoted name is an identity: its digits are kept.
    first = _note("graph output 'logits_1' does not depend on the input")
    second = _note("graph output 'logits_2' does not depend on the input")
    assert first.fingerprint(path) != second.fingerprint(path)
    assert _note("2 `Conv2` ops").fingerprint(path) != _note("2 `Conv3` ops").fingerprint(path)
    # Never the fingerprint every unlocated finding of a rule shared before (code|path|).
    shared = hashlib.sha256(f"IA903|{path}|".encode()).hexdigest()[:16]
    assert shared not in {one.fingerprint(path), other.fingerprint(path)}


def test_located_fingerprints_ignore_the_message():
    """A located finding is keyed by its tensor alone, byte for byte as before: a reworded or
    renumbered message keeps it, and the value is DESIGN.md's formula."""
    finding = Finding("IA103", Severity.WARNING, "variance 0.17x He", location="fc1.weight")
    again = replace(finding, message="variance 0.5x He; something else entirely")
    expected = hashlib.sha256(b"IA103|m.onnx|fc1.weight").hexdigest()[:16]
    assert finding.fingerprint("m.onnx") == again.fingerprint("m.onnx") == expected


def test_sarif_keeps_two_notes_of_one_model_apart(results):
    result = results[0]
    notes = [
        _note("opset 6 is older than 7; attribute defaults may be misread"),
        _note("2 sparse initializer(s) were not read"),
        _note("3 sparse initializer(s) were not read"),  # the same note as the last one
    ]
    run = sarif([replace(result, findings=notes)])["runs"][0]
    prints = [r["partialFingerprints"][FINGERPRINT_KEY] for r in run["results"]]
    assert prints[0] != prints[1] and prints[1] == prints[2]
    assert prints == [n.fingerprint(result.path) for n in notes]


# GitHub annotations ---------------------------------------------------------------------------

_COMMAND = re.compile(r"^::(?P<name>[a-z]+) (?P<props>[^:]*)::(?P<message>.*)$")


def unescape(text: str, prop: bool = False) -> str:
    """The toolkit's escapes undone, in the reverse order (%25 last)."""
    if prop:
        text = text.replace("%2C", ",").replace("%3A", ":")
    return text.replace("%0A", "\n").replace("%0D", "\r").replace("%25", "%")


def parse_commands(text: str) -> list[tuple[str, dict[str, str], str]]:
    assert text.endswith("\n") or not text
    parsed = []
    for line in text.splitlines():
        match = _COMMAND.match(line)
        assert match, line
        props = dict(p.split("=", 1) for p in match["props"].split(","))
        parsed.append(
            (match["name"], {k: unescape(v, prop=True) for k, v in props.items()}, unescape(match["message"]))
        )
    return parsed


def test_github_annotations_on_every_sample(results, weights_only):
    error = ModelError("gone.onnx", "no such file")
    commands = parse_commands(render_github([*results, weights_only, error]))
    expected = [(r, f) for r in [*results, weights_only] for f in r.findings]
    assert len(commands) == len(expected) + 1
    for (name, props, message), (result, finding) in zip(commands, expected, strict=False):
        assert name == COMMANDS[str(finding.severity)]
        assert props == {"file": result.path, "title": f"initaudit {finding.code}"}
        assert finding.message in message and finding.fix in message
    assert commands[-1] == (
        "error",
        {"file": "gone.onnx", "title": "initaudit: cannot audit"},
        "no such file",
    )


def test_github_escaping_round_trips(odd):
    text = render_github([odd])
    assert text.count("\n") == len(odd.findings)  # one physical line per finding: CR/LF escaped
    commands = parse_commands(text)
    (name, props, message), finding = next(
        (c, f) for c, f in zip(commands, odd.findings, strict=True) if f.location == ODD_NAME
    )
    assert name == "warning" and props["file"] == f"{ODD_DIR}/model.onnx"
    assert f"at: {ODD_NAME}" in message and finding.message in message
    # Known escapes, checked independently of the implementation.
    assert escape_property("a,b:c%d\ne\rf") == "a%2Cb%3Ac%25d%0Ae%0Df"
    assert escape_data("a,b:c%d\ne\rf") == "a,b:c%25d%0Ae%0Df"
    assert escape_data("%0A") == "%250A"  # a literal escape in the data survives


# JUnit ----------------------------------------------------------------------------------------


def test_junit_on_every_sample(results, weights_only):
    error = ModelError("gone.onnx", "no such file")
    for fail_on in ("error", "warning", "info"):
        root = ET.fromstring(render_junit([*results, weights_only, error], fail_on))
        suites = root.findall("testsuite")
        assert [s.get("name") for s in suites] == [r.path for r in [*results, weights_only]] + ["gone.onnx"]
        gate = Severity.parse(fail_on)
        for suite, result in zip(suites, [*results, weights_only], strict=False):
            cases = suite.findall("testcase")
            assert [c.get("name").split()[0] for c in cases] == [f"{p}xx" for p in FAMILIES]
            failing = {family(f.code) for f in result.findings if f.severity >= gate}
            failed = {c.get("name")[:3] for c in cases if c.find("failure") is not None}
            assert failed == failing
            assert int(suite.get("failures")) == len(failing) and int(suite.get("tests")) == len(FAMILIES)
            for case in cases:
                failure = case.find("failure")
                if failure is not None:
                    codes = {
                        f.code
                        for f in result.findings
                        if f.severity >= gate and f.code[:3] == case.get("name")[:3]
                    }
                    assert {
                        line.split()[0] for line in failure.text.splitlines() if not line.startswith(" ")
                    } == codes
            skipped = {c.get("name")[:3] for c in cases if c.find("skipped") is not None}
            assert "IA4" in skipped  # no --mc
            if result.weights_only:
                assert {"IA2", "IA3"} <= skipped
        assert int(root.get("failures")) == sum(int(s.get("failures")) for s in suites)
        assert int(root.get("tests")) == sum(int(s.get("tests")) for s in suites)
        assert root.get("errors") == "1"
        (case,) = suites[-1].findall("testcase")
        assert case.find("error").get("message") == "no such file"


def test_junit_escapes_what_xml_forbids(odd):
    root = ET.fromstring(render_junit([odd], "warning"))
    text = "".join(root.itertext())
    assert "fc1.w,eight:50%\nnext" in text and "\\x07<b>|`" in text  # BEL shown, not dropped


# Markdown -------------------------------------------------------------------------------------


def test_markdown_on_every_sample(results, weights_only):
    error = ModelError("gone.onnx", "no such | file")
    text = render_markdown([*results, weights_only, error])
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(results) + 2  # one verdict row per model, the failed load included
    for result, row in zip([*results, weights_only], rows, strict=False):
        assert row.startswith(f"| `{result.path}` |") and row.count(" | ") == 9
        assert row.endswith("❌ fail |" if result.fails(Severity.ERROR) else "✅ pass |")
    assert rows[-1].startswith("| `gone.onnx` |") and "no such \\| file" in rows[-1]
    findings = [line for line in text.splitlines() if re.match(r"^\| (❌|⚠️|ℹ️) ", line)]
    assert len(findings) == sum(len(r.findings) for r in [*results, weights_only])
    failed = sum(r.fails(Severity.ERROR) for r in [*results, weights_only])
    assert f"{failed} of {len(results) + 1} audited model(s) fail" in text.splitlines()[0]


def test_markdown_table_cells_escape_odd_names(odd):
    text = render_markdown([odd])
    (row,) = [line for line in text.splitlines() if "fc1.w,eight" in line and line.startswith("| ⚠️")]
    # A table row stays one line and its cell count is unchanged: pipes are escaped.
    assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", "| a | b | c | d | e |"))
    assert "<b>" not in row.split("|")[-2]  # no raw HTML outside code spans
    assert "\x07" not in text and "\\x07" in row  # the control character shown, not hidden


@pytest.mark.parametrize("limit", [1_000_000, 20_000, 600, 50])
def test_markdown_stays_under_the_cap(results, limit):
    # 400 copies of deep_tanh_xavier (31 findings each): about 2.5 MB in full, over GitHub's 1 MiB.
    many = [replace(results[2], path=f"models/copy{i}.onnx") for i in range(400)]
    total_findings = sum(len(r.findings) for r in many)
    full = render_markdown(many, limit=10**9)
    assert len(full.encode("utf-8")) > 1_048_576
    text = render_markdown(many, limit=limit)
    assert len(text.encode("utf-8")) <= limit
    if limit >= 600:
        last = text.splitlines()[-1]
        match = re.search(r"(\d+) finding row\(s\) and (\d+) model row\(s\) not shown", last)
        assert match, last
        shown_findings = sum(1 for line in text.splitlines() if re.match(r"^\| (❌|⚠️|ℹ️) ", line))
        shown_models = sum(1 for line in text.splitlines() if line.startswith("| `models/copy"))
        assert shown_findings + int(match[1]) == total_findings
        assert shown_models + int(match[2]) == len(many)
        assert full.startswith(text[: text.rindex("\n\n*initaudit: cut")])  # a prefix, cut at a line


def test_baseline_suppressions_are_reported(results):
    accepted = replace(results[1], findings=results[1].findings[1:], suppressed=1)
    assert json.loads(render_json([accepted]))["reports"][0]["suppressed"] == 1
    assert "1 finding(s) accepted by the baseline" in render_markdown([accepted]).splitlines()[0]
    suite = ET.fromstring(render_junit([accepted])).find("testsuite")
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["suppressed"] == "1"
    validate_report(json.loads(render_json([accepted])))


def test_markdown_under_the_cap_is_not_cut(results):
    text = render_markdown(results)
    assert "cut to stay under" not in text
    assert render_markdown(results, limit=len(text.encode("utf-8"))) == text


def test_every_rule_family_is_named():
    assert {family(code) for code in RULES} <= set(FAMILIES)


def test_machine_formats_never_import_rich_or_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import initaudit.report.sarif, initaudit.report.github, initaudit.report.junit\n"
        "import initaudit.report.markdown, initaudit.report.json_report\n"
        "print(sorted(m for m in ('rich', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
