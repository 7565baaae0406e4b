"""Post-hoc EMA, the mathematics (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", section 3): plain numpy, no torch, no process group.

A power-function EMA with exponent gamma, updated at step n as theta_ema <- beta_n theta_ema + (1 - beta_n) theta
with beta_n = (1 - 1/n)^(gamma + 1), averages the weights seen up to time t with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t        (integrates to 1)

whose relative standard deviation (std / t) is sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))). Snapshots of
such EMAs, taken at times t_i with exponents gamma_i, are themselves averages of the training trajectory with
known profiles. Any other profile p* (another sigma_rel, another end time) is approximated by the combination
sum_i x_i p_i closest to it in L2: the normal equations G x = b, with G_ij = <p_i, p_j> and b_i = <p_i, p*>,
and

    <p_{ta,ga}, p_{tb,gb}> = (ga + 1)(gb + 1) m^(ga + gb + 1) / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1)),  m = min(ta, tb)

(the integral of the product over [0, m]). The same x_i combine the snapshots' weights into the reconstruction.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of the power-function profile with relative std `sigma_rel`: the largest real root of
    (g + 1) / ((g + 2)^2 (g + 3)) = sigma_rel^2, i.e. of g^3 + 7 g^2 + (16 - s) g + (12 - s), s = sigma_rel^-2."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel = {sigma_rel}: must lie in (0, 0.28) (gamma > 0)")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> (broadcasting), evaluated in logs: t^gamma overflows for long runs."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    log = ((g_a + g_b + 1) * np.log(m) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * np.exp(log)


def solve_coefficients(snap_t: Sequence[float], snap_gamma: Sequence[float], out_t: Sequence[float],
                       out_gamma: Sequence[float]) -> np.ndarray:
    """Least-squares weights [n_snapshots, n_outputs]: column j combines the snapshots into the EMA with
    exponent out_gamma[j] at time out_t[j]. Snapshots later than an output's time would average weights from
    its future; give only those at or before it (`posthoc_coefficients` does)."""
    ti = np.asarray(snap_t, dtype=np.float64).reshape(-1, 1)
    gi = np.asarray(snap_gamma, dtype=np.float64).reshape(-1, 1)
    to = np.asarray(out_t, dtype=np.float64).reshape(1, -1)
    go = np.asarray(out_gamma, dtype=np.float64).reshape(1, -1)
    if ti.size == 0:
        raise ValueError("no snapshots to reconstruct from")
    if (ti <= 0).any() or (to <= 0).any():
        raise ValueError("snapshot and output times must be positive")
    gram = profile_dot(ti, gi, ti.T, gi.T)
    rhs = profile_dot(ti, gi, to, go)
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def posthoc_coefficients(snap_t: Sequence[float], snap_gamma: Sequence[float], sigma_rel: float,
                         out_t: float | None = None) -> np.ndarray:
    """Weights of each snapshot for the EMA of relative std `sigma_rel` at time `out_t` (default: the last
    snapshot's); snapshots after `out_t` get weight 0."""
    t = np.asarray(snap_t, dtype=np.float64)
    out_t = float(t.max()) if out_t is None else float(out_t)
    use = t <= out_t
    x = np.zeros(len(t))
    x[use] = solve_coefficients(t[use], np.asarray(snap_gamma, dtype=np.float64)[use], [out_t],
                                [sigma_rel_to_gamma(sigma_rel)])[:, 0]
    return x


def discrete_profile(n: int, gamma: float) -> np.ndarray:
    """Weights w_k (k = 1..n) that the discrete update beta_k = (1 - 1/k)^(gamma + 1) gives the k-th weights
    after n updates: (1 - beta_k) prod_{j > k} beta_j = (1 - (1 - 1/k)^(gamma + 1)) (k / n)^(gamma + 1)."""
    k = np.arange(1, n + 1, dtype=np.float64)
    return (1.0 - (1.0 - 1.0 / k) ** (gamma + 1)) * (k / n) ** (gamma + 1)
