"""Stateless samplers (k-diffusion style): pure functions of a denoiser callable and an objective.

Denoiser signature (every sampler, `guidance.guided`, and `training.DiffusionStage.model_fn`):

    model(x: Tensor[B, ...], t: Tensor[B] (native objective time, see ldm/objectives.py), cond: dict)
        -> Tensor[B, ...], the prediction in the objective's parametrisation (eps, v or velocity)

`cond` is passed through untouched (ldm/conditioning.py describes its keys). Each sampler walks a
descending grid `times` (objective.sampling_times: noise end first, clean end last) and converts
predictions with `objective.to_x0_eps`, so the same code samples eps, v and flow models:

- ddim: x_s = a_s x0 + sqrt(b_s^2 - sigma^2) eps + sigma z, sigma = eta * b_s sqrt(1 - (b_s a_t / (a_s b_t))^2);
  for the linear flow path eta = 0 is exactly an Euler step in t.
- ddpm: ancestral sampling from the posterior q(x_s | x_t, x0_hat), i.e. ddim with eta = 1 (on the full
  grid it is the DDPM sampler of Ho et al.).
- euler / heun: first / second order steps of the probability-flow ODE in the objective's ODE
  coordinates (discrete diffusion: y = x/a against sigma = b/a; flow: x against t). Heun's corrector is
  skipped on a step that ends at the clean end (as in EDM) or starts at an infinite or >100x larger sigma.
- dpmpp_2m: DPM-Solver++(2M) in log-SNR with data prediction (Lu et al. 2022); first order on the first
  and last steps.
All randomness comes from `generator` (noise drawn on the generator's device), so a seed reproduces a
batch exactly.

Trap: an eps-predicting model on a schedule whose noise end has a tiny a (cosine: a = 5e-5 at t = 999)
turns a small eps error into an x0 error of b/a (~2e4x) on the first step of a "trailing" grid and the
samples land off the data (a 2-D mixture model trained that way put 98% of its DDIM samples off it;
tests/ldm/test_ldm_samplers.py reproduces the effect). Use v-prediction, "leading" spacing or `clip_x0`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .objectives import Objective, spatial_size

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)


def _full(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.device).expand(x.shape[0]).contiguous()


def _predict(model: Denoiser, objective: Objective, x: torch.Tensor, t: torch.Tensor, cond: dict,
             clip_x0: Optional[float] = None):
    tt = _full(t, x)
    x0, eps = objective.to_x0_eps(model(x, tt, cond), x, tt)
    if clip_x0 is not None:   # clamp the data estimate, keep (x0, eps) consistent with x
        x0 = x0.clamp(-clip_x0, clip_x0)
        a, b = objective.coefficients(tt)
        eps = (x - a.view(-1, *[1] * (x.dim() - 1)) * x0) / b.view(-1, *[1] * (x.dim() - 1))
    return x0, eps


def _scalar_coefficients(objective: Objective, t: torch.Tensor):
    a, b = objective.coefficients(t.reshape(1))
    return a[0], b[0]


def ddim(model: Denoiser, objective: Objective, x: torch.Tensor, cond: dict, times: torch.Tensor,
         eta: float = 0.0, generator: Optional[torch.Generator] = None, callback=None,
         clip_x0: Optional[float] = None) -> torch.Tensor:
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        x0, eps = _predict(model, objective, x, t, cond, clip_x0)
        a_t, b_t = _scalar_coefficients(objective, t)
        a_s, b_s = _scalar_coefficients(objective, s)
        sigma = torch.zeros(())
        if eta > 0 and b_s > 0 and a_s > 0:
            ratio = (b_s * a_t) / (a_s * b_t)
            sigma = eta * b_s * torch.sqrt(torch.clamp(1 - ratio ** 2, min=0))
        x = a_s * x0 + torch.sqrt(torch.clamp(b_s ** 2 - sigma ** 2, min=0)) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        if callback is not None:
            callback(i, x, x0)
    return x


def ddpm(model: Denoiser, objective: Objective, x: torch.Tensor, cond: dict, times: torch.Tensor,
         generator: Optional[torch.Generator] = None, callback=None, clip_x0: Optional[float] = None
         ) -> torch.Tensor:
    return ddim(model, objective, x, cond, times, eta=1.0, generator=generator, callback=callback,
                clip_x0=clip_x0)


def _ode_step(objective: Objective, x: torch.Tensor, t, s, drift: torch.Tensor, x0, eps) -> torch.Tensor:
    c_t, tau_t = (v[0] for v in objective.ode_coords(t.reshape(1)))
    c_s, tau_s = (v[0] for v in objective.ode_coords(s.reshape(1)))
    if not torch.isfinite(tau_t):
        # start at infinite sigma (zero terminal SNR): the exact limit of the step is the DDIM form
        a_s, b_s = _scalar_coefficients(objective, s)
        return a_s * x0 + b_s * eps
    return c_s * (x / c_t + (tau_s - tau_t) * drift)


def euler(model: Denoiser, objective: Objective, x: torch.Tensor, cond: dict, times: torch.Tensor,
          generator: Optional[torch.Generator] = None, callback=None,
          clip_x0: Optional[float] = None) -> torch.Tensor:
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        x0, eps = _predict(model, objective, x, t, cond, clip_x0)
        x = _ode_step(objective, x, t, s, objective.ode_drift(x0, eps), x0, eps)
        if callback is not None:
            callback(i, x, x0)
    return x


# The trapezoid rule assumes the drift changes little over a step. A step that shrinks sigma by more than
# this factor (the first step of a schedule with a huge sigma_max, e.g. cosine: ~2e4) takes the Euler step,
# whose large-sigma limit is exact, instead of a badly wrong average.
_HEUN_MAX_RATIO = 100.0


def heun(model: Denoiser, objective: Objective, x: torch.Tensor, cond: dict, times: torch.Tensor,
         generator: Optional[torch.Generator] = None, callback=None,
         clip_x0: Optional[float] = None) -> torch.Tensor:
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        x0, eps = _predict(model, objective, x, t, cond, clip_x0)
        d = objective.ode_drift(x0, eps)
        x_euler = _ode_step(objective, x, t, s, d, x0, eps)
        _, b_s = _scalar_coefficients(objective, s)
        _, tau_t = (v[0] for v in objective.ode_coords(t.reshape(1)))
        _, tau_s = (v[0] for v in objective.ode_coords(s.reshape(1)))
        if b_s > 0 and torch.isfinite(tau_t) and tau_t <= _HEUN_MAX_RATIO * tau_s:
            x0_s, eps_s = _predict(model, objective, x_euler, s, cond, clip_x0)
            d = 0.5 * (d + objective.ode_drift(x0_s, eps_s))
            x = _ode_step(objective, x, t, s, d, x0, eps)
        else:
            x = x_euler
        if callback is not None:
            callback(i, x, x0)
    return x


def dpmpp_2m(model: Denoiser, objective: Objective, x: torch.Tensor, cond: dict, times: torch.Tensor,
             generator: Optional[torch.Generator] = None, callback=None,
             clip_x0: Optional[float] = None) -> torch.Tensor:
    x0_prev, h_prev = None, None
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        x0, eps = _predict(model, objective, x, t, cond, clip_x0)
        a_t, b_t = _scalar_coefficients(objective, t)
        a_s, b_s = _scalar_coefficients(objective, s)
        lam_t = torch.log(a_t) - torch.log(b_t)   # half log-SNR; -inf at pure noise, +inf at the clean end
        lam_s = torch.log(a_s) - torch.log(b_s)
        h = lam_s - lam_t
        d = x0
        if x0_prev is not None and torch.isfinite(h) and h_prev is not None and torch.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # first-order data-prediction step; exact limits at pure noise (h = inf) and at the clean end
        x = (b_s / b_t) * x - a_s * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x, x0)
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


def sample(name: str, model: Denoiser, objective: Objective, noise: torch.Tensor, cond: dict, steps: int, *,
           eta: float = 0.0, spacing: str = "trailing", shift: Optional[float] = None,
           generator: Optional[torch.Generator] = None, callback=None, clip_x0: Optional[float] = None
           ) -> torch.Tensor:
    """Run sampler `name` from `noise` (x at the noise end, N(0, I)) for `steps` network evaluations
    (heun: up to twice that). `shift` overrides the flow objective's time shift (None: the objective's,
    which with shift "auto" follows the noise's latent size, as training does). Returns the clean sample
    x0 (in latent units). `eta` applies to ddim only;
    `clip_x0` clamps every data estimate to [-c, c] (diffusers' clip_sample)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    times = objective.sampling_times(steps, spacing=spacing, shift=shift, latent_hw=spatial_size(noise))
    kwargs = dict(generator=generator, callback=callback, clip_x0=clip_x0)
    if name == "ddim":
        kwargs["eta"] = eta
    return SAMPLERS[name](model, objective, noise, cond, times, **kwargs)
