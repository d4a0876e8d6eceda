"""Fresh random networks from a model's own tensors: the four ``--resample`` schemes.

Every scheme maps ``{state-dict key -> tensor}`` to ``{key -> (samples, *shape) tensor}``:

- ``gaussian``: each tensor drawn i.i.d. from ``N(m, s^2)`` with its own moments. The mean is
  kept only where it is real: ``m`` is the tensor's mean when ``|mean| > 4 std / sqrt(count)``
  and 0 otherwise (the He/Xavier/LeCun/PyTorch-default laws are zero-mean; their empirical
  mean is noise of order std/sqrt(count)). ``s^2 = E[(w - m)^2]``: with the mean dropped that
  is the second moment E[w^2], the number a layer's gain depends on, so the analytic
  prediction (which reads E[w^2]) describes the resampled networks exactly. This is the rule
  the dense-chain shortcut uses, so both engines sample the same law.
- ``bootstrap``: each sample is the tensor's own entries in a random order with independent
  random signs: exactly its empirical law, symmetrized. A tensor with a real mean (the rule
  above) is permuted without sign flips, so its mean survives: the multiset of entries is kept.
- ``scheme``: drawn from the init law :func:`initaudit.stats.match_scheme` recognizes (He,
  Xavier, LeCun, PyTorch default, normal/uniform/trunc_normal of a given std), zero-mean, at
  the layer's fan-in. A name without its law (``"he"``: too few entries to tell normal from
  uniform) is drawn normal, except PyTorch's default, which is always uniform. An
  unrecognized tensor falls back to ``gaussian``.
- ``inputs``: the tensors as they are (expanded, no copy); only the input is random, and the
  caller draws it.

In every scheme a tensor is kept as it is (expanded over the sample dimension, no copy) when
it is constant (std 0: a norm gamma of ones, a zero bias, a scalar gate), not floating point
(``num_batches_tracked``), non-finite anywhere, a BatchNorm running statistic, or named in
``keep`` (buffers and lifted constants: positional tables, masks, rotary caches).

Random numbers are drawn on the generator's device in float32 (float64 for float64 tensors),
then cast and moved to each tensor's dtype and device.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

import torch

from initaudit.stats import init_schemes, match_scheme, tensor_stats

SCHEMES = ("gaussian", "bootstrap", "scheme", "inputs")

#: A mean counts as real beyond this many standard errors (shared with the shortcut).
MEAN_SIGMAS = 4.0

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
_STD_IN_NAME = re.compile(r"std=([0-9.eE+-]+)")


@dataclass(frozen=True)
class Law:
    """How one tensor is redrawn: ``kind`` is keep, normal, uniform, trunc_normal or bootstrap.

    ``mean`` and ``std`` parametrize normal/uniform/trunc_normal (``bound`` is the absolute
    truncation of trunc_normal); for bootstrap ``signs`` says whether entries get random signs.
    ``label`` says where the law came from, for reports (``"he_normal"``, ``"own moments"``).
    """

    kind: str
    mean: float = 0.0
    std: float = 0.0
    bound: float = 2.0
    signs: bool = True
    label: str = ""


def torch_fans(shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """Fan-in and fan-out under PyTorch's layout (out, in, *kernel); (None, None) below 2-D."""
    if len(shape) < 2:
        return None, None
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def resample_laws(
    params: dict[str, torch.Tensor],
    scheme: str,
    schemes: dict[str, str] | None = None,
    fan_in: dict[str, int] | None = None,
    *,
    keep: Collection[str] = (),
) -> dict[str, Law]:
    """The law each tensor is drawn from under ``scheme`` (see the module docstring).

    Computed once per model and passed to :func:`resample` as ``laws`` when sampling in
    chunks, so the tensor statistics are not recomputed every chunk. ``schemes`` overrides
    the recognized init scheme per key; ``fan_in`` gives a key's fan-in (else PyTorch's
    layout is assumed for 2-D and larger tensors, and a ``.bias`` takes its ``.weight``'s).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    return {
        key: _law(key, tensor, scheme, params, schemes or {}, fan_in or {}, keep)
        for key, tensor in params.items()
    }


def resample(
    params: dict[str, torch.Tensor],
    scheme: str,
    samples: int,
    generator: torch.Generator,
    schemes: dict[str, str] | None = None,
    fan_in: dict[str, int] | None = None,
    *,
    keep: Collection[str] = (),
    laws: dict[str, Law] | None = None,
) -> dict[str, torch.Tensor]:
    """``samples`` fresh draws of every tensor: each value has shape (samples, *original shape),
    with the original's dtype and device. Kept tensors are expanded views (no memory)."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if laws is None:
        laws = resample_laws(params, scheme, schemes, fan_in, keep=keep)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in params.items():
        law = laws.get(key, Law("keep"))
        if law.kind == "keep":
            out[key] = tensor.detach().unsqueeze(0).expand(samples, *tensor.shape)
        else:
            out[key] = _draw(tensor.detach(), law, samples, generator)
    return out


# --------------------------------------------------------------------------- laws


def _law(
    key: str,
    tensor: torch.Tensor,
    scheme: str,
    params: dict[str, torch.Tensor],
    schemes: dict[str, str],
    fan_in: dict[str, int],
    keep: Collection[str],
) -> Law:
    if scheme == "inputs" or key in keep or key.rsplit(".", 1)[-1] in _RUNNING:
        return Law("keep", label="kept")
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return Law("keep", label="kept")
    array = tensor.detach().cpu()
    stats = tensor_stats(key, (array.float() if array.dtype == torch.bfloat16 else array).numpy())
    if not stats.finite or stats.std == 0:
        return Law("keep", label="constant" if stats.finite else "non-finite")
    mean = stats.mean if abs(stats.mean) > MEAN_SIGMAS * stats.std / math.sqrt(stats.count) else 0.0
    spread = math.sqrt(max(stats.second_moment - 2 * mean * stats.mean + mean * mean, 0.0))
    if scheme == "gaussian":
        return Law("normal", mean=mean, std=spread, label="own moments")
    if scheme == "bootstrap":
        return Law("bootstrap", signs=mean == 0.0, label="own entries")
    fin, fout = _fans(key, tuple(tensor.shape), params, fan_in)
    name = schemes.get(key) or match_scheme(stats, fin, fout)
    law = _scheme_law(name, stats.std, fin, fout)
    return law if law is not None else Law("normal", mean=mean, std=spread, label=f"{name}: own moments")


def _fans(
    key: str, shape: tuple[int, ...], params: dict[str, torch.Tensor], fan_in: dict[str, int]
) -> tuple[int | None, int | None]:
    fin, fout = torch_fans(shape)
    if key in fan_in:
        return fan_in[key], fout
    if fin is None and key.endswith(".bias"):
        sibling = key[: -len("bias")] + "weight"
        if sibling in fan_in:
            return fan_in[sibling], None
        if sibling in params:
            return torch_fans(tuple(params[sibling].shape))
    return fin, fout


def _scheme_law(name: str, std: float, fin: int | None, fout: int | None) -> Law | None:
    """The zero-mean law behind a :func:`match_scheme` name, or None when there is none."""
    if name in ("constant", "zeros", "empty", "non-finite"):
        return Law("keep", label=name)
    found = _STD_IN_NAME.search(name)
    if found is not None:
        value = float(found.group(1))
        if name.startswith("trunc_normal"):
            return Law("trunc_normal", std=value, bound=2.0, label=name)
        return Law("uniform" if name.startswith("uniform") else "normal", std=value, label=name)
    if not fin:
        return None
    candidates = [s for s in init_schemes(fin, fout) if s.name == name or s.name.split("_")[0] == name]
    if not candidates:
        return None
    best = min(candidates, key=lambda s: abs(std / s.std - 1))
    uniform = best.name == "pytorch_default" or (best.name == name and best.kurtosis < 2.5)
    return Law("uniform" if uniform else "normal", std=best.std, label=best.name)


# --------------------------------------------------------------------------- draws


def _draw(tensor: torch.Tensor, law: Law, samples: int, generator: torch.Generator) -> torch.Tensor:
    device = generator.device
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    shape = (samples, *tensor.shape)
    if law.kind == "normal":
        values = torch.empty(shape, device=device, dtype=work).normal_(law.mean, law.std, generator=generator)
    elif law.kind == "uniform":
        half_width = law.std * math.sqrt(3.0)
        values = torch.empty(shape, device=device, dtype=work)
        values.uniform_(law.mean - half_width, law.mean + half_width, generator=generator)
    elif law.kind == "trunc_normal":
        values = torch.empty(shape, device=device, dtype=work)
        torch.nn.init.trunc_normal_(values, law.mean, law.std, -law.bound, law.bound, generator=generator)
    elif law.kind == "bootstrap":
        values = _bootstrap(tensor.to(device=device, dtype=work), samples, law.signs, generator)
    else:
        raise ValueError(f"unknown law {law.kind!r}")
    return values.to(device=tensor.device, dtype=tensor.dtype)


def _bootstrap(tensor: torch.Tensor, samples: int, signs: bool, generator: torch.Generator) -> torch.Tensor:
    """Per sample: the entries in a uniformly random order (argsort of i.i.d. uniforms), each
    with an independent random sign when ``signs``."""
    flat = tensor.reshape(-1)
    order = torch.rand((samples, flat.numel()), generator=generator, device=flat.device).argsort(dim=1)
    values = flat[order]
    if signs:
        flips = torch.randint(0, 2, values.shape, generator=generator, device=flat.device, dtype=torch.int8)
        values = torch.where(flips.bool(), values, -values)
    return values.reshape(samples, *tensor.shape)


def describe(laws: dict[str, Law]) -> dict[str, str]:
    """One line per key: the law it is drawn from (for reports)."""
    lines: dict[str, str] = {}
    for key, law in laws.items():
        if law.kind in ("normal", "uniform", "trunc_normal"):
            mean = f"{law.mean:.3g} + " if law.mean else ""
            lines[key] = f"{law.kind}({mean}std={law.std:.3g}) [{law.label}]"
        elif law.kind == "bootstrap":
            lines[key] = "own entries permuted" + (", random signs" if law.signs else "")
        else:
            lines[key] = f"kept ({law.label or 'as is'})"
    return lines


__all__ = ["MEAN_SIGMAS", "SCHEMES", "Law", "describe", "resample", "resample_laws", "torch_fans"]
