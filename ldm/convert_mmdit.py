"""MMDiT weights and config to and from diffusers' SD3Transformer2DModel (SD3 / SD3.5 without MMDiT-X).

The mapping is one-to-one except three exact re-layouts:
- our fused q/k/v Linear per stream <-> diffusers' to_q/to_k/to_v (image) and add_q_proj/add_k_proj/
  add_v_proj (text): split / concatenated along the output rows;
- two-vector modulations (the final layer, the text stream of the context-pre-only block): ours are
  (shift, scale), diffusers' AdaLayerNormContinuous is (scale, shift): the halves swap;
- positions: ours [M*M, dim], diffusers' buffer [1, M*M, dim].
Not representable there, so refused with the reason: RoPE, no absolute positions, no pooled text
(SD3 always embeds it), mlp_ratio != 4, a last block that is not context-pre-only. The learned null
caption has no counterpart and is left out (diffusers pipelines use the empty prompt as the negative).
Names come from our module tree (built on the meta device), so both directions stay in sync.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from .config import MMDiTConfig

_NULL_KEYS = ("null_context", "null_pooled")
_QK_NORM = {"none": None, "rms": "rms_norm", "layer": "layer_norm"}


def sd3_incompatibilities(cfg: MMDiTConfig, pooled_dim: int) -> list[str]:
    reasons = []
    if cfg.rope:
        reasons.append("2-D RoPE")
    if cfg.pos_embed == "none":
        reasons.append("no absolute positions (SD3 always adds its position grid)")
    if not pooled_dim:
        reasons.append("no pooled text (SD3 always embeds it: set denoiser.pooled_dim)")
    if cfg.mlp_ratio != 4.0:
        reasons.append(f"mlp_ratio {cfg.mlp_ratio} (SD3's feed-forward is 4x)")
    if not cfg.context_pre_only:
        reasons.append("a last block with a text output (SD3's last block is context-pre-only)")
    return reasons


def sd3_diffusers_config(cfg: MMDiTConfig, pooled_dim: int) -> dict:
    """Keyword arguments of diffusers' SD3Transformer2DModel for the same network."""
    return {
        "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels or cfg.in_channels,
        "num_layers": cfg.depth,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": pooled_dim,
        "pos_embed_max_size": cfg.pos_embed_max_size or cfg.input_size // cfg.patch_size,
        "dual_attention_layers": (),
        "qk_norm": _QK_NORM[cfg.qk_norm],
    }


def mmdit_config_from_diffusers(config: Mapping) -> tuple[MMDiTConfig, int]:
    """A diffusers SD3Transformer2DModel config -> (MMDiTConfig, pooled_dim)."""
    if config.get("dual_attention_layers"):
        raise ValueError("SD3.5's MMDiT-X (dual_attention_layers) is not supported")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    if config.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
        raise ValueError("caption_projection_dim must equal num_attention_heads * attention_head_dim")
    qk = {v: k for k, v in _QK_NORM.items()}[config.get("qk_norm")]
    patch = config["patch_size"]
    cfg = MMDiTConfig(input_size=config["sample_size"], patch_size=patch, in_channels=config["in_channels"],
                      out_channels=config.get("out_channels"), hidden_size=heads * head_dim,
                      depth=config["num_layers"], num_heads=heads, context_dim=config["joint_attention_dim"],
                      qk_norm=qk, pos_embed="sincos", pos_embed_max_size=config["pos_embed_max_size"])
    cfg.validate()
    return cfg, config["pooled_projection_dim"]


# ------------------------------------------------------------------------------------------ key rules

def _swap(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _rules(cfg: MMDiTConfig):
    """(our key pattern, [diffusers names], to-diffusers fn, from-diffusers fn) in order of matching."""
    last = cfg.depth - 1
    pre_only = rf"{last}" if cfg.context_pre_only else r"(?!)"
    ident = (lambda t: [t]), (lambda ts: ts[0])
    split3 = (lambda t: list(t.chunk(3, dim=0))), (lambda ts: torch.cat(ts, dim=0))
    swap = (lambda t: [_swap(t)]), (lambda ts: _swap(ts[0]))
    pos = (lambda t: [t[None]]), (lambda ts: ts[0][0])
    tb = r"^blocks\.(\d+)\."
    return [
        (r"^pos_embed$", ["pos_embed.pos_embed"], *pos),
        (r"^patch_embed\.(weight|bias)$", [r"pos_embed.proj.\1"], *ident),
        (r"^t_embed\.(linear_[12]\.(?:weight|bias))$", [r"time_text_embed.timestep_embedder.\1"], *ident),
        (r"^pooled_embed\.(linear_[12]\.(?:weight|bias))$", [r"time_text_embed.text_embedder.\1"], *ident),
        (r"^context_embed\.(weight|bias)$", [r"context_embedder.\1"], *ident),
        (tb + r"img_mod\.(weight|bias)$", [r"transformer_blocks.\1.norm1.linear.\2"], *ident),
        (rf"^blocks\.({pre_only})\.txt_mod\.(weight|bias)$", [r"transformer_blocks.\1.norm1_context.linear.\2"],
         *swap),
        (tb + r"txt_mod\.(weight|bias)$", [r"transformer_blocks.\1.norm1_context.linear.\2"], *ident),
        (tb + r"attn\.img_qkv\.(weight|bias)$",
         [rf"transformer_blocks.\1.attn.to_{n}.\2" for n in "qkv"], *split3),
        (tb + r"attn\.txt_qkv\.(weight|bias)$",
         [rf"transformer_blocks.\1.attn.add_{n}_proj.\2" for n in "qkv"], *split3),
        (tb + r"attn\.img_q_norm\.(weight|bias)$", [r"transformer_blocks.\1.attn.norm_q.\2"], *ident),
        (tb + r"attn\.img_k_norm\.(weight|bias)$", [r"transformer_blocks.\1.attn.norm_k.\2"], *ident),
        (tb + r"attn\.txt_q_norm\.(weight|bias)$", [r"transformer_blocks.\1.attn.norm_added_q.\2"], *ident),
        (tb + r"attn\.txt_k_norm\.(weight|bias)$", [r"transformer_blocks.\1.attn.norm_added_k.\2"], *ident),
        (tb + r"attn\.img_out\.(weight|bias)$", [r"transformer_blocks.\1.attn.to_out.0.\2"], *ident),
        (tb + r"attn\.txt_out\.(weight|bias)$", [r"transformer_blocks.\1.attn.to_add_out.\2"], *ident),
        (tb + r"img_mlp\.fc1\.(weight|bias)$", [r"transformer_blocks.\1.ff.net.0.proj.\2"], *ident),
        (tb + r"img_mlp\.fc2\.(weight|bias)$", [r"transformer_blocks.\1.ff.net.2.\2"], *ident),
        (tb + r"txt_mlp\.fc1\.(weight|bias)$", [r"transformer_blocks.\1.ff_context.net.0.proj.\2"], *ident),
        (tb + r"txt_mlp\.fc2\.(weight|bias)$", [r"transformer_blocks.\1.ff_context.net.2.\2"], *ident),
        (r"^final\.modulation\.(weight|bias)$", [r"norm_out.linear.\1"], *swap),
        (r"^final\.linear\.(weight|bias)$", [r"proj_out.\1"], *ident),
    ]


def _match(key: str, rules) -> tuple[list[str], Callable, Callable]:
    for pat, names, to_fn, from_fn in rules:
        m = re.match(pat, key)
        if m:
            return [m.expand(n) for n in names], to_fn, from_fn
    raise KeyError(f"no diffusers SD3 name for MMDiT parameter {key!r}")


def _check(cfg: MMDiTConfig, pooled_dim: int) -> None:
    reasons = sd3_incompatibilities(cfg, pooled_dim)
    if reasons:
        raise ValueError("this MMDiT does not match diffusers' SD3Transformer2DModel: " + "; ".join(reasons))


def mmdit_to_diffusers(state: Mapping[str, torch.Tensor], cfg: MMDiTConfig, pooled_dim: int
                       ) -> dict[str, torch.Tensor]:
    _check(cfg, pooled_dim)
    rules, out = _rules(cfg), {}
    for key, value in state.items():
        if key.startswith(_NULL_KEYS):
            continue
        names, to_fn, _ = _match(key, rules)
        out.update(zip(names, to_fn(value)))
    return out


def _our_keys(cfg: MMDiTConfig, pooled_dim: int) -> list[str]:
    from .mmdit import MMDiT
    with torch.device("meta"):
        return list(MMDiT(cfg, pooled_dim).state_dict())


def mmdit_from_diffusers(state: Mapping[str, torch.Tensor], cfg: MMDiTConfig, pooled_dim: int
                         ) -> dict[str, torch.Tensor]:
    _check(cfg, pooled_dim)
    rules, out, used = _rules(cfg), {}, set()
    missing = []
    for key in _our_keys(cfg, pooled_dim):
        names, _, from_fn = _match(key, rules)
        absent = [n for n in names if n not in state]
        if absent:
            missing += absent
            continue
        out[key] = from_fn([state[n] for n in names])
        used.update(names)
    extra = [k for k in state if k not in used]
    if missing or extra:
        raise KeyError(f"diffusers SD3 state does not match the config: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")
    return out
