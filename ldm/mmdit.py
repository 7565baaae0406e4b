"""MMDiT (Stable Diffusion 3, Esser et al. 2024): image and text tokens with their own weights, one joint
attention over both.

Per block, each stream s in (image, text) has its own adaLN-Zero modulation, q/k/v, output projection
and MLP; the attention itself is shared:
    (shift1, scale1, gate1, shift2, scale2, gate2)_s = Linear_s(SiLU(c))          zero-initialised
    q_s, k_s, v_s = QKV_s(modulate(LN(x_s), shift1_s, scale1_s)),  QK-norm per head (RMS or LayerNorm)
    o_img, o_txt = Attention([q_img; q_txt], [k_img; k_txt], [v_img; v_txt])       one softmax over both
    x_s += gate1_s * Out_s(o_s)
    x_s += gate2_s * MLP_s(modulate(LN(x_s), shift2_s, scale2_s))
c = time embedding + pooled-text embedding. With `context_pre_only` the last block (SD3) keeps only what
the image needs from the text: its text stream has shift/scale (no gates, no output projection, no MLP),
and its text queries are skipped here (their outputs would be thrown away).
Image tokens: patchify (a p x p conv), plus positions from a [M, M] grid centre-cropped to the token grid
(SD3's pos_embed_max_size; fixed sin-cos or learned), and/or 2-D RoPE on image q/k (text tokens unrotated,
i.e. at position 0 as in Flux). Text: one Linear from the joined encoder width to the model width.
Padding of the text can be masked out of the keys (`context_mask`); SD3 attends to every token.
Same call as our DiT: forward(x, t, context, context_mask, pooled, drop). Converts to diffusers'
SD3Transformer2DModel (ldm/convert_mmdit.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, cast_for_autocast, make_qk_norm, scores_scale
from .conditioning import substitute_learned_null
from .dit import FREQ_DIM, FinalLayer, Mlp, modulate
from .embeddings import TimestepMLP, sincos_pos_embed_2d, timestep_embedding, to_tokens


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)    # no affine: modulation provides scale and shift


def rope_2d(gh: int, gw: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [gh*gw, head_dim] for row-major image tokens: the first quarter of frequencies turns with
    the row index, the second with the column index, laid out for `rotate_half` pairs (i, i + d/2)."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows = torch.arange(gh, dtype=torch.float64, device=device).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64, device=device).repeat(gh)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, d] rotated by position: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class _SplitQKV(torch.autograd.Function):
    """q, k, v [B, heads, N, d]: views of one fused projection [B, N, 3 * heads * d]. Autograd through
    view -> permute -> unbind stacks the three gradients into a new tensor and copies that once more into
    the projection's layout; this backward writes each gradient straight into that layout (one pass)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int):
        b, n, width = qkv.shape
        return qkv.view(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        b, heads, n, d = grads[0].shape
        grad = grads[0].new_empty(b, n, 3, heads, d)
        for i, g in enumerate(grads):
            slot = grad[:, :, i].transpose(1, 2)    # [B, heads, N, d] view into the projection's layout
            slot.copy_(g)
        return grad.view(b, n, 3 * heads * d), None


class JointAttention(nn.Module):
    """q/k/v and output projections per stream (one fused Linear for q, k, v), one attention over both."""

    def __init__(self, dim: int, heads: int, qk_norm: str = "rms", context_pre_only: bool = False,
                 backend: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} not divisible by {heads} heads")
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.context_pre_only = context_pre_only
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.img_q_norm = make_qk_norm(qk_norm, self.head_dim, query=True)
        self.img_k_norm = make_qk_norm(qk_norm, self.head_dim)
        self.txt_q_norm = make_qk_norm(qk_norm, self.head_dim, query=True)
        self.txt_k_norm = make_qk_norm(qk_norm, self.head_dim)
        self.img_out = nn.Linear(dim, dim)
        self.txt_out = None if context_pre_only else nn.Linear(dim, dim)

    def _heads(self, qkv: torch.Tensor):
        return _SplitQKV.apply(qkv, self.heads)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """img [B, N, dim], txt [B, L, dim]; key_mask [B, N + L] bool (True = attend) or None;
        rope: (cos, sin) for the N image tokens. Returns (image output, text output or None)."""
        b, n, dim = img.shape
        q, k, v = self._heads(self.img_qkv(img))
        q, k = self.img_q_norm(q), self.img_k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        tq, tk, tv = self._heads(self.txt_qkv(txt))
        tk = self.txt_k_norm(tk)
        k, v = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        if not self.context_pre_only:
            q = torch.cat([q, self.txt_q_norm(tq)], dim=2)
        out = attention(q, k, v, key_mask, backend=self.backend,    # [B, heads, N (+ L), head_dim]
                        scale=scores_scale(self.img_q_norm))
        # Split the streams before the head merge: each merge is then the one copy its Linear reads, where
        # merging first and slicing [:, :n] / [:, n:] made strided views that matmul copied a second time.
        img_o, txt_o = out.split([n, out.shape[2] - n], dim=2)
        img_out = self.img_out(img_o.transpose(1, 2).reshape(b, n, dim))
        if self.txt_out is None:
            return img_out, None
        return img_out, self.txt_out(txt_o.transpose(1, 2).reshape(b, -1, dim))


class MMDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: str = "rms",
                 context_pre_only: bool = False, backend: str = "sdpa"):
        super().__init__()
        self.context_pre_only = context_pre_only
        hidden = int(dim * mlp_ratio)
        self.img_mod = nn.Linear(dim, 6 * dim)
        self.txt_mod = nn.Linear(dim, (2 if context_pre_only else 6) * dim)
        self.attn = JointAttention(dim, heads, qk_norm, context_pre_only, backend)
        self.img_mlp = Mlp(dim, hidden)
        self.txt_mlp = None if context_pre_only else Mlp(dim, hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None, rope=None):
        """c: SiLU of the conditioning vector [B, dim]. Returns (img, txt); txt is None after a
        context-pre-only block."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.img_mod(c).chunk(6, dim=1)
        t_mod = self.txt_mod(c).chunk(2 if self.context_pre_only else 6, dim=1)
        img_attn, txt_attn = self.attn(modulate(_ln(img), shift1, scale1), modulate(_ln(txt), t_mod[0], t_mod[1]),
                                       key_mask, rope)
        img = torch.addcmul(img, gate1[:, None], img_attn)
        img = torch.addcmul(img, gate2[:, None], self.img_mlp(modulate(_ln(img), shift2, scale2)))
        if self.context_pre_only:
            return img, None
        _, _, t_gate1, t_shift2, t_scale2, t_gate2 = t_mod
        txt = torch.addcmul(txt, t_gate1[:, None], txt_attn)
        txt = torch.addcmul(txt, t_gate2[:, None], self.txt_mlp(modulate(_ln(txt), t_shift2, t_scale2)))
        return img, txt


class MMDiT(nn.Module):
    def __init__(self, cfg, pooled_dim: int = 0, learned_null_tokens: int = 0, attention_backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        dim, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.grid, self.max_grid = cfg.input_size // p, cfg.pos_embed_max_size or cfg.input_size // p

        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        pos = torch.zeros(self.max_grid * self.max_grid, dim)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos)
        elif cfg.pos_embed == "sincos":   # a saved buffer, as in SD3 checkpoints (not a parameter: not counted)
            self.register_buffer("pos_embed", pos, persistent=True)
        else:
            self.pos_embed = None
        self.t_embed = TimestepMLP(FREQ_DIM, dim)
        self.pooled_embed = TimestepMLP(pooled_dim, dim) if pooled_dim else None
        self.context_embed = nn.Linear(cfg.context_dim, dim)
        self.null_context = nn.Parameter(torch.randn(learned_null_tokens, cfg.context_dim) / cfg.context_dim ** 0.5) \
            if learned_null_tokens else None
        self.null_pooled = nn.Parameter(torch.zeros(pooled_dim)) if learned_null_tokens and pooled_dim else None
        self.blocks = nn.ModuleList(
            MMDiTBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm,
                       context_pre_only=cfg.context_pre_only and i == cfg.depth - 1, backend=attention_backend)
            for i in range(cfg.depth))
        self.final = FinalLayer(dim, p * p * self.out_channels, "zero")
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Xavier linears, normal(0.02) time/pooled embedders, sin-cos positions; then adaLN-Zero: every
        modulation and the output layer start at zero, so each block starts as the identity on both
        streams and the network outputs exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.pos_embed is not None:
            self.pos_embed.copy_(self.sincos_table(self.pos_embed.device))
        for emb in (self.t_embed, self.pooled_embed):
            if emb is not None:
                nn.init.normal_(emb.linear_1.weight, std=0.02)
                nn.init.normal_(emb.linear_2.weight, std=0.02)
        for block in self.blocks:
            for mod in (block.img_mod, block.txt_mod):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for lin in (self.final.modulation, self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sincos_table(self, device=None) -> torch.Tensor:
        """[M*M, dim] sin-cos positions of the max grid, scaled so that the base grid spans the range the
        model was designed for (diffusers: arange(M) / (M / base)), as SD3 builds them."""
        m = self.max_grid
        base = self.grid
        return sincos_pos_embed_2d(self.cfg.hidden_size, m, m, device=device, base=(base, base))

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = enabled

    def _positions(self, gh: int, gw: int, dtype) -> torch.Tensor:
        m = self.max_grid
        if gh > m or gw > m:
            raise ValueError(f"token grid {gh}x{gw} exceeds the position grid {m}x{m}: raise "
                             f"denoiser.mmdit.pos_embed_max_size (SD3-medium: 192)")
        top, left = (m - gh) // 2, (m - gw) // 2
        grid = self.pos_embed.view(m, m, -1)[top:top + gh, left:left + gw]
        return grid.reshape(gh * gw, -1).to(dtype)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.out_channels
        x = x.view(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W]; t [B] network time (ldm/objectives.py); context [B, L, context_dim];
        context_mask [B, L] bool (None: attend to every text token, as SD3); pooled [B, pooled_dim];
        drop [B] bool (learned null caption). Returns [B, out_channels, H, W]."""
        if labels is not None:
            raise ValueError("MMDiT is text-conditioned: it takes no class labels")
        if context is None:
            raise ValueError("MMDiT needs `context` [B, L, context_dim] (the joined text token states)")
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch size {p}")
        gh, gw = h // p, w // p
        x = x.to(self.patch_embed.weight.dtype)   # run in the weights' dtype (bf16/fp16 engines get fp32 batches)
        img = to_tokens(self.patch_embed(x))
        if self.pos_embed is not None:
            img = img + self._positions(gh, gw, img.dtype)[None]

        t = t.to(x.device).float().expand(b) if t.dim() == 0 else t.to(x.device)
        c = self.t_embed(timestep_embedding(t, FREQ_DIM).to(img.dtype))
        context, context_mask, pooled = substitute_learned_null(context, context_mask, pooled, drop,
                                                                self.null_context, self.null_pooled)
        if self.pooled_embed is not None:
            if pooled is None:
                raise ValueError("this MMDiT was built with pooled_dim > 0 and needs `pooled`")
            c = c + self.pooled_embed(pooled.to(img.dtype))
        txt = self.context_embed(cast_for_autocast(context.to(img.dtype)))
        key_mask = None
        if context_mask is not None:   # image keys are always valid
            key_mask = torch.cat([torch.ones(b, gh * gw, dtype=torch.bool, device=x.device),
                                  context_mask.to(device=x.device, dtype=torch.bool)], dim=1)
        rope = rope_2d(gh, gw, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta, x.device) \
            if self.cfg.rope else None
        c_act = F.silu(c)   # shared by every block's modulation

        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, c_act, key_mask, rope, use_reentrant=False)
            else:
                img, txt = block(img, txt, c_act, key_mask, rope)
        return self.unpatchify(self.final(img, c), gh, gw)
