"""Transfer rules: how each layer kind moves the signal state (THEORY.md sections 2-4).

One function per :class:`~initaudit.graph.Kind`, in the spirit of neural-tangents' stax
layers: adding a layer kind is adding a function to :data:`RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from initaudit.graph import Kind, Layer
from initaudit.stats import TensorStats
from initaudit.theory.activations import get_activation
from initaudit.theory.special import log_gamma_matched, log_relu_average
from initaudit.theory.state import Law, SignalState

if TYPE_CHECKING:
    from initaudit.graph import ResidualBlock


class Context(Protocol):
    """What a rule may ask of the interpreter beyond its own inputs."""

    def residual_block(self, add: str) -> ResidualBlock | None: ...

    def branch_slope(self, block: ResidualBlock) -> tuple[float, float]: ...


Rule = Callable[[Layer, list[SignalState], Context], SignalState]


def _add_log(a: tuple[float, float, float], b: tuple[float, float, float]) -> tuple[float, float, float]:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _materialized(x: SignalState) -> SignalState:
    """The same state with any pending chi^2 noise folded into its log-cumulants."""
    return replace(x, log=x.log_length, fresh=False) if x.fresh else x


def linear(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """Dense or conv: z = W x + b with i.i.d. symmetric weights (exact second moments).

    With K = fan-in, weight variance v and kurtosis kappa, bias variance v_b: given x,
    the z_k are independent with E[z^2|x] = v||x||^2 + v_b and
    E[z^4|x] = v^2 (3||x||^4 + (kappa-3) sum x_i^4) + 6 v v_b ||x||^2 + E b^4.
    """
    x = inputs[0]
    weight, bias = layer.weight, layer.bias
    fan_in = layer.fan_in or x.width
    if weight is None or not weight.finite:
        return _materialized(x)
    v = weight.second_moment
    kappa = weight.kurtosis if math.isfinite(weight.kurtosis) else 3.0
    vb = bias.second_moment if bias is not None and bias.finite else 0.0
    kb = bias.kurtosis if bias is not None and math.isfinite(bias.kurtosis) else 3.0
    p2 = fan_in * x.m2  # E sum x_i^2 over a receptive field
    p4 = fan_in * x.m4 + fan_in * (fan_in - 1) * x.c22  # E (sum x_i^2)^2
    q4 = fan_in * x.m4  # E sum x_i^4
    m2 = v * p2 + vb
    c22 = v * v * p4 + 2 * v * vb * p2 + vb * vb
    m4 = v * v * (3 * p4 + (kappa - 3) * q4) + 6 * v * vb * p2 + kb * vb * vb
    # ln S = ln(sigma^2 M_x + v_b): exact shift without bias, first-order delta method with it.
    k1, k2, k3 = x.log_length
    gain = v * fan_in
    if gain <= 0:
        log = (math.log(vb) if vb > 0 else -math.inf, 0.0, 0.0)
    elif vb == 0:
        log = (k1 + math.log(gain), k2, k3)
    else:
        q = math.exp(k1)
        rho = gain * q / (gain * q + vb)
        log = (math.log(gain * q + vb), rho**2 * k2, rho**3 * k3)
    mu = _significant_mean(bias)
    width = layer.width or x.width
    law = Law(mean=mu, variance=max(m2 - mu * mu, 0.0))
    return SignalState(width=width, mu=mu, m2=m2, m4=m4, c22=c22, log=log, fresh=True, law=law)


#: A bias mean within this many standard errors of zero is the noise of a zero-mean draw.
MEAN_SIGMAS = 4.0


def _significant_mean(bias: TensorStats | None) -> float:
    """The bias's mean when it is a real shift (a constant or deliberately offset bias), else 0:
    the sample mean of a zero-mean init (PyTorch's uniform default) is noise, not a shift, and
    Monte Carlo draws it as zero-mean too."""
    if bias is None or not bias.finite or not bias.count:
        return 0.0
    if bias.std == 0 or abs(bias.mean) > MEAN_SIGMAS * bias.std / math.sqrt(bias.count):
        return bias.mean
    return 0.0


def activation(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """phi applied entrywise. Exact for homogeneous phi on a symmetric input; otherwise
    Gauss–Hermite quadrature at the actual pre-activation variance (mean field), with the
    scale's fluctuation carried to first order through d E[phi^2] / d q."""
    x = inputs[0]
    name = layer.activation or "identity"
    act = get_activation(name, **layer.attrs)
    variance = max(x.m2 - x.mu * x.mu, 0.0)
    symmetric = abs(x.mu) <= 1e-9 * math.sqrt(max(x.m2, 1e-300))
    law = Law(name, layer.attrs.get("alpha"), x.mu, variance)
    if x.m2 <= 0:
        return replace(x, law=law, fresh=False)
    if act.homogeneous is not None and symmetric:
        a1, a2, a4 = act.homogeneous
        mu = a1 * math.sqrt(2 * x.m2 / math.pi)
        m2, m4, c22 = a2 * x.m2, a4 * x.m4, a2 * a2 * x.c22
        shift = (math.log(a2), 0.0, 0.0)
        if x.fresh:
            # M_out = S * (1/n) sum phi(g_k)^2 with g standard normal, independent of S.
            if name == "relu":
                shift = log_relu_average(x.width)
            else:
                excess = 3 * a4 / (a2 * a2) - 1
                shift = _add_log(shift, log_gamma_matched(excess / x.width))
        log = _add_log(x.log, shift)
    else:
        e1, e2, e4 = act.moments(variance, x.mu)
        h = 1e-3 * variance
        slope = (act.second_moment(variance + h, x.mu) - act.second_moment(variance - h, x.mu)) / (2 * h)
        scale_var = max(x.c22 - x.m2 * x.m2, 0.0)
        mu, m2, m4 = e1, e2, e4
        c22 = e2 * e2 + slope * slope * scale_var
        gamma = slope * variance / e2 if e2 > 0 else 0.0  # d ln E[phi^2] / d ln q
        k1, k2, k3 = x.log
        log = (math.log(e2) - gamma * (math.log(max(x.m2, 1e-300)) - k1), gamma**2 * k2, gamma**3 * k3)
        if x.fresh and e2 > 0:
            log = _add_log(log, log_gamma_matched(max(e4 / (e2 * e2) - 1, 0.0) / x.width))
    return SignalState(width=x.width, mu=mu, m2=m2, m4=m4, c22=c22, log=log, fresh=False, law=law)


def norm(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """Batch/layer/instance/group norm as training uses it: the per-unit second moment
    becomes gamma^2 + beta^2 whatever came in, so the length and its spread reset."""
    x = _materialized(inputs[0])
    gamma, beta = layer.attrs.get("gamma"), layer.attrs.get("beta")
    g2 = gamma.second_moment if gamma is not None else 1.0
    g4 = g2 * g2 * (gamma.kurtosis if gamma is not None and math.isfinite(gamma.kurtosis) else 1.0)
    b2 = beta.second_moment if beta is not None else 0.0
    b4 = b2 * b2 * (beta.kurtosis if beta is not None and math.isfinite(beta.kurtosis) else 1.0)
    mu = beta.mean if beta is not None else 0.0
    kurt_in = x.m4 / (x.m2 * x.m2) if x.m2 > 0 else 3.0
    m2 = g2 + b2
    m4 = g4 * kurt_in + 6 * g2 * b2 + b4
    log = (math.log(m2), 0.0, 0.0) if m2 > 0 else (-math.inf, 0.0, 0.0)
    law = Law(mean=mu, variance=g2)
    return SignalState(width=x.width, mu=mu, m2=m2, m4=m4, c22=m2 * m2, log=log, law=law)


def scale(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """Multiplication by a constant (a branch scale eta, LayerScale): exact for a scalar."""
    return inputs[0].scaled(float(layer.attrs.get("value", 1.0)))


def passthrough(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """Shape-only ops, and ops the theory does not model (the stated assumption)."""
    return inputs[0]


def pool(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """Average pools shrink the fluctuating part by the window (positions taken as
    independent); max pools take the maximum of ``window`` i.i.d. draws of the entry law."""
    x = _materialized(inputs[0])
    window = int(layer.attrs.get("window") or 1)
    mode = str(layer.attrs.get("mode", "avg"))
    if x.m2 <= 0 or window <= 1:
        return x
    if mode.endswith("max"):
        mu, m2, m4 = _max_moments(x.law, window)
    else:
        variance = max(x.m2 - x.mu * x.mu, 0.0)
        mu, m2 = x.mu, x.mu * x.mu + variance / window
        m4 = x.m4 * (m2 / x.m2) ** 2
    ratio = m2 / x.m2
    k1, k2, k3 = x.log
    return replace(
        x, mu=mu, m2=m2, m4=m4, c22=x.c22 * ratio * ratio, log=(k1 + math.log(ratio), k2, k3),
        law=Law(mean=mu, variance=max(m2 - mu * mu, 0.0)),
    )  # fmt: skip


def _max_moments(law: Law, window: int) -> tuple[float, float, float]:
    """Moments of phi(max of `window` draws of z ~ N(mean, variance)); phi is monotone."""
    act = get_activation(law.activation, law.alpha)
    sd = math.sqrt(max(law.variance, 1e-300))
    t = np.linspace(-9.0, 9.0, 4001)
    cdf = 0.5 * (1 + np.vectorize(math.erf, otypes=[float])(t / math.sqrt(2)))
    density = window * np.exp(-t * t / 2) / math.sqrt(2 * math.pi) * cdf ** (window - 1)
    values = act.phi(law.mean + sd * t)
    dt = t[1] - t[0]
    return tuple(float(np.sum(density * values**p) * dt) for p in (1, 2, 4))  # type: ignore[return-value]


def concat(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """Concatenation of independent parts: moments are width-weighted averages."""
    parts = [_materialized(x) for x in inputs]
    widths = [x.width for x in parts]
    total = sum(widths)
    weights = [w / total for w in widths]
    m2 = sum(w * x.m2 for w, x in zip(weights, parts, strict=True))
    second = sum(w * w * x.second_length for w, x in zip(weights, parts, strict=True))
    second += sum(
        2 * weights[i] * weights[j] * parts[i].m2 * parts[j].m2
        for i in range(len(parts))
        for j in range(i + 1, len(parts))
    )
    m4 = sum(w * x.m4 for w, x in zip(weights, parts, strict=True))
    mu = sum(w * x.mu for w, x in zip(weights, parts, strict=True))
    return _with_second(total, mu, m2, m4, second, _mix_log(parts, weights, m2))


def _mix_log(parts: list[SignalState], weights: list[float], m2: float) -> tuple[float, float, float]:
    """Delta-method log-cumulants of a weighted sum of independent lengths."""
    if m2 <= 0:
        return (-math.inf, 0.0, 0.0)
    k2 = sum((w * x.m2 / m2) ** 2 * x.log[1] for w, x in zip(weights, parts, strict=True))
    gap = sum(
        (w * x.m2 / m2) * (math.log(x.m2) - x.log[0]) for w, x in zip(weights, parts, strict=True) if x.m2 > 0
    )
    return (math.log(m2) - gap, k2, 0.0)


def _with_second(
    width: int,
    mu: float,
    m2: float,
    m4: float,
    second: float,
    log: tuple[float, float, float],
) -> SignalState:
    """A state whose E[M^2] is ``second``: c22 is solved from E[M^2] = m4/n + (1-1/n) c22."""
    c22 = (second - m4 / width) / (1 - 1 / width) if width > 1 else second
    law = Law(mean=mu, variance=max(m2 - mu * mu, 0.0))
    return SignalState(width=width, mu=mu, m2=m2, m4=m4, c22=max(c22, 0.0), log=log, law=law)


def add(layer: Layer, inputs: list[SignalState], ctx: Context) -> SignalState:
    """y = x + f. For a residual join, f is the branch output (eta already applied) and
    depends on the skip x through the branch's linear response E[M_f | M_x] = a M_x + b:
    a = 1 for a homogeneous branch (THEORY's 1 + g eta^2 per block), a = 0 behind a norm
    (pre-norm: a fixed amount per block). The cross term <x, f>/n has mean mu_x mu_f:
    zero for a linear-terminated branch, first order in eta for a ReLU-terminated one."""
    if len(inputs) == 1:
        return inputs[0]
    block = ctx.residual_block(layer.name)
    if block is None or len(inputs) != 2:
        state = _materialized(inputs[0])
        for other in inputs[1:]:
            state = _join(state, _materialized(other), slope=0.0, intercept=None, skip_identity=False)
        return state
    skip_index = layer.inputs.index(block.skip) if block.skip in layer.inputs else 0
    x, f = _materialized(inputs[skip_index]), _materialized(inputs[1 - skip_index])
    slope, intercept = ctx.branch_slope(block)
    return _join(x, f, slope, intercept, skip_identity=block.skip == block.fork)


def _join(
    x: SignalState, f: SignalState, slope: float, intercept: float | None, skip_identity: bool
) -> SignalState:
    n = x.width
    mx, mf = x.m2, f.m2
    sx, sf = x.second_length, f.second_length
    if skip_identity and intercept is not None:
        joint = slope * sx + intercept * mx  # E[M_x M_f]
    else:
        slope, joint = 0.0, mx * mf
    cross = x.mu * f.mu  # E[C], C = <x, f>/n
    cross2 = cross * cross + mx * mf / n
    cross_x = cross * sx / mx if mx > 0 else 0.0  # C scales with the stream's length
    cross_f = cross * joint / mx if mx > 0 else 0.0
    m2 = mx + mf + 2 * cross
    second = sx + sf + 2 * joint + 4 * cross2 + 4 * cross_x + 4 * cross_f
    m4 = x.m4 + 6 * mx * mf + f.m4
    mu = x.mu + f.mu
    if m2 <= 0:
        return _with_second(n, mu, 0.0, 0.0, 0.0, (-math.inf, 0.0, 0.0))
    # ln M_y: the skip's log-variance carried with elasticity rho, plus the branch's own
    # noise (the part of Var M_f not explained by M_x) and the cross term's.
    var_x = max(sx - mx * mx, 0.0)
    own = max(sf - mf * mf - slope * slope * var_x, 0.0) + 4 * mx * mf / n
    rho = (mx + slope * mx + 2 * cross) / m2
    noise = own / (m2 * m2)
    gap_x = math.log(mx) - x.log[0] if mx > 0 else 0.0
    gap = rho * gap_x + noise / 2
    k2 = rho * rho * x.log[1] + noise
    log = (math.log(m2) - gap, k2, rho**3 * x.log[2])
    return _with_second(n, mu, m2, m4, second, log)


RULES: dict[Kind, Rule] = {
    Kind.DENSE: linear,
    Kind.CONV: linear,
    Kind.ACTIVATION: activation,
    Kind.NORM: norm,
    Kind.SCALE: scale,
    Kind.POOL: pool,
    Kind.RESHAPE: passthrough,
    Kind.UNMODELED: passthrough,
    Kind.CONCAT: concat,
    Kind.ADD: add,
}
