"""Training objectives behind one interface, separate from the network (as SiT's `transport` does).

TIME CONVENTION (the only place it is written down; everything else refers here)
-------------------------------------------------------------------------------
Every objective describes a Gaussian path  x_t = a(t) x0 + b(t) eps,  eps ~ N(0, I),  and larger t is
noisier. Each objective has a *native* time t and a *network* time fed to the denoiser:

- eps / v (discrete diffusion, DDPM family): t is the integer step index in {0, ..., T-1} held in a float
  tensor; a = sqrt(abar_t), b = sqrt(1 - abar_t). t = T-1 is the noise end (pure noise exactly when
  zero-terminal-SNR is on). The network is fed t unchanged (SD convention). Samplers end at the
  "clean" marker t = -1, where a = 1, b = 0; the network is never called there.
- flow (rectified flow, linear path): t is continuous in [0, 1], a = 1 - t, b = t. t = 1 is pure noise
  (x_1 = eps), t = 0 is data. The network is fed 1000 t (SD3 convention), so the same time embedding
  works for every objective.

`unit_time(t)` maps native time to u in [0, 1] with u = 1 the noise end (t/(T-1) or t); guidance
intervals, logs and validation timesteps are written in u.

What each objective trains the network to predict:
- eps: the noise eps;   v: a eps - b x0 (Salimans & Ho);   flow: the velocity dx_t/dt = eps - x0.
Samplers use `to_x0_eps(pred, x_t, t)` to turn any prediction into (x0, eps); `to_velocity` gives the
objective's velocity (v-parametrisation for eps/v, dx/dt for flow).

Loss: per-sample mean squared error times a per-sample weight, averaged over the batch. min-SNR-gamma
(Hang et al. 2023) weights every kind so that its loss equals min(SNR, gamma) times the x0-space error,
SNR = a^2 / b^2: w = min(SNR, g)/SNR (eps), min(SNR, g)/(SNR + 1) (v), b^2 min(SNR, g) (flow, because
the velocity error equals the x0 error divided by t).
Offset noise (Guttenberg 2023) adds a per-sample, per-channel constant to eps; the target uses that
same noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .schedules import alphas_cumprod


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] tensor against [B, ...]."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def spatial_size(x: torch.Tensor) -> Optional[tuple[int, int]]:
    """(h, w) of image-like latents [B, C, h, w]; None for other shapes (2-D toy data)."""
    return (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else None


def _device_of(generator: Optional[torch.Generator], fallback) -> torch.device:
    return generator.device if generator is not None else torch.device(fallback)


@dataclass
class TrainingInputs:
    x_t: torch.Tensor      # noisy input
    t: torch.Tensor        # native time [B]
    noise: torch.Tensor    # eps actually added (offset noise included)
    target: torch.Tensor   # what the network should output
    weight: torch.Tensor   # per-sample loss weight [B]


class Objective:
    kind: str = ""
    min_snr_gamma: Optional[float] = None
    offset_noise: float = 0.0

    # --- path -----------------------------------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of x_t = a x0 + b eps, each [B] float32."""
        raise NotImplementedError

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value fed to the network."""
        raise NotImplementedError

    def unit_time(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_unit_time(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_t(self, n: int, device=None, generator: Optional[torch.Generator] = None,
                 latent_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """`latent_hw`: the latents' spatial size, for a resolution-dependent time shift (flow, shift auto)."""
        raise NotImplementedError

    def sampling_times(self, steps: int, spacing: str = "trailing", shift: Optional[float] = None,
                       latent_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Descending native times [steps + 1] from the noise end to the clean end (last entry)."""
        raise NotImplementedError

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t)
        return 2 * (torch.log(a) - torch.log(b))

    # --- ODE view (Euler / Heun): state y = x / c, time tau, dy/dtau = p x0 + q eps -------------------
    def ode_coords(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def ode_drift(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- training ---------------------------------------------------------------------------------------
    def sample_noise(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dev = _device_of(generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=torch.float32)
        if self.offset_noise > 0:
            shape = x0.shape[:2] + (1,) * (x0.dim() - 2) if x0.dim() > 2 else (x0.shape[0], 1)
            eps = eps + self.offset_noise * torch.randn(shape, generator=generator, device=dev)
        return eps.to(device=x0.device, dtype=x0.dtype)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t)
        return _bc(a, x0) * x0 + _bc(b, x0) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction an ideal network makes (also: prediction from an (x0, eps) pair)."""
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t)
        return a ** 2 / b ** 2

    def _x0_factor(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample factor k with: prediction-space squared error = k * x0-space squared error."""
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        if not self.min_snr_gamma:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr(t)
        return torch.clamp(snr, max=self.min_snr_gamma) / self._x0_factor(t)

    def training_inputs(self, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> TrainingInputs:
        """Sample (or take) time and noise; build x_t, the target and the per-sample weight."""
        if t is None:
            t = self.sample_t(x0.shape[0], device=x0.device, generator=generator, latent_hw=spatial_size(x0))
        t = t.to(x0.device)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        return TrainingInputs(self.noisy(x0, noise, t), t, noise, self.target(x0, noise, t),
                              self.weight(t).to(x0.device))

    @staticmethod
    def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        per = self.per_sample_loss(pred, target)
        return (per * weight.float()).mean() if weight is not None else per.mean()

    # --- conversions for samplers ------------------------------------------------------------------------
    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_x0(self, pred, x_t, t):
        return self.to_x0_eps(pred, x_t, t)[0]

    def to_eps(self, pred, x_t, t):
        return self.to_x0_eps(pred, x_t, t)[1]

    def to_velocity(self, pred, x_t, t):
        x0, eps = self.to_x0_eps(pred, x_t, t)
        return self.velocity(x0, eps, t)

    def velocity(self, x0, eps, t):
        raise NotImplementedError


class DiscreteDiffusion(Objective):
    """DDPM-family objective over T discrete steps; `prediction` is "eps" or "v"."""

    def __init__(self, prediction: str = "eps", schedule: str = "scaled_linear", num_timesteps: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012, zero_terminal_snr: bool = False,
                 min_snr_gamma: Optional[float] = None, offset_noise: float = 0.0):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction {prediction!r}: expected 'eps' or 'v'")
        self.kind = prediction
        self.num_timesteps = num_timesteps
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        abar = alphas_cumprod(schedule, num_timesteps, beta_start, beta_end, zero_terminal_snr)
        # index 0 is the clean marker t = -1 (abar = 1); index i + 1 is step i
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), abar])
        self._cache: dict = {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._abar[1:].float()

    def _table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            abar = self._abar.to(device)
            self._cache[key] = (abar.sqrt().float(), (1 - abar).clamp_min(0).sqrt().float())
        return self._cache[key]

    def coefficients(self, t):
        a_tab, b_tab = self._table(t.device)
        idx = (t.round().long() + 1).clamp(0, self.num_timesteps)
        return a_tab[idx], b_tab[idx]

    def net_time(self, t):
        return t.float()

    def unit_time(self, t):
        return t.float() / (self.num_timesteps - 1)

    def from_unit_time(self, u):
        return torch.round(u.float() * (self.num_timesteps - 1))

    def sample_t(self, n, device=None, generator=None, latent_hw=None):
        dev = _device_of(generator, device or "cpu")
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=dev)
        return t.float().to(device or dev)

    def sampling_times(self, steps, spacing="trailing", shift=None, latent_hw=None):
        T = self.num_timesteps
        steps = min(int(steps), T)
        if spacing == "trailing":   # includes T-1 (pure noise under zero-terminal-SNR); Lin et al.
            ts = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1
        elif spacing == "leading":  # DDIM/SD: multiples of T // steps plus one
            ratio = T // steps
            ts = (torch.arange(steps, dtype=torch.float64) * ratio).flip(0) + 1
            ts = ts.clamp(max=T - 1)
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"spacing {spacing!r}: expected leading, trailing or linspace")
        return torch.cat([ts[:steps], torch.tensor([-1.0], dtype=torch.float64)]).float()

    def ode_coords(self, t):
        # probability-flow ODE in the variance-exploding view (k-diffusion): y = x / a, tau = sigma = b / a
        a, b = self.coefficients(t)
        return a, torch.where(a > 0, b / a.clamp_min(1e-30), torch.full_like(a, float("inf")))

    def ode_drift(self, x0, eps):
        return eps

    def target(self, x0, eps, t):
        if self.kind == "eps":
            return eps
        a, b = self.coefficients(t)
        return _bc(a, x0) * eps - _bc(b, x0) * x0

    def _x0_factor(self, t):
        snr = self.snr(t)
        return snr if self.kind == "eps" else snr + 1

    def to_x0_eps(self, pred, x_t, t):
        a, b = self.coefficients(t)
        a, b = _bc(a, x_t), _bc(b, x_t)
        if self.kind == "eps":
            return (x_t - b * pred) / a, pred
        return a * x_t - b * pred, b * x_t + a * pred

    def velocity(self, x0, eps, t):
        a, b = self.coefficients(t)
        return _bc(a, x0) * eps - _bc(b, x0) * x0


class RectifiedFlow(Objective):
    """Flow matching on the linear path x_t = (1 - t) x0 + t eps; the network predicts eps - x0."""

    kind = "flow"

    def __init__(self, time_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float | str = 1.0, min_snr_gamma: Optional[float] = None, offset_noise: float = 0.0,
                 shift_base: float = 1.0, shift_base_latent: int = 32):
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling {time_sampling!r}: expected uniform or logit_normal")
        if not (shift == "auto" or (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0)):
            raise ValueError(f"objective.shift = {shift!r}: expected a number > 0 or 'auto'")
        if shift == "auto" and not (shift_base > 0 and shift_base_latent >= 1):
            raise ValueError(f"objective.shift_base = {shift_base!r} must be > 0 and objective.shift_base_latent "
                             f"= {shift_base_latent!r} >= 1")
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.shift = shift
        self.shift_base, self.shift_base_latent = float(shift_base), int(shift_base_latent)
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise

    @staticmethod
    def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
        """SD3's resolution shift: more time near the noise end for shift > 1."""
        return t if shift == 1 else shift * t / (1 + (shift - 1) * t)

    def shift_for(self, latent_hw: Optional[tuple[int, int]] = None) -> float:
        """The time shift at latents of spatial size `latent_hw`: the fixed `shift`, or with shift "auto"
        SD3's rule shift_base * sqrt(m / n) = shift_base * sqrt(h w) / shift_base_latent (ldm/config.py)."""
        if self.shift != "auto":
            return float(self.shift)
        if latent_hw is None:
            raise ValueError("objective.shift is 'auto': the time shift needs the latents' size (latent_hw)")
        h, w = (int(v) for v in latent_hw)
        return self.shift_base * math.sqrt(h * w) / self.shift_base_latent

    def coefficients(self, t):
        t = t.float()
        return 1 - t, t

    def net_time(self, t):
        return 1000 * t.float()

    def unit_time(self, t):
        return t.float()

    def from_unit_time(self, u):
        return u.float()

    def sample_t(self, n, device=None, generator=None, latent_hw=None):
        dev = _device_of(generator, device or "cpu")
        if self.time_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=dev)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=dev))
        return self.shift_time(t, self.shift_for(latent_hw)).to(device or dev)

    def sampling_times(self, steps, spacing="trailing", shift=None, latent_hw=None):
        u = torch.linspace(1, 0, int(steps) + 1, dtype=torch.float64)
        return self.shift_time(u, self.shift_for(latent_hw) if shift is None else shift).float()

    def ode_coords(self, t):
        t = t.float()
        return torch.ones_like(t), t

    def ode_drift(self, x0, eps):
        return eps - x0

    def target(self, x0, eps, t):
        return eps - x0

    def _x0_factor(self, t):
        return 1 / t.float().clamp_min(1e-12) ** 2

    def to_x0_eps(self, pred, x_t, t):
        tt = _bc(t.float(), x_t)
        return x_t - tt * pred, x_t + (1 - tt) * pred

    def velocity(self, x0, eps, t):
        return eps - x0


def build_objective(cfg) -> Objective:
    """ObjectiveConfig -> Objective."""
    if cfg.kind == "flow":
        return RectifiedFlow(cfg.time_sampling, cfg.logit_mean, cfg.logit_std, cfg.shift,
                             cfg.min_snr_gamma, cfg.offset_noise, cfg.shift_base, cfg.shift_base_latent)
    return DiscreteDiffusion(cfg.kind, cfg.schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end,
                             cfg.zero_terminal_snr, cfg.min_snr_gamma, cfg.offset_noise)
