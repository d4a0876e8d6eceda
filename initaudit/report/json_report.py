"""The JSON report: every number of the console report, as plain text (never via rich).

The schema is versioned by ``SCHEMA``; docs/json-schema.md documents each field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from initaudit import __version__
from initaudit.audit import AuditResult
from initaudit.graph import Layer
from initaudit.report.model_error import ModelError
from initaudit.rules import RULES
from initaudit.theory.propagate import LayerPrediction

SCHEMA = "initaudit.report/1"


def _number(x: float) -> float | str | None:
    """JSON has no inf/nan: write them as strings so consumers see them, not a parse error."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as the string the report uses for it."""
    return _clean(value)


def _public(key: str) -> bool:
    """Meta keys the report shows: not the audit kind and skipped list (their own fields) and
    not private objects (a leading underscore: the traced program)."""
    return key not in ("audit", "skipped") and not key.startswith("_")


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON data all the way down (meta may hold richer objects)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _weight(layer: Layer, schemes: dict[str, str], right: float | None) -> dict[str, Any] | None:
    w = layer.weight
    if w is None:
        return None
    return {
        "name": w.name,
        "shape": list(w.shape),
        "dtype": w.dtype,
        "std": w.std,
        "mean": w.mean,
        "kurtosis": w.kurtosis,
        "nonfinite": w.nonfinite,
        "zeros": w.zeros,
        "scheme": schemes.get(w.name, "unrecognized"),
        "std_vs_right": right,
    }


def layer_rows(result: AuditResult) -> list[tuple[Layer, LayerPrediction | None, float | None]]:
    """Each layer with its prediction and its weight std relative to the right init; the
    prediction is None throughout when nothing was propagated (a weights-only audit)."""
    from initaudit.rules import right_variance

    rows: list[tuple[Layer, LayerPrediction | None, float | None]] = []
    predictions: list[LayerPrediction | None] = list(result.prediction.layers)
    if not predictions:
        return [(layer, None, None) for layer in result.graph]
    for layer, pred in zip(result.graph, predictions, strict=True):
        ratio = None
        if layer.weight is not None and layer.fan_in:
            right = right_variance(result.graph, layer)
            if right is not None:
                ratio = layer.weight.rms / math.sqrt(right / layer.fan_in)
        rows.append((layer, pred, ratio))
    return rows


def tensor_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The per-tensor table of a weights-only audit (empty for a full audit): each weight
    against He (2/fan-in) and LeCun (1/fan-in), the schemes its fan-in implies."""
    from initaudit.rules import scale_rows

    if not result.weights_only:
        return []
    return [
        {
            "name": row.weight.name,
            "layer": row.layer.name,
            "kind": row.layer.kind.value,
            "shape": list(row.weight.shape),
            "dtype": row.weight.dtype,
            "fan_in": row.fan_in,
            "fan_out": row.layer.fan_out,
            "std": row.weight.std,
            "mean": row.weight.mean,
            "kurtosis": row.weight.kurtosis,
            "nonfinite": row.weight.nonfinite,
            "zeros": row.weight.zeros,
            "scheme": row.scheme,
            "variance_vs_he": row.vs_he,
            "variance_vs_lecun": row.vs_lecun,
            "status": row.status,
            "multiplier_he": row.to_he if row.status == "off" else None,
            "bias": row.layer.bias.name if row.layer.bias is not None else None,
            "bias_std": row.layer.bias.std if row.layer.bias is not None else None,
        }
        for row in scale_rows(result.graph)
    ]


def skipped_rows(result: AuditResult) -> list[dict[str, Any]]:
    """Tensors a weights-only audit did not check for scale, with the reason."""
    rows = result.graph.meta.get("skipped", []) if result.weights_only else []
    return [row for row in rows if isinstance(row, dict)]


def report_dict(result: AuditResult, fail_on: str = "error") -> dict[str, Any]:
    graph, s = result.graph, result.prediction.summary
    schemes = result.schemes()
    layers = [
        {
            "name": layer.name,
            "kind": layer.kind.value,
            "op": layer.op,
            "inputs": layer.inputs,
            "width": pred.width,
            "fan_in": layer.fan_in,
            "activation": layer.activation,
            "weight": _weight(layer, schemes, ratio),
            "bias_std": layer.bias.std if layer.bias is not None else None,
            "mean": pred.mean,
            "spread": pred.spread,
            "log_mean": pred.log_mean,
            "log_var": pred.log_var,
            "median": pred.median,
            "tap": pred.tap,
            "segment": pred.segment,
            "measured": measured_row(result, layer.name),
        }
        for layer, pred, ratio in layer_rows(result)
        if pred is not None
    ]
    return _clean(
        {
            "path": result.path,
            "format": graph.format,
            "audit": result.audit_kind,
            "meta": {k: v for k, v in graph.meta.items() if _public(k) and _plain(v)},
            "notes": graph.notes,
            "verdicts": {"fm1": result.verdict("fm1"), "fm2": result.verdict("fm2")},
            "verdict_reason": result.not_computed_reason,
            "summary": {
                "depth": s.depth,
                "mean_ratio": s.mean_ratio,
                "worst_ratio": s.worst_ratio,
                "worst_layer": s.worst_layer,
                "beta": s.beta,
                "second_ratio": s.second_ratio,
                "median": s.median,
                "log_mean": s.log_mean,
                "log_var": s.log_var,
                "var_hat": s.var_hat,
                "sum_eta2": s.sum_eta2,
                "residual": s.residual,
                "additive": s.additive,
                "normalized": s.normalized,
                "unmodeled": s.unmodeled,
            },
            "layers": layers,
            "monte_carlo": monte_carlo(result),
            "tensors": tensor_rows(result),
            "skipped": skipped_rows(result),
            "residual_blocks": [
                {
                    "add": b.add,
                    "fork": b.fork,
                    "branch_length": b.branch_length,
                    "eta": b.eta,
                    "gate": b.gate,
                    "folded": b.folded,
                    "gain": b.gain,
                    "factor": b.factor,
                    "terminal": b.terminal,
                    "normalized": b.normalized,
                    "last_weight": b.last_weight,
                }
                for b in result.prediction.blocks
            ],
            "findings": [
                {
                    "code": f.code,
                    "name": RULES[f.code].name,
                    "severity": str(f.severity),
                    "message": f.message,
                    "location": f.location,
                    "fix": f.fix,
                    "evidence": f.evidence,
                    "fingerprint": f.fingerprint(result.path),
                }
                for f in result.findings
            ],
            "counts": result.counts(),
            "suppressed": result.suppressed,
            "fail_on": fail_on,
        }
    )


_ESTIMATE_FIELDS = (
    "mean", "mean_se", "median", "median_se", "log_mean", "log_mean_se", "log_var", "log_var_se",
    "second", "second_se",
)  # fmt: skip


def measured_row(result: AuditResult, name: str) -> dict[str, Any] | None:
    """A layer's Monte Carlo estimates, each with its standard error (None without --mc)."""
    measured = result.prediction.measured
    estimate = measured.taps.get(name) if measured is not None else None
    if estimate is None:
        return None
    return {key: getattr(estimate, key) for key in _ESTIMATE_FIELDS}


def monte_carlo(result: AuditResult) -> dict[str, Any] | None:
    measured = result.prediction.measured
    if measured is None:
        return None
    curvature = measured.curvature
    return {
        "samples": measured.samples,
        "resample": measured.resample,
        "device": measured.device,
        "engine": measured.engine,
        "seconds": measured.seconds,
        "samples_per_second": measured.samples_per_second,
        "var_hat": measured.var_hat[0],
        "var_hat_se": measured.var_hat[1],
        "notes": measured.notes,
        "curvature": curvature.as_dict() if curvature is not None and hasattr(curvature, "as_dict") else None,
    }


def render_json(results: Sequence[AuditResult | ModelError], fail_on: str = "error") -> str:
    """The document: one ``reports`` entry per audited model and one ``errors`` entry per
    model that could not be audited (:class:`~initaudit.report.model_error.ModelError`)."""
    document = {
        "schema": SCHEMA,
        "version": __version__,
        "reports": [report_dict(r, fail_on) for r in results if isinstance(r, AuditResult)],
        "errors": [{"path": e.path, "message": e.message} for e in results if isinstance(e, ModelError)],
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the document ``render_json`` writes, shipped with
    the package as ``initaudit/report/schema.json``."""
    from importlib.resources import files

    return json.loads(files("initaudit.report").joinpath("schema.json").read_text(encoding="utf-8"))
