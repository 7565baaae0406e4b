"""Reconstruction metrics as tensor functions, per image ([B] out).

`value_range` says what the pixels span: (-1, 1) for the batch format (the default) or (0, 1).
Both metrics are computed as on [0, 1] images: SSIM's luminance term is not shift-invariant
(it compares means), so [-1, 1] inputs are mapped to [0, 1] first; the same pair of images
thus scores the same in either convention, and matches the usual [0, 1] / 8-bit numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = value_range
    return (x.float() - lo) / (hi - lo)


def psnr(x: torch.Tensor, y: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: 10 log10(1 / MSE) on [0, 1] pixels."""
    mse = (_unit(x, value_range) - _unit(y, value_range)).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(eps))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) on [0, 1] pixels, per image, mean over channels
    and positions. Gaussian window (11 px, sigma 1.5), 'valid' positions only (no padding);
    images smaller than the window use the largest odd window that fits. Computed in float64:
    the variances are differences of nearly equal moments, which fp32 resolves only to ~1e-7."""
    x, y = _unit(x, value_range).double(), _unit(y, value_range).double()
    c = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    w = _gaussian_window(size, sigma, c, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x.pow(2)).clamp_min(0)
    var_y = (blur(y * y) - mu_y.pow(2)).clamp_min(0)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()
