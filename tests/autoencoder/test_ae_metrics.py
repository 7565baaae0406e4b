"""PSNR and SSIM against closed forms."""
from __future__ import annotations

import math

import torch

from autoencoder.metrics import psnr, ssim


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 16, 16)
    y = torch.full_like(x, 0.2)                     # 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0), atol=1e-4)
    assert torch.allclose(psnr((x + 1) / 2, (y + 1) / 2, value_range=(0, 1)), psnr(x, y), atol=1e-4)


def test_ssim_identity_constant_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    # flat images: variances vanish, SSIM = (2ab + c1) / (a^2 + b^2 + c1) with a, b in [0, 1]
    a, b = 0.6, 0.3
    c1 = 0.01 ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1))
    assert abs(float(got) - want) < 1e-5 and abs(want - 0.8) < 1e-3
    # [-1, 1] and [0, 1] conventions agree
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, y), ssim((x + 1) / 2, (y + 1) / 2, value_range=(0, 1)), atol=1e-6)
    noisier = (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert bool((ssim(x, noisier) < ssim(x, y)).all()) and bool((ssim(x, y) < 0.9).all())
    assert ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)).shape == (1,)   # smaller than the window
    assert math.isclose(float(ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))), 1.0, abs_tol=1e-6)
