"""Discrete noise schedules: betas -> cumulative alphas (abar_t), and the zero-terminal-SNR rescale."""
from __future__ import annotations

import math

import torch


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
               ) -> torch.Tensor:
    """float64 [T] betas for t = 0..T-1.
    linear: evenly spaced betas (DDPM); scaled_linear: evenly spaced sqrt(beta) (Stable Diffusion);
    cosine: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas capped at 0.999 (Nichol & Dhariwal)."""
    T = num_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}: expected linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale sqrt(abar) so that the last step has SNR exactly 0 (pure noise)
    while the first step keeps its value. Sampling must then start from pure noise, which it does."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2


def alphas_cumprod(schedule: str, num_timesteps: int, beta_start: float, beta_end: float,
                   zero_terminal_snr: bool = False) -> torch.Tensor:
    abar = torch.cumprod(1 - make_betas(schedule, num_timesteps, beta_start, beta_end), dim=0)
    return rescale_zero_terminal_snr(abar) if zero_terminal_snr else abar
