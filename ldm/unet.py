"""Stable-Diffusion-style UNet: ResBlocks with a timestep embedding and SpatialTransformer blocks
(self-attention, cross-attention to text tokens, GEGLU feed-forward) at chosen levels.

The topology is the LDM one that diffusers' UNet2DConditionModel also implements, so `ldm.convert` maps
weights one-to-one; `configs/ldm/unet-sd15.yaml` has exactly SD1.5's 859,520,964 parameters.

Layout for channel_mult (m_0, ..., m_{n-1}) and model_channels C:
  conv_in -> down[i] (num_res_blocks x [ResBlock (+ transformer if i in attention_levels)], then a
  stride-2 conv except at the last level) -> mid (ResBlock, transformer, ResBlock) -> up[j] for the
  levels in reverse (num_res_blocks + 1 x [ResBlock on concat(h, skip) (+ transformer)], then
  nearest-neighbour x2 + conv except at the top) -> GroupNorm, SiLU, conv_out.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, prepare_context
from .conditioning import substitute_learned_null
from .embeddings import TimestepMLP, timestep_embedding, to_tokens


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class GEGLUFeedForward(nn.Module):
    """Linear to 2 x inner, value * GELU(gate), Linear back (Shazeer 2020; the SD feed-forward)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, inner * 2)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(value * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0, qk_norm: str = "none",
                 backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, qk_norm=qk_norm, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, qk_norm=qk_norm, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)

    def forward(self, x, context, context_mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, project in (1x1 conv or Linear), `depth` transformer blocks over the H*W tokens,
    project out, plus the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1, linear: bool = False,
                 groups: int = 32, dropout: float = 0.0, qk_norm: str = "none", backend: str = "sdpa"):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, dropout, qk_norm, backend)
                                    for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, context_mask=None):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = to_tokens(y)                                      # [B, H*W, C]
        if self.linear:
            y = self.proj_in(y)
        for block in self.blocks:
            y = block(y, context, context_mask)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # upsample to the skip's size (any latent size works, not only multiples of 2^levels)
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    """One resolution of the encoder or decoder path."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn: Optional[nn.ModuleList] = None
        self.resample: Optional[nn.Module] = None


class UNet(nn.Module):
    def __init__(self, cfg, pooled_dim: int = 0, learned_null_tokens: int = 0, attention_backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.emb_dim = emb_dim

        def heads_for(ch):
            return ch // cfg.head_dim if cfg.head_dim else cfg.num_heads

        def transformer(ch):
            return SpatialTransformer(ch, heads_for(ch), cfg.context_dim, cfg.transformer_depth,
                                      cfg.linear_projection, groups, cfg.dropout, cfg.qk_norm, attention_backend)

        self.time_embed = TimestepMLP(mc, emb_dim)
        self.pooled_embed = TimestepMLP(pooled_dim, emb_dim) if pooled_dim else None
        # Learned null caption (PixArt-style CFG); substituted for rows flagged by `drop`.
        self.null_context = nn.Parameter(torch.randn(learned_null_tokens, cfg.context_dim) / cfg.context_dim ** 0.5) \
            if learned_null_tokens else None
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim)) if learned_null_tokens and pooled_dim else None

        self.conv_in = nn.Conv2d(cfg.in_channels, mc, 3, padding=1)
        skips = [mc]
        ch = mc
        n_levels = len(cfg.channel_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            level = Level()
            out = mc * mult
            if i in cfg.attention_levels:
                level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResBlock(ch, out, emb_dim, cfg.dropout, groups))
                ch = out
                if level.attn is not None:
                    level.attn.append(transformer(ch))
                skips.append(ch)
            if i < n_levels - 1:
                level.resample = Downsample(ch)
                skips.append(ch)
            self.down.append(level)

        self.mid_res1 = ResBlock(ch, ch, emb_dim, cfg.dropout, groups)
        self.mid_attn = transformer(ch)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, cfg.dropout, groups)

        self.up = nn.ModuleList()           # up[0] is the deepest level (diffusers' up_blocks order)
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            level = Level()
            out = mc * mult
            if i in cfg.attention_levels:
                level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResBlock(ch + skips.pop(), out, emb_dim, cfg.dropout, groups))
                ch = out
                if level.attn is not None:
                    level.attn.append(transformer(ch))
            if i > 0:
                level.resample = Upsample(ch)
            self.up.append(level)

        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self.zero_init_outputs()

    def zero_init_outputs(self) -> None:
        """LDM's zero_module init: every ResBlock's last conv, every transformer's proj_out and conv_out
        start at zero, so each residual branch starts as the identity and the net outputs 0 (as DiT's
        adaLN-Zero). On the demo (1,300 steps) shape adherence was 89.9 % with it, 86.8 % with PyTorch's default.
        Weights loaded afterwards (import, resume) replace it."""
        outputs = [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        outputs += [m.proj_out for m in self.modules() if isinstance(m, SpatialTransformer)]
        for layer in outputs + [self.conv_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = enabled

    def _run(self, module, *args):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W]; t [B] network time (ldm/objectives.py); context [B, L, context_dim];
        context_mask [B, L] bool (True = attend); pooled [B, pooled_dim]; drop [B] bool (learned null)."""
        if context is None:
            raise ValueError("the UNet needs text context [B, L, context_dim]")
        context, context_mask, pooled = substitute_learned_null(context, context_mask, pooled, drop,
                                                                self.null_context, self.null_pooled)
        x = x.to(self.conv_in.weight.dtype)   # run in the weights' dtype (bf16/fp16 engines get fp32 batches)
        t = t.to(x.device).float().expand(x.shape[0]) if t.dim() == 0 else t.to(x.device)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if self.pooled_embed is not None:
            if pooled is None:
                raise ValueError("this UNet was built with pooled_dim > 0 and needs `pooled`")
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))
        context = prepare_context(context.to(x.dtype), context_mask)   # cross-attention projects real tokens only

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for j, res in enumerate(level.res):
                h = self._run(res, h, emb)
                if level.attn is not None:
                    h = self._run(level.attn[j], h, context, context_mask)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.mid_attn, h, context, context_mask)
        h = self._run(self.mid_res2, h, emb)
        for level in self.up:
            for j, res in enumerate(level.res):
                h = self._run(res, torch.cat([h, skips.pop()], dim=1), emb)
                if level.attn is not None:
                    h = self._run(level.attn[j], h, context, context_mask)
            if level.resample is not None:
                h = level.resample(h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))
