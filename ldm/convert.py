"""Weights and configs between our denoisers and diffusers.

- UNet <-> `UNet2DConditionModel`: one-to-one for every topology `UNetConfig` allows, except
  qk_norm != "none" and pooled_dim > 0 (diffusers has no such inputs for this model) - refused.
  A learned null caption (`null_context`, `null_pooled`) has no diffusers counterpart and is left out
  (diffusers pipelines use the empty prompt as the negative).
- DiT -> `PixArtTransformer2DModel`: only the PixArt form converts: adaln "single", cross_attention on
  with caption_projection, sincos positions, qk_norm "none", mlp_ratio 4, no class labels, no pooled
  text. adaLN-Zero, QK-norm, learned positions, class labels and pooled text have no slot there and
  are refused with the reason; `null_context` is left out as above. learn_sigma maps to out_channels.
- MMDiT <-> `SD3Transformer2DModel`: ldm/convert_mmdit.py.
Names are derived from our module tree (built on the meta device), so both directions stay in sync.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .config import DenoiserConfig, DiTConfig, UNetConfig

_NULL_KEYS = ("null_context", "null_pooled")


# ----------------------------------------------------------------------------------------------- UNet

def unet_diffusers_config(cfg: UNetConfig) -> dict:
    """Keyword arguments of diffusers' UNet2DConditionModel for the same network."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = [c // cfg.head_dim if cfg.head_dim else cfg.num_heads for c in chans]
    attn = set(cfg.attention_levels)
    return {
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(chans))],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(chans)))],
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' historical name: `attention_head_dim` is read as the number of heads per block
        "attention_head_dim": heads,
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.linear_projection,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "dropout": cfg.dropout,
    }


_UNET_INNER = [  # (our pattern, diffusers replacement), applied in order on the remainder of a key
    (r"^emb_proj\.", "time_emb_proj."),
    (r"^skip\.", "conv_shortcut."),
    (r"^blocks\.(\d+)\.", r"transformer_blocks.\1."),
    (r"\.attn([12])\.to_out\.", r".attn\1.to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
]


def _inner(rest: str) -> str:
    for pat, rep in _UNET_INNER:
        rest = re.sub(pat, rep, rest)
    return rest


def unet_key_to_diffusers(key: str) -> str:
    m = re.match(r"^(down|up)\.(\d+)\.(res|attn)\.(\d+)\.(.*)$", key)
    if m:
        side, i, kind, j, rest = m.groups()
        block = "down_blocks" if side == "down" else "up_blocks"
        sub = "resnets" if kind == "res" else "attentions"
        return f"{block}.{i}.{sub}.{j}.{_inner(rest)}"
    m = re.match(r"^(down|up)\.(\d+)\.resample\.(.*)$", key)
    if m:
        side, i, rest = m.groups()
        return f"{side}_blocks.{i}.{'downsamplers' if side == 'down' else 'upsamplers'}.0.{rest}"
    for ours, theirs in (("mid_res1.", "mid_block.resnets.0."), ("mid_attn.", "mid_block.attentions.0."),
                         ("mid_res2.", "mid_block.resnets.1.")):
        if key.startswith(ours):
            return theirs + _inner(key[len(ours):])
    for ours, theirs in (("time_embed.", "time_embedding."), ("norm_out.", "conv_norm_out."),
                         ("conv_in.", "conv_in."), ("conv_out.", "conv_out.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(f"no diffusers name for UNet parameter {key!r}")


def _check_unet_convertible(cfg: UNetConfig, state: Mapping[str, torch.Tensor]) -> None:
    if cfg.qk_norm != "none":
        raise ValueError("a UNet with qk_norm has no diffusers UNet2DConditionModel equivalent")
    if any(k.startswith("pooled_embed.") for k in state):
        raise ValueError("a UNet with pooled text conditioning (pooled_dim > 0) has no diffusers equivalent here")


def _our_unet_keys(cfg: UNetConfig) -> list[str]:
    from .unet import UNet
    with torch.device("meta"):
        return [k for k in UNet(cfg).state_dict() if not k.startswith(_NULL_KEYS)]


def unet_to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    _check_unet_convertible(cfg, state)
    return {unet_key_to_diffusers(k): v for k, v in state.items() if not k.startswith(_NULL_KEYS)}


def unet_from_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    names = {unet_key_to_diffusers(k): k for k in _our_unet_keys(cfg)}
    missing = [k for k in names if k not in state]
    extra = [k for k in state if k not in names]
    if missing or extra:
        raise KeyError(f"diffusers UNet state does not match the config: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")
    return {names[k]: v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------- DiT

def pixart_incompatibilities(cfg: DiTConfig, pooled_dim: int = 0) -> list[str]:
    reasons = []
    if cfg.adaln != "single":
        reasons.append("adaLN-Zero (PixArt uses adaLN-single)")
    if not cfg.cross_attention or not cfg.caption_projection:
        reasons.append("no cross-attention with caption projection")
    if cfg.qk_norm != "none":
        reasons.append("QK-norm")
    if cfg.pos_embed != "sincos":
        reasons.append("learned positions (PixArt's are fixed sin-cos)")
    if cfg.num_classes:
        reasons.append("class labels")
    if cfg.mlp_ratio != 4.0:
        reasons.append(f"mlp_ratio {cfg.mlp_ratio} (PixArt's feed-forward is 4x)")
    if pooled_dim:
        reasons.append("pooled text conditioning")
    return reasons


def dit_pixart_config(cfg: DiTConfig) -> dict:
    return {
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels,
        "num_layers": cfg.depth,
        "dropout": cfg.dropout,
        "cross_attention_dim": cfg.hidden_size,
        "attention_bias": True,
        "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": 1,
        "use_additional_conditions": False,
        "caption_channels": cfg.context_dim,
    }


_DIT_RULES = [
    (r"^patch_embed\.", "pos_embed.proj."),
    (r"^t_embed\.", "adaln_single.emb.timestep_embedder."),
    (r"^t_block\.", "adaln_single.linear."),
    (r"^caption_proj\.", "caption_projection."),
    (r"^blocks\.(\d+)\.attn\.to_out\.", r"transformer_blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.attn\.", r"transformer_blocks.\1.attn1."),
    (r"^blocks\.(\d+)\.cross_attn\.to_out\.", r"transformer_blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.", r"transformer_blocks.\1.attn2."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"transformer_blocks.\1.scale_shift_table"),
    (r"^final\.scale_shift_table$", "scale_shift_table"),
    (r"^final\.linear\.", "proj_out."),
]


def dit_key_to_pixart(key: str) -> str:
    for pat, rep in _DIT_RULES:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    raise KeyError(f"no PixArt name for DiT parameter {key!r}")


def dit_to_pixart(state: Mapping[str, torch.Tensor], cfg: DiTConfig, pooled_dim: int = 0
                  ) -> dict[str, torch.Tensor]:
    reasons = pixart_incompatibilities(cfg, pooled_dim)
    if reasons:
        raise ValueError("this DiT does not match diffusers' PixArtTransformer2DModel: " + "; ".join(reasons))
    return {dit_key_to_pixart(k): v for k, v in state.items() if not k.startswith(_NULL_KEYS)}


# ----------------------------------------------------------------------------------------------- export

def to_diffusers(state: Mapping[str, torch.Tensor], cfg: DenoiserConfig) -> tuple[str, dict, dict]:
    """-> (diffusers class name, its config kwargs, its state dict). For `ldm export --format diffusers`:
    the UNet goes to OUT/unet/, the DiT and the MMDiT to OUT/transformer/."""
    if cfg.kind == "unet":
        return "UNet2DConditionModel", unet_diffusers_config(cfg.unet), unet_to_diffusers(state, cfg.unet)
    if cfg.kind == "mmdit":
        from .convert_mmdit import mmdit_to_diffusers, sd3_diffusers_config
        return ("SD3Transformer2DModel", sd3_diffusers_config(cfg.mmdit, cfg.pooled_dim),
                mmdit_to_diffusers(state, cfg.mmdit, cfg.pooled_dim))
    return "PixArtTransformer2DModel", dit_pixart_config(cfg.dit), dit_to_pixart(state, cfg.dit, cfg.pooled_dim)


# ----------------------------------------------------------------------------------------------- import

def _ident(ts):
    return ts[0]


def diffusers_source_names(cfg: DenoiserConfig, our_keys) -> tuple[dict, list[str]]:
    """For initialising our denoiser from a diffusers model (launch/runtime/init.py): {our key: ([diffusers
    names], fn joining those tensors into ours)} for every key that has a diffusers counterpart, and the
    keys that have none (a learned null caption, a sin-cos table diffusers recomputes)."""
    mapping, none = {}, []
    if cfg.kind == "mmdit":
        from .convert_mmdit import _match, _rules
        rules = _rules(cfg.mmdit)
    for key in our_keys:
        if key.startswith(_NULL_KEYS):
            none.append(key)
            continue
        try:
            if cfg.kind == "unet":
                mapping[key] = ([unet_key_to_diffusers(key)], _ident)
            elif cfg.kind == "dit":
                mapping[key] = ([dit_key_to_pixart(key)], _ident)
            else:
                names, _, from_fn = _match(key, rules)
                mapping[key] = (names, from_fn)
        except KeyError:
            none.append(key)
    return mapping, none


def diffusers_class(cfg: DenoiserConfig) -> str:
    return {"unet": "UNet2DConditionModel", "dit": "PixArtTransformer2DModel",
            "mmdit": "SD3Transformer2DModel"}[cfg.kind]


def diffusers_config_for(cfg: DenoiserConfig) -> dict:
    """The diffusers config kwargs our configured denoiser corresponds to (for comparing with a source's)."""
    if cfg.kind == "unet":
        return unet_diffusers_config(cfg.unet)
    if cfg.kind == "mmdit":
        from .convert_mmdit import sd3_diffusers_config
        return sd3_diffusers_config(cfg.mmdit, cfg.pooled_dim)
    return dit_pixart_config(cfg.dit)
