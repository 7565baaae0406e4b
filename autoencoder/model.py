"""Encoder / decoder of the Latent Diffusion first stage, and the autoencoder around them.

Topology as in LDM's `diffusionmodules/model.py` (so diffusers' AutoencoderKL and SD VAE
files convert one-to-one, see convert.py): per level `num_res_blocks` residual blocks
(GroupNorm, SiLU, 3x3 conv), a stride-2 conv between levels, a mid block
(res, attention, res) at the lowest resolution, then GroupNorm, SiLU, 3x3 conv out.
Module names are our own; convert.py maps them to LDM and diffusers keys.

Nothing here depends on data at init, so `with torch.device("meta"): build_autoencoder(cfg)`
works (parameter counts, or materialise later with `to_empty` + a checkpoint).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig
from .distributions import DiagonalGaussian
from .quantize import FSQ, VectorQuantizer

NORM_EPS = 1e-6   # LDM and diffusers both use 1e-6 in the autoencoder's GroupNorms


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 conv on the skip path when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.skip is None else self.skip(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj are 1x1 convs (LDM layout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x.view(b, c, h * w)).transpose(1, 2)      # [B, HW, C]
        # a 1x1 conv is a linear map over channels: apply it to tokens as one (one matmul each)
        q, k, v = (F.linear(tokens, m.weight.flatten(1), m.bias).view(b, h * w, 1, c).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)  # one head
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        out = out.transpose(1, 2).reshape(b, c, h, w)     # a channels-last view of the tokens
        if out.dtype == torch.float32:
            # fp32: the sum keeps that channels-last layout, as diffusers does, so converted models agree
            # to the last bit (later convs pick their algorithm by layout)
            return out + x
        # bf16/fp16 (autocast): x first, so the sum takes x's contiguous NCHW layout. Why: channels-last
        # would carry through every later conv and GroupNorm, and CPU GroupNorm backward in bf16 is ~30x
        # slower on channels-last tensors (19 ms vs 0.6 ms at [4, 32, 64, 64]: half of a training step).
        return x + out


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (halves even sizes exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, groups: int, dropout: float,
                 resample: Optional[nn.Module], resample_name: str):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(i, o, groups, dropout) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, groups) for _, o in widths) if attention else nn.ModuleList()
        self._resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resample = getattr(self, self._resample_name, None)
        return resample(x) if resample is not None else x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups, dropout)
        self.attn = AttnBlock(channels, groups) if attention else None
        self.res2 = ResBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> features [B, out_channels, H/f, W/f] (f = 2**(levels-1))."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths_in = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult[:-1]]
        self.levels = nn.ModuleList()
        size = cfg.resolution
        for i, m in enumerate(cfg.ch_mult):
            cin, cout = widths_in[i], cfg.ch * m
            widths = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            self.levels.append(Level(widths, size in cfg.attn_resolutions, g, cfg.dropout,
                                     Downsample(cout) if i < n - 1 else None, "down"))
            size //= 2 if i < n - 1 else 1
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = MidBlock(top, g, cfg.dropout, cfg.mid_attention)
        self.norm_out = _norm(top, g)
        self.conv_out = nn.Conv2d(top, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out, h*f, w*f].

    `levels[i]` works at the same resolution as the encoder's `levels[i]` (0 = full size) and
    runs last-to-first; each has num_res_blocks + 1 residual blocks.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = MidBlock(top, g, cfg.dropout, cfg.mid_attention)
        levels: list[Level] = []
        cin = top
        for i in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[i]
            widths = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)]
            size = cfg.resolution // 2 ** i
            levels.append(Level(widths, size in cfg.attn_resolutions, g, cfg.dropout,
                                Upsample(cout) if i > 0 else None, "up"))
            cin = cout
        self.levels = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(cfg.ch * cfg.ch_mult[0], g)
        self.conv_out = nn.Conv2d(cfg.ch * cfg.ch_mult[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.levels):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """Encoder -> quant_conv -> regularizer (KL posterior | VQ | FSQ) -> post_quant_conv -> Decoder.

    forward(x) returns a dict of tensors (DeepSpeed walks dicts of tensors fine):
      reconstruction [B,C,H,W]; latent [B,embed_dim,h,w];
      kl: kl [B] (per-sample sum), posterior_mean, posterior_logvar;
      vq/fsq: reg_loss (scalar: codebook + beta * commitment for vq, 0 for fsq), usage, perplexity,
              batch_perplexity, indices, and for vq codebook_loss / commitment_loss;
      logvar: the learned NLL log-variance, when one was attached (see training.py).
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.kind = cfg.regularizer
        double = self.kind == "kl"   # mean and log-variance
        self.encoder = Encoder(cfg, 2 * cfg.z_channels if double else cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d((2 if double else 1) * cfg.z_channels, (2 if double else 1) * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if self.kind == "vq":
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=cfg.vq_beta, ema=cfg.vq_ema,
                                            ema_decay=cfg.vq_ema_decay, restart=cfg.vq_restart,
                                            restart_every=cfg.vq_restart_every,
                                            dead_threshold=cfg.vq_dead_threshold, usage_decay=cfg.vq_usage_decay)
        elif self.kind == "fsq":
            self.quantize = FSQ(cfg.fsq_levels, usage_decay=cfg.vq_usage_decay, dead_threshold=cfg.vq_dead_threshold)
        else:
            self.quantize = None

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.decoder.conv_out.weight

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: torch.Tensor, update: bool = False):
        """KL: a DiagonalGaussian posterior. VQ/FSQ: (quantized z, extras) with extras["z_e"]
        the pre-quantization latent and the quantizer's info (indices, losses, usage)."""
        h = self.quant_conv(self.encoder(x))
        if self.quantize is None:
            return DiagonalGaussian(h)
        zq, info = self.quantize(h, update=update)
        info["z_e"] = h
        return zq, info

    def decode(self, z: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latent -> image. `quantize=True` snaps a continuous latent onto the code grid first
        (VQ/FSQ, e.g. for latents produced by a diffusion model trained on pre-quantization z)."""
        if quantize and self.quantize is not None:
            z, _ = self.quantize(z, update=False)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                update: bool = True) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.quantize is None:
            posterior = self.encode(x)
            z = posterior.sample(generator) if sample else posterior.mode()
            out.update(kl=posterior.kl(), posterior_mean=posterior.mean, posterior_logvar=posterior.logvar)
        else:
            z, info = self.encode(x, update=update)
            out["reg_loss"] = info.pop("loss")
            info.pop("z_e")
            out.update(info)
        out["latent"] = z
        out["reconstruction"] = self.decode(z)
        logvar = getattr(self, "logvar", None)
        if isinstance(logvar, torch.Tensor):   # used inside forward, so ZeRO-3 gathers it with the rest
            out["logvar"] = logvar
        return out


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """The configured autoencoder with PyTorch's default init (works under torch.device("meta"))."""
    return Autoencoder(cfg)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
