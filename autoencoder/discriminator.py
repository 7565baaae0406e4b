"""PatchGAN discriminator (pix2pix's N-layer design): one real/fake logit per overlapping patch.

The normalisation is configurable. pix2pix and taming use BatchNorm and call the
discriminator on the real and the fake batch separately, so each batch is normalised with its
own statistics — a cue that separates real from fake without looking at the images. Here
"group" (default) normalises each sample on its own; "batch" is meant to be fed the real and
fake batches concatenated, which loss.py always does for the discriminator's own loss.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm {kind!r}: expected 'group', 'batch' or 'none'")


class PatchDiscriminator(nn.Module):
    """[B, C, H, W] -> logits [B, 1, h, w]; `layers` stride-2 stages, widths doubling up to 8x."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "group"):
        super().__init__()
        self.norm_kind = norm
        bias = norm == "none"   # a following norm would cancel a conv bias
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1   # the last hidden stage keeps the resolution
            seq += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN init: small conv weights, norm scales near 1 (data-independent, meta-device safe)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def build_discriminator(loss_cfg, in_channels: int = 3) -> PatchDiscriminator:
    return PatchDiscriminator(in_channels, loss_cfg.disc_channels, loss_cfg.disc_layers, loss_cfg.disc_norm)
