"""Helpers for the autoencoder tests: tiny configs, synthetic shape images, a test VGG16 file.

(A uniquely named module: test folders share one import namespace.)"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig

COLORS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0, 0.5], [1, 0.5, 0], [1, 1, 1], [0, 0, 0]],
                      dtype=torch.float32)


def shapes_batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n images [n, 3, size, size] in [-1, 1]: one flat-coloured circle, square or triangle on a
    flat background of another colour, 30-60 % of the side, fully inside the frame."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        fg, bg = torch.randperm(len(COLORS), generator=g)[:2].tolist()
        side = size * (0.3 + 0.3 * torch.rand((), generator=g).item())
        x0 = torch.rand((), generator=g).item() * (size - side)
        y0 = torch.rand((), generator=g).item() * (size - side)
        kind = int(torch.randint(0, 3, (), generator=g))
        if kind == 0:     # circle
            r = side / 2
            mask = (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
        elif kind == 1:   # square
            mask = (xx >= x0) & (xx <= x0 + side) & (yy >= y0) & (yy <= y0 + side)
        else:             # upward triangle
            t = (yy - y0) / side
            mask = (t >= 0) & (t <= 1) & ((xx - x0 - side / 2).abs() <= t * side / 2)
        img = COLORS[bg].view(3, 1, 1).expand(3, size, size).clone()
        img[:, mask] = COLORS[fg].view(3, 1)
        out[i] = img * 2 - 1
    return out


def tiny_kl(**kw) -> AutoencoderConfig:
    base = dict(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=8)
    base.update(kw)
    cfg = AutoencoderConfig(**base)
    cfg.validate()
    return cfg


def tiny_loss(**kw) -> AutoencoderLossConfig:
    base = dict(perceptual_weight=0.0, disc_start=0, disc_layers=2, disc_channels=16)
    base.update(kw)
    cfg = AutoencoderLossConfig(**base)
    cfg.validate()
    return cfg


def write_vgg16_file(folder: Path, seed: int = 0) -> Path:
    """A VGG16 `features.*` state dict with the real shapes and random weights (~59 MB), saved
    as `vgg16-<first 8 hex of its sha256>.pth` the way torchvision names its files. The
    classifier (another ~470 MB) is left out: LPIPS never uses it."""
    import torchvision
    with torch.device("meta"):
        layout = torchvision.models.vgg16().features.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in layout.items():
        if k.endswith("weight"):
            sd[f"features.{k}"] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        else:
            sd[f"features.{k}"] = torch.zeros(v.shape)
    tmp = folder / "vgg16-tmp.pth"
    torch.save(sd, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"vgg16-{digest[:8]}.pth"
    os.replace(tmp, path)
    return path
