"""Diffusion Transformer over latent patches, conditioned on text by cross-attention (PixArt-alpha).

Per block:  x += g1 * SelfAttn(modulate(LN(x), s1, c1))
            x += CrossAttn(x, text)                         (PixArt places it unmodulated, without a norm)
            x += g2 * MLP(modulate(LN(x), s2, c2))
The six modulation vectors (shift, scale, gate for the two branches) come from the conditioning vector
c = time embedding (+ pooled text) (+ class label) in one of two ways:
- adaLN-Zero (DiT): each block owns SiLU -> Linear(c -> 6 dim), zero-initialised, so every block starts
  as the identity and the network outputs exactly zero at init;
- adaLN-single (PixArt-alpha): one shared SiLU -> Linear(c -> 6 dim) (`t_block`) plus a learned
  per-block [6, dim] table added to it; ~27% fewer parameters at DiT-XL size.
The final layer (LN, modulate, Linear to p*p*out channels) is zero-initialised in both forms.
Text: the caption tokens pass an MLP (context_dim -> dim -> dim, tanh-GELU) and are attended with a
padding mask. Optional QK-norm (RMS or LayerNorm per head, SD3). Positions: fixed 2-D sin-cos (rescaled
to the training grid at other resolutions) or learned (initialised from sin-cos).
With num_classes > 0, cross_attention off, adaln "zero" and learn_sigma on, this is the class-conditional
DiT of Peebles & Xie (DiT-XL/2: 675 M parameters).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, prepare_context
from .conditioning import substitute_learned_null
from .embeddings import TimestepMLP, sincos_pos_embed_2d, timestep_embedding, to_tokens

FREQ_DIM = 256   # sinusoidal features fed to the time MLP (DiT, PixArt)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x * (1 + scale) + shift as one fused op over the tokens (one pass instead of two)
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh")))


class CaptionProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_attention: bool, adaln: str,
                 qk_norm: str = "none", dropout: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        self.adaln = adaln
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True, qk_norm=qk_norm, dropout=dropout, backend=backend)
        self.cross_attn = Attention(dim, heads, context_dim=dim, qkv_bias=True, qk_norm=qk_norm, dropout=dropout,
                                    backend=backend) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)
        if adaln == "zero":
            self.modulation = nn.Linear(dim, 6 * dim)
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, c, context=None, context_mask=None):
        """c: [B, dim] (adaLN-Zero) or the shared [B, 6*dim] modulation (adaLN-single)."""
        b, _, d = x.shape
        if self.adaln == "zero":
            mod = self.modulation(F.silu(c)).view(b, 6, d)
        else:
            mod = self.scale_shift_table[None] + c.view(b, 6, d)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        # gated residuals x + gate * branch as one fused op each
        x = torch.addcmul(x, gate1[:, None], self.attn(modulate(self.norm1(x), shift1, scale1)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, context_mask)
        return torch.addcmul(x, gate2[:, None], self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, adaln: str):
        super().__init__()
        self.adaln = adaln
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        if adaln == "zero":
            self.modulation = nn.Linear(dim, 2 * dim)
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        if self.adaln == "zero":
            shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        else:
            shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg, pooled_dim: int = 0, learned_null_tokens: int = 0, attention_backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        dim, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.grid = cfg.input_size // p

        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid * self.grid, dim)) if cfg.pos_embed == "learned" else None
        self.t_embed = TimestepMLP(FREQ_DIM, dim)
        self.t_block = nn.Linear(dim, 6 * dim) if cfg.adaln == "single" else None
        self.label_embed = nn.Embedding(cfg.num_classes + 1, dim) if cfg.num_classes else None  # +1: null label
        self.pooled_embed = TimestepMLP(pooled_dim, dim) if pooled_dim else None
        self.caption_proj = CaptionProjection(cfg.context_dim, dim) \
            if cfg.cross_attention and cfg.caption_projection else None
        # Learned null caption in text space, before the projection (PixArt's y_embedding).
        self.null_context = nn.Parameter(torch.randn(learned_null_tokens, cfg.context_dim) / cfg.context_dim ** 0.5) \
            if learned_null_tokens else None
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim)) if learned_null_tokens and pooled_dim else None
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.cross_attention, cfg.adaln,
                                             cfg.qk_norm, cfg.dropout, attention_backend) for _ in range(cfg.depth))
        self.final = FinalLayer(dim, p * p * self.out_channels, cfg.adaln)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Explicit init (DiT/PixArt): Xavier for linears, normal(0.02) for the time/label/caption
        embedders, then the zeros that make the model start from a known state."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.pos_embed is not None:
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.grid, self.grid,
                                                     device=self.pos_embed.device))
        for lin in (self.t_embed.linear_1, self.t_embed.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        if self.t_block is not None:
            nn.init.normal_(self.t_block.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        if self.caption_proj is not None:
            nn.init.normal_(self.caption_proj.linear_1.weight, std=0.02)
            nn.init.normal_(self.caption_proj.linear_2.weight, std=0.02)
        for block in self.blocks:
            if block.adaln == "zero":          # adaLN-Zero: every block starts as the identity
                nn.init.zeros_(block.modulation.weight)
                nn.init.zeros_(block.modulation.bias)
            if block.cross_attn is not None:   # text enters gradually (PixArt)
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        if self.final.adaln == "zero":
            nn.init.zeros_(self.final.modulation.weight)
            nn.init.zeros_(self.final.modulation.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = enabled

    def _positions(self, gh: int, gw: int, device, dtype) -> torch.Tensor:
        if self.pos_embed is None:
            return sincos_pos_embed_2d(self.cfg.hidden_size, gh, gw, device=device,
                                       base=(self.grid, self.grid)).to(dtype)
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed.to(dtype)
        grid = self.pos_embed.view(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(dtype)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.out_channels
        x = x.view(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W]; t [B] network time (ldm/objectives.py); context [B, L, context_dim];
        context_mask [B, L] bool; pooled [B, pooled_dim]; drop [B] bool (learned null / null label);
        labels [B] long (class form). Returns [B, out_channels, H, W]."""
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
        gh, gw = h // p, w // p
        x = x.to(self.patch_embed.weight.dtype)   # run in the weights' dtype (bf16/fp16 engines get fp32 batches)
        tokens = to_tokens(self.patch_embed(x))
        tokens = tokens + self._positions(gh, gw, x.device, tokens.dtype)[None]

        t = t.to(x.device).float().expand(b) if t.dim() == 0 else t.to(x.device)
        c = self.t_embed(timestep_embedding(t, FREQ_DIM).to(tokens.dtype))
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("this DiT is class-conditional and needs `labels`")
            if drop is not None:
                labels = torch.where(drop.to(torch.bool), torch.full_like(labels, self.cfg.num_classes), labels)
            c = c + self.label_embed(labels)
        if self.cfg.cross_attention:
            if context is None:
                raise ValueError("this DiT cross-attends to text and needs `context` [B, L, context_dim]")
            context, context_mask, pooled = substitute_learned_null(context, context_mask, pooled, drop,
                                                                    self.null_context, self.null_pooled)
            # padding is never attended: packed away before the caption projection
            context = prepare_context(context.to(tokens.dtype), context_mask, self.caption_proj)
        if self.pooled_embed is not None:
            if pooled is None:
                raise ValueError("this DiT was built with pooled_dim > 0 and needs `pooled`")
            c = c + self.pooled_embed(pooled.to(c.dtype))
        block_c = self.t_block(F.silu(c)) if self.t_block is not None else c

        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, block_c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, block_c, context, context_mask)
        return self.unpatchify(self.final(tokens, c), gh, gw)
