"""Pictures: the console's signal strip and `--plot FILE.png|.svg|.html`."""

from __future__ import annotations

import io
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from initaudit import atomic
from initaudit.audit import audit_graph
from initaudit.errors import LoadError, UsageError
from initaudit.predict import build_graph
from initaudit.report.console import STRIP_COLUMNS, fmt, render_console, signal_strip
from initaudit.report.plot import render_plot, signal_series
from initaudit.stats import TensorStats

_LEVELS = "▁▂▃▄▅▆▇█"
_PINK = np.array([0xCC, 0x79, 0xA7]) / 255  # the measured-mean markers
_BLUE = np.array([0x00, 0x72, 0xB2]) / 255  # the predicted lines


@pytest.fixture(scope="module")
def measured():
    """A plain He net with Monte Carlo (the shortcut engine: Gaussian resampling of a chain)."""
    pytest.importorskip("torch")
    from initaudit.montecarlo.measure import MCOptions

    result = audit_graph(build_graph([32] * 12), mc=MCOptions(samples=400, device="cpu", seed=1))
    assert result.prediction.measured is not None
    return result


def strip_rows(result, columns: int = STRIP_COLUMNS) -> dict[str, str]:
    """{label: cells} of each strip line."""
    text = signal_strip(result, columns)
    assert text is not None
    rows = {}
    for line in text.plain.splitlines()[1:]:
        label, cells, ends = re.fullmatch(r"\s+(\S.*?)\s{2,}(\S+)\s{2}(.*)", line).groups()
        rows[label] = (cells, ends)
    return rows


# The console strip ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [3, 17, 40, 41, 200])
def test_strip_has_a_fixed_width_at_any_depth(depth):
    rows = strip_rows(audit_graph(build_graph([64] * depth)))
    assert set(rows) == {"E[M]/M0", "median"}
    for cells, _ in rows.values():
        assert len(cells) == STRIP_COLUMNS and set(cells) <= set(_LEVELS)


def test_strip_of_a_vanishing_net_falls_and_names_its_ends():
    result = audit_graph(build_graph([64] * 30, init="xavier"))
    rows = strip_rows(result)
    cells, ends = rows["E[M]/M0"]
    levels = [_LEVELS.index(c) for c in cells]
    assert levels == sorted(levels, reverse=True) and levels[0] == 7 and levels[-1] == 0
    # E[M_j]/M_0 = 2^-j: the legend gives the first and last taps' values.
    assert ends == f"{fmt(0.5)} → {fmt(2.0**-30)}"
    header = signal_strip(result).plain.splitlines()[0]
    assert "30 taps" in header and f"{math.log10(2.0**-30):.2g}" in header


def test_strip_of_a_he_net_keeps_the_mean_and_drops_the_median():
    rows = strip_rows(audit_graph(build_graph([32] * 20)))
    mean, _ = rows["E[M]/M0"]
    median, ends = rows["median"]
    levels = [_LEVELS.index(c) for c in median]
    assert len(set(mean)) == 1 and _LEVELS.index(mean[0]) >= levels[0]  # E[M_j] = M_0 everywhere
    assert levels == sorted(levels, reverse=True) and levels[0] - levels[-1] >= 4
    assert ends.endswith(fmt(0.19965429761882555))  # THEORY's median 0.1998 at L = 20, n = 32


def test_strip_shows_a_dead_signal():
    graph = build_graph([16] * 6)
    weight = graph["fc3"].weight
    graph["fc3"].weight = TensorStats(
        name=weight.name, shape=weight.shape, dtype="float32", count=weight.count, mean=0.0, std=0.0,
        second_moment=0.0, kurtosis=math.nan, absmax=0.0, nonfinite=0, zeros=weight.count,
    )  # fmt: skip
    cells, ends = strip_rows(audit_graph(graph))["E[M]/M0"]
    assert cells.endswith("×" * (STRIP_COLUMNS // 2)) and ends.endswith("→ 0")


def test_strip_with_monte_carlo(measured):
    rows = strip_rows(measured)
    assert set(rows) == {"E[M]/M0", "median", "MC E[M]", "MC median"}
    series = signal_series(measured)
    assert rows["MC median"][1] == f"{fmt(series.measured_median[0])} → {fmt(series.measured_median[-1])}"


def test_console_report_shows_the_strip_unless_quiet():
    result = audit_graph(build_graph([64] * 10))
    for quiet, shown in ((False, True), (True, False)):
        console = Console(record=True, width=140, file=io.StringIO())
        render_console(result, console, quiet=quiet)
        assert ("Signal log10 M_j/M_0 over 10 taps" in console.export_text()) is shown


# Plots ---------------------------------------------------------------------------------------


def decoded(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def near(image: np.ndarray, colour: np.ndarray) -> int:
    return int(np.sum(np.all(np.abs(image[..., :3] - colour) < 0.02, axis=-1)))


def test_png_is_a_real_image(tmp_path, measured):
    pytest.importorskip("matplotlib")
    plain = tmp_path / "plain.png"
    render_plot(audit_graph(build_graph([64] * 30, init="xavier")), plain)
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = decoded(plain)
    assert image.shape[:2] == (460, 900)
    assert float(image[..., :3].var()) > 1e-3
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 20
    assert near(image, _BLUE) > 200 and near(image, _PINK) == 0
    with_mc = tmp_path / "mc.png"
    render_plot(measured, with_mc)
    assert near(decoded(with_mc), _PINK) > 20  # the measured points are drawn


def test_svg_parses_and_stacks_models(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.svg"
    results = [
        audit_graph(build_graph([64] * 5)),
        audit_graph(build_graph([64], residual=20, eta="1/sqrt(L)")),
    ]
    render_plot(results, path)
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    text = path.read_text()
    assert "FM1 pass, FM2 pass" in text and "residual stream (20 joins)" in text


def test_html_is_self_contained_without_matplotlib(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails
    path = tmp_path / "plot.html"
    result = audit_graph(build_graph([64], residual=12, eta=0.2))
    render_plot(result, path)
    page = path.read_text()
    assert (
        page.startswith("<!DOCTYPE html>")
        and "<script" not in page
        and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    (svg_text,) = re.findall(r"<svg.*?</svg>", page, re.S)
    svg = ET.fromstring(svg_text)
    ns = "{http://www.w3.org/2000/svg}"
    # The predicted mean: one polyline through all 12 joins, each marked as a residual join.
    lines = [e for e in svg.iter(f"{ns}polyline") if "stroke-dasharray" not in e.attrib]
    assert len(lines[0].get("points").split()) == 12
    joins = [e for e in svg.iter(f"{ns}rect") if "(residual join)" in "".join(e.itertext())]
    assert len(joins) == 12
    assert html_escape_free(result.path) in page and "FM1" in page
    with pytest.raises(UsageError, match=r"pip install 'initaudit\[plot\]'"):
        render_plot(result, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


def html_escape_free(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_html_with_monte_carlo_has_a_band(tmp_path, measured):
    path = tmp_path / "mc.html"
    render_plot(measured, path)
    page = path.read_text()
    assert "<polygon" in page and "measured median" in page and "measured E[M]/M0" in page


def test_not_computed_is_said_in_the_plot(tmp_path):
    graph = build_graph([8] * 3)
    graph.meta["audit"] = "weights-only"
    result = audit_graph(graph)
    path = tmp_path / "none.html"
    render_plot(result, path)
    assert "not computed" in path.read_text()


@pytest.mark.parametrize("name", ["plot.jpg", "plot", "plot.pdf"])
def test_unsupported_suffix(tmp_path, name):
    with pytest.raises(UsageError, match="unsupported format"):
        render_plot(audit_graph(build_graph([8] * 3)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        render_plot(audit_graph(build_graph([8] * 3)), tmp_path / "nowhere" / "plot.html")


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_writes_are_atomic(tmp_path, monkeypatch, fail):
    path = tmp_path / "plot.html"
    path.write_text("old plot")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, fail, broken)
    with pytest.raises(LoadError, match="no space left"):
        render_plot(audit_graph(build_graph([8] * 3)), path)
    assert path.read_text() == "old plot"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.html"]  # no temporary file left behind


def test_interrupted_render_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "plot.html"
    path.write_text("old plot")
    real = atomic._Sink.write

    def interrupted(self, data):  # a write gets halfway, then Ctrl-C
        real(self, bytes(data[:10]))
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic._Sink, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_plot(audit_graph(build_graph([8] * 3)), path)
    assert path.read_text() == "old plot"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.html"]


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "plot.html"
        render_plot(audit_graph(build_graph([8] * 3)), path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
