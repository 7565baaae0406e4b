"""The model pairs the training-step benchmark compares: ours and diffusers' class of the same network.

Each pair is built from one of our configs; the peer is built with the converters in `ldm.convert` /
`autoencoder.convert` and loaded with OUR weights, so both compute the same function (checked by
`check_equal` before anything is timed: a benchmark comparing different functions is worthless).

A "training step" is what the runtime does per micro-batch without the data pipeline: forward on a
fixed batch, a plain loss (MSE to a fixed target; the autoencoder: L1 reconstruction + 1e-6 KL), backward,
torch AdamW step, zero_grad. The same for both sides, so the ratio isolates the model implementation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------- configs
# UNet: the SD1.5 topology (4 levels, attention on the first three, 2 res blocks, 8 heads) at 64 channels,
# context width 256: 34.97 M parameters (the 34.9 M model), 16x16x4 latents, 77 text tokens.
UNET_KW = dict(in_channels=4, out_channels=4, sample_size=16, model_channels=64, channel_mult=(1, 2, 4, 4),
               num_res_blocks=2, attention_levels=(0, 1, 2), num_heads=8, transformer_depth=1, context_dim=256,
               linear_projection=False, norm_groups=32)
# Autoencoder: the kl-f8 topology (4 levels, mid attention) at width 32, one res block per level:
# 3.88 M parameters, 64 px images -> 4 x 8 x 8 latents.
AE_KW = dict(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=64, norm_groups=32)
# DiT: PixArt-alpha form (adaLN-single, cross-attention, caption projection) at DiT-S width:
# hidden 384, depth 12, 6 heads, patch 2 on the same 16x16x4 latents, 77 text tokens of width 256.
DIT_KW = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
              context_dim=256, learn_sigma=True)
# MMDiT: SD3 form (two weight streams, joint attention, RMS QK-norm, context-pre-only last block, pooled
# text) at the DiT row's width: hidden 384, depth 12, 6 heads, patch 2, 16x16x4 latents, 77 text tokens of
# width 256, pooled text of width 256.
MMDIT_KW = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                context_dim=256, qk_norm="rms")
MMDIT_POOLED = 256
TEXT_LEN = 77


@dataclass
class Pair:
    """Two modules computing the same function, and how to run one training step of either."""
    name: str                      # "unet" | "autoencoder" | "dit" | "mmdit"
    peer: str                      # the diffusers class name
    ours: nn.Module
    theirs: nn.Module
    batch: int
    inputs: dict                   # fixed tensors (fp32) shared by both sides
    run_ours: Callable[[nn.Module, dict], torch.Tensor]      # forward -> main output tensor
    run_theirs: Callable[[nn.Module, dict], torch.Tensor]
    loss: Callable[[torch.Tensor, dict], torch.Tensor]
    extra: dict = field(default_factory=dict)

    def params(self) -> int:
        return sum(p.numel() for p in self.ours.parameters())


def _perturb(module: nn.Module, scale: float, seed: int) -> nn.Module:
    """Make zero-initialised layers (adaLN-single, final layers, norms) informative for the equality check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def _denoiser_inputs(batch: int, in_ch: int, out_ch: int, side: int, ctx_dim: int, seed: int) -> dict:
    """Noisy latents, timesteps, padded captions (mask as in training) and a regression target."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, TEXT_LEN, ctx_dim, generator=g)
    lengths = torch.randint(4, TEXT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]
    x = torch.randn(batch, in_ch, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    return {"x": x, "t": t, "context": ctx, "mask": mask,
            "target": torch.randn(batch, out_ch, side, side, generator=g)}


def unet_pair(batch: int = 16, seed: int = 0, **overrides) -> Pair:
    from diffusers import UNet2DConditionModel

    from ldm.config import UNetConfig
    from ldm.convert import unet_diffusers_config, unet_to_diffusers
    from ldm.unet import UNet

    cfg = UNetConfig(**{**UNET_KW, **overrides})
    torch.manual_seed(seed)
    ours = _perturb(UNet(cfg), 0.01, seed)
    theirs = UNet2DConditionModel(**unet_diffusers_config(cfg))
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    inputs = _denoiser_inputs(batch, cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.context_dim, seed + 1)
    return Pair("unet", "UNet2DConditionModel", ours, theirs, batch, inputs,
                run_ours=lambda m, i: m(i["x"], i["t"], i["context"], i["mask"]),
                run_theirs=lambda m, i: m(i["x"], i["t"], encoder_hidden_states=i["context"],
                                          encoder_attention_mask=i["mask"]).sample,
                loss=lambda out, i: F.mse_loss(out.float(), i["target"]), extra={"config": cfg})


def dit_pair(batch: int = 16, seed: int = 0, **overrides) -> Pair:
    from diffusers import PixArtTransformer2DModel

    from ldm.config import DiTConfig
    from ldm.convert import dit_pixart_config, dit_to_pixart
    from ldm.dit import DiT

    cfg = DiTConfig(**{**DIT_KW, **overrides})
    torch.manual_seed(seed)
    ours = _perturb(DiT(cfg), 0.02, seed)
    theirs = PixArtTransformer2DModel(**dit_pixart_config(cfg))
    theirs.load_state_dict(dit_to_pixart(ours.state_dict(), cfg), strict=True)
    out_ch = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
    inputs = _denoiser_inputs(batch, cfg.in_channels, out_ch, cfg.input_size, cfg.context_dim, seed + 1)
    return Pair("dit", "PixArtTransformer2DModel", ours, theirs, batch, inputs,
                run_ours=lambda m, i: m(i["x"], i["t"], i["context"], i["mask"]),
                run_theirs=lambda m, i: m(i["x"], encoder_hidden_states=i["context"], timestep=i["t"],
                                          encoder_attention_mask=i["mask"].long()).sample,
                loss=lambda out, i: F.mse_loss(out.float(), i["target"]), extra={"config": cfg})


def mmdit_pair(batch: int = 16, seed: int = 0, pooled_dim: int = MMDIT_POOLED, **overrides) -> Pair:
    """SD3's transformer attends to every text token (no mask): ours is run unmasked too (same function,
    no caption packing)."""
    from diffusers import SD3Transformer2DModel

    from ldm.config import MMDiTConfig
    from ldm.convert_mmdit import mmdit_to_diffusers, sd3_diffusers_config
    from ldm.mmdit import MMDiT

    cfg = MMDiTConfig(**{**MMDIT_KW, **overrides})
    torch.manual_seed(seed)
    ours = _perturb(MMDiT(cfg, pooled_dim), 0.02, seed)
    theirs = SD3Transformer2DModel(**sd3_diffusers_config(cfg, pooled_dim))
    theirs.load_state_dict(mmdit_to_diffusers(ours.state_dict(), cfg, pooled_dim), strict=True)
    inputs = _denoiser_inputs(batch, cfg.in_channels, cfg.in_channels, cfg.input_size, cfg.context_dim, seed + 1)
    del inputs["mask"]
    inputs["pooled"] = torch.randn(batch, pooled_dim, generator=torch.Generator().manual_seed(seed + 2))
    return Pair("mmdit", "SD3Transformer2DModel", ours, theirs, batch, inputs,
                run_ours=lambda m, i: m(i["x"], i["t"], i["context"], pooled=i["pooled"]),
                run_theirs=lambda m, i: m(hidden_states=i["x"], encoder_hidden_states=i["context"],
                                          pooled_projections=i["pooled"], timestep=i["t"]).sample,
                loss=lambda out, i: F.mse_loss(out.float(), i["target"]), extra={"config": cfg})


class _DiffusersAEStep(nn.Module):
    """diffusers' AutoencoderKL as one training forward: encode, sample the posterior, decode."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, noise):
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * noise
        return self.vae.decode(z).sample, dist.mean, dist.logvar


class _OursAEStep(nn.Module):
    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, x, noise):
        post = self.ae.encode(x)
        z = post.mean + post.std * noise
        return self.ae.decode(z), post.mean, post.logvar


def _ae_loss(out, i):
    rec, mean, logvar = out
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1).mean()
    return F.l1_loss(rec.float(), i["x"]) + 1e-6 * kl


def autoencoder_pair(batch: int = 4, seed: int = 0, **overrides) -> Pair:
    from diffusers import AutoencoderKL

    from autoencoder import convert
    from autoencoder.config import AutoencoderConfig
    from autoencoder.model import build_autoencoder

    cfg = AutoencoderConfig(**{**AE_KW, **overrides})
    torch.manual_seed(seed)
    ae = _perturb(build_autoencoder(cfg), 0.01, seed)
    vae = AutoencoderKL(**convert.diffusers_config(cfg))
    vae.load_state_dict(convert.to_diffusers(ae.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    s, f = cfg.resolution, cfg.downsample_factor
    inputs = {"x": torch.rand(batch, cfg.in_channels, s, s, generator=g) * 2 - 1,
              "noise": torch.randn(batch, cfg.embed_dim, s // f, s // f, generator=g)}
    return Pair("autoencoder", "AutoencoderKL", _OursAEStep(ae), _DiffusersAEStep(vae), batch, inputs,
                run_ours=lambda m, i: m(i["x"], i["noise"]), run_theirs=lambda m, i: m(i["x"], i["noise"]),
                loss=_ae_loss, extra={"config": cfg})


PAIRS = {"autoencoder": autoencoder_pair, "unet": unet_pair, "dit": dit_pair, "mmdit": mmdit_pair}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def max_abs_diff(pair: Pair, dtype: torch.dtype = torch.float32) -> float:
    """Largest |ours - peer| over the main output, both in eval mode, fp32 or under bf16 autocast."""
    a_mod, b_mod = pair.ours.eval(), pair.theirs.eval()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            a = _first(pair.run_ours(a_mod, pair.inputs)).float()
            b = _first(pair.run_theirs(b_mod, pair.inputs)).float()
    finally:
        a_mod.train(), b_mod.train()
    return float((a - b).abs().max())


def output_scale(pair: Pair) -> float:
    with torch.no_grad():
        return float(_first(pair.run_ours(pair.ours.eval(), pair.inputs)).float().abs().mean())


def trainer(pair: Pair, side: str, dtype: torch.dtype, lr: float = 1e-4, device: str = "cpu"):
    """A closure running one training step of `side` ("ours" | "peer"): forward under autocast when bf16
    (fp32 weights, as the runtime trains), loss, backward, AdamW step, zero_grad. torch's AdamW with
    fused=True on both sides: one kernel per parameter (3.5x faster than the default per-tensor loop on
    this CPU), so the optimizer, identical for both, takes less of the step."""
    module = pair.ours if side == "ours" else pair.theirs
    run = pair.run_ours if side == "ours" else pair.run_theirs
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, fused=True)
    bf16 = dtype == torch.bfloat16

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = pair.loss(run(module, pair.inputs), pair.inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def clone_pair(pair: Pair) -> Pair:
    """A deep copy (training steps change the weights; equality checks want the loaded ones)."""
    return copy.deepcopy(pair)
