"""Tiny diffusers models for the init tests, built and saved by diffusers itself (a uniquely named module)."""
from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VAE_SCALE = 0.7


def _jitter(model, seed: int, scale: float = 0.05):
    """Random weights everywhere (zero-initialised layers would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_unet(seed: int = 0):
    """The unet-small topology (configs/ldm/unet-small.yaml) as diffusers spells it, written by hand."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _jitter(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=4, norm_num_groups=8), seed)


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _jitter(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=VAE_SCALE), seed, 0.02)


def tiny_pixart(seed: int = 2, sample_size: int = 8):
    """A PixArt transformer matching a small PixArt-form DiT (hidden 64, 2 layers, patch 2, text 128)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return _jitter(PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=64, sample_size=sample_size, patch_size=2, caption_channels=128,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
        use_additional_conditions=False, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000), seed, 0.05)


PIXART_OVERRIDES = ["denoiser.kind=dit", "denoiser.learned_null_tokens=0", "conditioning.null_embedding=empty",
                    "denoiser.dit.input_size=8", "denoiser.dit.patch_size=2", "denoiser.dit.in_channels=4",
                    "denoiser.dit.hidden_size=64", "denoiser.dit.depth=2", "denoiser.dit.num_heads=4",
                    "denoiser.dit.context_dim=128", "denoiser.dit.adaln=single", "denoiser.dit.qk_norm=none",
                    "denoiser.dit.pos_embed=sincos", "denoiser.dit.learn_sigma=false"]


def save_pipeline_parts(out: Path, **models) -> Path:
    """save_pretrained each model into OUT/<name>/ plus a model_index.json naming them."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
    for name, model in models.items():
        model.save_pretrained(str(out / name))
        index[name] = ["diffusers", type(model).__name__]
    (out / "model_index.json").write_text(json.dumps(index))
    return out
