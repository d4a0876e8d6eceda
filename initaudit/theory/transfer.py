"""Transfer rules: how each layer kind moves the signal state (THEORY.md sections 2-4).

One function per :class:`~initaudit.graph.Kind`, in the spirit of neural-tangents' stax
layers: adding a layer kind is adding a function to :data:`RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

from initaudit.graph import Kind, Layer
from initaudit.stats import TensorStats
from initaudit.theory.activations import get_activation
from initaudit.theory.special import log_gamma_matched, log_relu_average
from initaudit.theory.state import Law, Modes, SignalState

if TYPE_CHECKING:
    from initaudit.graph import ResidualBlock


class Context(Protocol):
    """What a rule may ask of the interpreter beyond its own inputs."""

    def residual_block(self, add: str) -> ResidualBlock | None: ...

    def branch_slope(self, block: ResidualBlock) -> tuple[float, float]: ...

    def branch_modes(self, block: ResidualBlock) -> tuple[float, float]: ...


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
    branch = inputs[1 - skip_index]
    x, f = _materialized(inputs[skip_index]), _materialized(branch)
    slope, intercept = ctx.branch_slope(block)
    identity = block.skip == block.fork
    state = _join(x, f, slope, intercept, skip_identity=identity)
    gaussian_branch = branch.fresh and branch.mu == 0 and branch.m2 > 0  # F | scale ~ N(0, S_f I)
    centred = abs(x.mu) <= 1e-9 * math.sqrt(max(x.m2, 1e-300))
    if identity and intercept is not None and gaussian_branch and centred and x.m2 > 0 and state.m2 > 0:
        a1, a3 = ctx.branch_modes(block)
        elasticity = slope * x.m2 / f.m2  # d ln E[M_f] / d ln M_x: 1 homogeneous, 0 behind a norm
        joined = stream_join(x, branch, elasticity, a1, a3)
        if joined is not None:
            state = replace(state, log=joined[0], modes=joined[1])
    return state


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


# The residual stream's log length -------------------------------------------------------

_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(15)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def stream_join(
    x: SignalState, f: SignalState, elasticity: float, a1: float, a3: float
) -> tuple[tuple[float, float, float], Modes] | None:
    """Log-cumulants of M_y for y = x + F, F | S_f ~ N(0, S_f I) (a fresh, zero-mean branch).

    Exactly, D = ln(M_y / M_x) = ln(T/n) + ln chi'^2_n(lambda = n/T) with T = S_f / M_x:
    a noncentral chi-square, whose log-moments are Poisson mixtures of polygammas. ln T is
    the branch's own noise plus (elasticity - 1) ln M_x (pre-norm: -ln M_x) plus the stream's
    coordinate modes: a ReLU reading the stream passes the positive part of its energy,
    (1 + a1 h_1 + a3 h_3)/2, so a stream whose coordinates lean positive grows faster, and
    h_1 (the coordinate mean) is a random walk that forgets only at rate 1/sqrt(1 + T) per
    block. That persistence correlates successive blocks (it doubles Var ln M for eta = 1)
    and tilts E h_1 negative (paths leaning positive are shrunk harder), which lowers E ln M.
    E D, Var D and the third cumulant are integrated over ln T (Gauss–Hermite, with a
    Cornish–Fisher skew); the modes and their covariance with ln M follow linearized.
    None where a log-cumulant is not finite (a dead branch).
    """
    n = max(x.width, 1)
    k1, k2, k3 = x.log
    f1, f2, f3 = f.log
    md = x.stream_modes
    g1 = elasticity - 1.0
    noise2 = max(f2 - elasticity**2 * k2, 0.0)
    noise3 = f3 - elasticity**3 * k3
    second1, second3 = md.mean1**2 + md.var1, md.mean3**2 + md.var3
    ell_mean = f1 - k1 + a1 * md.mean1 + a3 * md.mean3 - 0.5 * (a1 * a1 * second1 + a3 * a3 * second3)
    cov_ell = g1 * k2 + a1 * md.cov1 + a3 * md.cov3  # Cov(ln M_x, ln T)
    ell_var = (
        g1 * g1 * k2 + noise2 + a1 * a1 * md.var1 + a3 * a3 * md.var3 + 2 * g1 * (a1 * md.cov1 + a3 * md.cov3)
    )
    ell_var = max(ell_var, 0.0)
    if not all(math.isfinite(v) for v in (k1, k2, k3, f1, f2, f3, ell_mean, ell_var)) or ell_mean > 600:
        return None  # a dead or overflowing branch: the moment closure of _join stands
    z = _GH_NODES
    if ell_var > 0:
        skew = min(max((noise3 + g1**3 * k3) / ell_var**1.5, -1.0), 1.0)
        ell = ell_mean + math.sqrt(ell_var) * (z + skew * (z * z - 1) / 6)
    else:
        ell = np.full_like(z, ell_mean)
    w = _GH_WEIGHTS
    t = np.exp(ell)
    mean_d, var_d, third_d = _log_noncentral(n, t)
    e_d = float(w @ mean_d)
    dev = mean_d - e_d
    v_d = float(w @ var_d + w @ dev**2)
    k3_d = float(w @ third_d + 3 * w @ (dev * (var_d - w @ var_d)) + w @ dev**3)
    centred = ell - float(w @ ell)
    spread = float(w @ centred**2)
    beta = float(w @ (dev * centred)) / spread if spread > 0 else 0.0  # d E[D] / d ln T, averaged
    rho = 1 + beta * g1  # how much of ln M_x survives the join
    log = (k1 + e_d, max(k2 + v_d + 2 * beta * cov_ell, 0.0), rho**3 * k3 + k3_d - (beta * g1) ** 3 * k3)
    # E[exp(-k D / 2)] given T: (1 + T)^(-k/2) times the chi^2 noise's second-order correction.
    ve = 2 * t * (2 + t) / (n * (1 + t) ** 2)
    c1 = float(w @ ((1 + t) ** -0.5 * (1 + 3 * ve / 8)))
    c2 = float(w @ ((1 + t) ** -1.0 * (1 + ve)))
    c3 = float(w @ ((1 + t) ** -1.5 * (1 + 15 * ve / 8)))
    c6 = float(w @ ((1 + t) ** -3.0 * (1 + 6 * ve)))
    # h_1' = (h_1 + sqrt(T/n) zeta) exp(-D/2) exactly; h_3 decays as exp(-3D/2) (Mehler).
    cov1_d = beta * (g1 * md.cov1 + a1 * md.var1)
    cov3_d = beta * (g1 * md.cov3 + a3 * md.var3)
    mean1 = c1 * md.mean1 - 0.5 * c1 * cov1_d
    var1 = c2 * second1 + float(w @ (t / n * (1 + t) ** -1.0 * (1 + ve))) - mean1**2
    mean3 = c3 * md.mean3 - 1.5 * c3 * cov3_d
    var3 = c6 * second3 + (1 - c6) * 6.0 / n - mean3**2
    modes = Modes(
        mean1=mean1, var1=max(var1, 0.0), cov1=c1 * (md.cov1 + cov1_d),
        mean3=mean3, var3=max(var3, 0.0), cov3=c3 * (md.cov3 + cov3_d),
    )  # fmt: skip
    return log, modes


#: Above this Poisson mean (n / 2T) the noncentral chi-square's log is expanded in 1/lambda.
_POISSON_MAX = 2e4
#: The grid every Poisson window lies on: J = 0 .. _J_END - 1 reaches past the last J of any
#: window, ceil(lambda/2 + 12 sqrt(lambda/2) + 12) with lambda/2 <= _POISSON_MAX.
_J_END = math.ceil(_POISSON_MAX + 12 * math.sqrt(_POISSON_MAX) + 12) + 2
_J_GRID = np.arange(_J_END, dtype=float)
_LOG_J = np.log(np.maximum(_J_GRID, 1.0))  # ln J for J >= 1 (the J = 0 entry is never read)


@lru_cache(maxsize=16)
def _polygamma_grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """psi, psi' and psi'' at n/2 + J on the whole J grid: every Poisson window of width n
    reads it, so one evaluation (a few milliseconds) serves every block and node."""
    grid = _polygamma(n / 2 + _J_GRID)
    for values in grid:
        values.flags.writeable = False  # shared by every later call: read-only
    return grid


def _log_noncentral(n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and third cumulant of D = ln(T/n) + ln chi'^2_n(n/T), for each T.

    chi'^2_n(lambda) is a Poisson(lambda/2) mixture of chi^2_{n+2J}, and
    ln chi^2_k has cumulants ln 2 + psi(k/2), psi'(k/2), psi''(k/2).

    The same sums, term for term, as the first implementation (tests/test_theory_speed.py keeps
    it as the reference), with the polygammas and ln J read off precomputed grids
    (:func:`_polygamma_grid`) instead of evaluated per window, and dev^3 taken as a product:
    numpy's ``pow`` is 20 times slower on negative numbers, and the product differs from it by
    float rounding. One window at a time keeps the arrays in cache; a padded all-nodes array
    of the windows is memory-bound and slower.
    """
    means, variances, thirds = np.zeros_like(t), np.zeros_like(t), np.zeros_like(t)
    psi0_grid, psi1_grid, psi2_grid = _polygamma_grid(n)
    log2 = math.log(2)
    for i, value in enumerate(t):
        if value <= 0:
            continue
        half = n / (2 * value)
        if half > _POISSON_MAX:  # D = ln(1 + T) + ln(1 + eps), eps of variance ve
            ve = 2 * value * (2 + value) / (n * (1 + value) ** 2)
            means[i], variances[i] = math.log1p(value) - ve / 2, ve
            continue
        spread = 12 * math.sqrt(half) + 12
        first = max(0, math.floor(half - spread))
        end = math.ceil(half + spread) + 1
        # ln J! by a running sum from the first term: one lgamma per T
        log_factorial = np.empty(end - first)
        log_factorial[0] = 0.0
        np.cumsum(_LOG_J[first + 1 : end], out=log_factorial[1:])
        log_factorial += math.lgamma(first + 1)
        log_pmf = _J_GRID[first:end] * math.log(max(half, 1e-300)) - log_factorial
        pmf = np.exp(log_pmf - log_pmf.max())
        pmf /= pmf.sum()
        psi0, psi1, psi2 = psi0_grid[first:end], psi1_grid[first:end], psi2_grid[first:end]
        mean = float(pmf @ psi0)
        dev = psi0 - mean
        square = dev * dev
        means[i] = math.log(value / n) + log2 + mean
        variances[i] = float(pmf @ psi1 + pmf @ square)
        thirds[i] = float(pmf @ psi2 + 3 * pmf @ (dev * psi1) + pmf @ (square * dev))
    return means, variances, thirds


def _polygamma(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """psi, psi' and psi'' elementwise (x > 0): recurrence up to 12, then asymptotic series."""
    x = np.asarray(x, dtype=float).copy()
    psi0, psi1, psi2 = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    small = x < 12.0
    while small.any():
        xs = x[small]
        psi0[small] -= 1.0 / xs
        psi1[small] += 1.0 / (xs * xs)
        psi2[small] -= 2.0 / (xs * xs * xs)
        x[small] += 1.0
        small = x < 12.0
    f = 1.0 / (x * x)
    psi0 += np.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))
    psi1 += 1 / x + f / 2 + f / x * (1 / 6 - f * (1 / 30 - f * (1 / 42 - f / 30)))
    psi2 += -f - f / x - f * f / 2 + f**3 / 6 - f**4 / 6 + f**5 * 3 / 10 - f**6 * 5 / 6
    return psi0, psi1, psi2


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
