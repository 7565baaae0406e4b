"""The symbolic forward walks of the stage-two denoisers (UNet, DiT, MMDiT) on a `Tape`: FLOPs and saved bytes per
sample, mirroring ldm/unet.py and ldm/dit.py op by op. The counting rules are launch/plan/tape.py's; the
closed forms per block that these walks add up are `UNET_FORMULAS` and `DIT_FORMULAS`."""
from __future__ import annotations

from typing import Optional

from .tape import F32, ForwardCount, Sym, Tape, _finish

UNET_FORMULAS = """UNet, fp32, per sample, at a level with n = h*w positions (C_in -> C_out), context length L
(width C_ctx), time-embedding width E:
  ResBlock           saved 3 (C_in + C_out) n              (each conv's input, its norm's input and output)
                     FLOPs 18 n C_out (C_in + C_out) + 2 E C_out  [+ 2 n C_in C_out for the 1x1 skip]
  TransformerBlock   saved 28 C n + 2 L C (cross k, v) + 2 heads n (log-sum-exp) + 6 n (LayerNorm statistics)
                     FLOPs 8 n C^2 + 4 n^2 C (self) + 4 n C^2 + 4 L C_ctx C + 4 n L C (cross) + 24 n C^2 (GEGLU)
  SpatialTransformer adds its norm's input, proj_in's and proj_out's inputs: saved 3 C n, FLOPs 4 n C^2
"""

DIT_FORMULAS = """DiT, fp32, per sample, N = (latent / patch)^2 tokens, width D, MLP width M, context length L:
  block  saved (15 + 2 M/D) D N + 2 L D (cross k, v) + 2 heads N (log-sum-exp) + 4 N (LayerNorm statistics)
               (+ 3 D N + L D + 3 heads N + heads L with RMS QK-norm: q/k inputs, rstd)
         FLOPs 8 N D^2 + 4 N^2 D (self) + 4 N D^2 + 4 L D^2 + 4 N L D (cross) + 4 N D M (MLP)
               (+ 12 D^2 for adaLN-Zero's per-block modulation)
  embed  FLOPs 2 N D C p^2 (patchify) + 2 N D p^2 C_out (final) + 2 L (C_ctx D + D^2) (caption MLP)
               + 2 (256 D + D^2) (time MLP) + 12 D^2 (adaLN-single's shared modulation)
"""


# ----------------------------------------------------------------------------- stage two: UNet

def _unet_resblock(t: Tape, x: Sym, emb: Sym, n: int, hw: tuple[int, int], c_in: int, c_out: int,
                   emb_dim: int, groups: int) -> Sym:
    h, w = hw
    a = t.act(t.norm(x, groups))
    h1 = t.conv(a, h, w, c_in, c_out, 3)
    p = t.linear(t.act(emb), 1, emb_dim, c_out)
    h2 = t.add(h1, p)
    a2 = t.act(t.norm(h2, groups))
    h3 = t.conv(a2, h, w, c_out, c_out, 3)
    skip = t.conv(x, h, w, c_in, c_out, 1) if c_in != c_out else x
    return t.add(skip, h3)


def _attention_block(t: Tape, x: Sym, ctx: Optional[Sym], n: int, dim: int, heads: int, ctx_len: int,
                     ctx_dim: int, qk_norm: str) -> Sym:
    """ldm.attention.Attention on an already normalised input x [n, dim] (self when ctx is None)."""
    if ctx is None:
        x = t.cast_for_matmuls(x)                         # q, k and v share one cast
    kv_in, lk, kv_dim = (x, n, dim) if ctx is None else (ctx, ctx_len, ctx_dim)
    q = t.linear(x, n, dim, dim)
    k = t.linear(kv_in, lk, kv_dim, dim)
    v = t.linear(kv_in, lk, kv_dim, dim)
    if qk_norm == "rms":
        q, k = t.rms_norm(q, n * heads), t.rms_norm(k, lk * heads)
    elif qk_norm == "layer":
        q, k = t.norm(q, n * heads), t.norm(k, lk * heads)
    o = t.attention(q, k, v, heads, n, lk, dim)
    return t.linear(o, n, dim, dim)     # the output is laid out [n, heads, d]: the reshape is a view


def _unet_transformer_block(t: Tape, x: Sym, ctx: Sym, n: int, c: int, heads: int, ctx_len: int,
                            ctx_dim: int, qk_norm: str) -> Sym:
    x = t.add(x, _attention_block(t, t.norm(x, n), None, n, c, heads, ctx_len, ctx_dim, qk_norm))
    x = t.add(x, _attention_block(t, t.norm(x, n), ctx, n, c, heads, ctx_len, ctx_dim, qk_norm))
    a = t.norm(x, n)
    proj = t.linear(a, n, c, 8 * c)                       # GEGLU: value and gate are views of one storage
    value, gate = t.view(proj, 4 * c * n), t.view(proj, 4 * c * n)
    g = t.act(gate, 4 * c * n)
    m = t.mul(value, g)
    return t.add(x, t.linear(m, n, 4 * c, c))


def _unet_spatial_transformer(t: Tape, x: Sym, ctx: Sym, hw: tuple[int, int], c: int, heads: int, depth: int,
                              linear: bool, groups: int, ctx_len: int, ctx_dim: int, qk_norm: str) -> Sym:
    h, w = hw
    n = h * w
    y = t.norm(x, groups)
    if linear:
        y = t.linear(t.new(y.numel, y.size), n, c, c)     # [B, C, n] -> [B, n, C] is copied for the matmul
    else:
        y = t.conv(y, h, w, c, c, 1)
    for _ in range(depth):
        y = _unet_transformer_block(t, y, ctx, n, c, heads, ctx_len, ctx_dim, qk_norm)
    y = t.new(y.numel, y.size)                             # [B, n, C] -> [B, C, h, w]: a copy
    y = t.linear(y, n, c, c) if linear else t.conv(y, h, w, c, c, 1)
    return t.add(x, y)


def unet_forward(cfg, latent_hw: tuple[int, int], ctx_len: int = 77, precision: str = "fp32",
                 checkpointing: bool = False, pooled_dim: int = 0, policy: str = "cuda",
                 grad: bool = True) -> ForwardCount:
    """One sample through ldm.unet.UNet (`cfg`: ldm.config.UNetConfig) at latent size `latent_hw`."""
    t = Tape(precision, policy, grad)
    mc, groups = cfg.model_channels, cfg.norm_groups
    emb_dim = 4 * mc

    def heads_for(ch):
        return ch // cfg.head_dim if cfg.head_dim else cfg.num_heads

    def down(s):                                           # conv 3x3, stride 2, padding 1
        return (s - 1) // 2 + 1

    x = t.input(cfg.in_channels * latent_hw[0] * latent_hw[1], batch=True)
    t.input(ctx_len, 1, batch=True)                        # context_mask (bool)
    t.input(1, F32, batch=True)                            # t
    emb = t.linear(t.act(t.linear(t.input(mc), 1, mc, emb_dim)), 1, emb_dim, emb_dim)
    if pooled_dim:
        pe = t.linear(t.act(t.linear(t.input(pooled_dim), 1, pooled_dim, emb_dim)), 1, emb_dim, emb_dim)
        emb = t.add(emb, pe)
    # every caption at full length (no padding to skip: the worst case), cast once for all cross-attentions
    ctx = t.cast_for_matmuls(t.input(ctx_len * cfg.context_dim, batch=True))

    def res(x, hw, c_in, c_out):
        with t.checkpoint(checkpointing, (x, emb), "resblock"):
            return _unet_resblock(t, x, emb, hw[0] * hw[1], hw, c_in, c_out, emb_dim, groups)

    def attn(x, hw, c):
        with t.checkpoint(checkpointing, (x, ctx), "transformer"):
            return _unet_spatial_transformer(t, x, ctx, hw, c, heads_for(c), cfg.transformer_depth,
                                             cfg.linear_projection, groups, ctx_len, cfg.context_dim, cfg.qk_norm)

    hw = tuple(latent_hw)
    h = t.conv(x, hw[0], hw[1], cfg.in_channels, mc, 3)
    skips = [(h, hw, mc)]
    ch = mc
    n_levels = len(cfg.channel_mult)
    for i, mult in enumerate(cfg.channel_mult):
        out = mc * mult
        for _ in range(cfg.num_res_blocks):
            h = res(h, hw, ch, out)
            ch = out
            if i in cfg.attention_levels:
                h = attn(h, hw, ch)
            skips.append((h, hw, ch))
        if i < n_levels - 1:
            hw = (down(hw[0]), down(hw[1]))
            h = t.conv(h, hw[0], hw[1], ch, ch, 3)
            skips.append((h, hw, ch))
    h = res(h, hw, ch, ch)
    h = attn(h, hw, ch)
    h = res(h, hw, ch, ch)
    for i, mult in reversed(list(enumerate(cfg.channel_mult))):
        out = mc * mult
        for _ in range(cfg.num_res_blocks + 1):
            s, _, s_ch = skips.pop()
            cat = t.new((ch + s_ch) * hw[0] * hw[1], max(h.size, s.size))
            h = res(cat, hw, ch + s_ch, out)
            ch = out
            if i in cfg.attention_levels:
                h = attn(h, hw, ch)
        if i > 0:
            hw = skips[-1][1]
            up = t.new(ch * hw[0] * hw[1], h.size)            # nearest upsampling saves nothing
            h = t.conv(up, hw[0], hw[1], ch, ch, 3)
    a = t.act(t.norm(h, groups))
    t.conv(a, hw[0], hw[1], ch, cfg.out_channels, 3)
    return _finish(t, checkpointing)


# ----------------------------------------------------------------------------- stage two: DiT

def _dit_block(t: Tape, x: Sym, block_c: Sym, ctx: Optional[Sym], n: int, d: int, heads: int, mlp: int,
               ctx_len: int, adaln: str, qk_norm: str, cond_dim: int) -> Sym:
    if adaln == "zero":
        mod = t.linear(t.act(block_c), 1, d, 6 * d)
    else:
        mod = t.add(t.new(6 * d, F32), block_c)            # scale_shift_table (fp32 param) + c
    shift1, scale1, gate1, shift2, scale2, gate2 = (t.view(mod, d) for _ in range(6))

    def modulate(a, shift, scale):
        one_plus = t.new(d, scale.size)
        return t.add(t.mul(a, one_plus), shift)

    m1 = modulate(t.norm(x, n), shift1, scale1)
    att = _attention_block(t, m1, None, n, d, heads, ctx_len, d, qk_norm)
    x = t.add(x, t.mul(gate1, att))
    if ctx is not None:
        x = t.add(x, _attention_block(t, x, ctx, n, d, heads, ctx_len, d, qk_norm))
    m2 = modulate(t.norm(x, n), shift2, scale2)
    f1 = t.linear(m2, n, d, mlp)
    f2 = t.linear(t.act(f1), n, mlp, d)
    return t.add(x, t.mul(gate2, f2))


def dit_forward(cfg, latent_hw: tuple[int, int], ctx_len: int = 77, precision: str = "fp32",
                checkpointing: bool = False, pooled_dim: int = 0, learned_null: bool = False,
                policy: str = "cuda", grad: bool = True) -> ForwardCount:
    """One sample through ldm.dit.DiT (`cfg`: ldm.config.DiTConfig) at latent size `latent_hw`."""
    t = Tape(precision, policy, grad)
    d, p = cfg.hidden_size, cfg.patch_size
    gh, gw = latent_hw[0] // p, latent_hw[1] // p
    n = gh * gw
    out_ch = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
    mlp = int(d * cfg.mlp_ratio)
    x = t.input(cfg.in_channels * latent_hw[0] * latent_hw[1], batch=True)
    t.input(1, F32, batch=True)                            # t
    tokens = t.conv(x, gh, gw, cfg.in_channels, d, p)
    tokens = t.add(tokens, t.new(n * d, tokens.size))       # + positions
    c = t.linear(t.act(t.linear(t.input(256, tokens.size), 1, 256, d)), 1, d, d)
    ctx = None
    if cfg.cross_attention:
        ctx = t.input(ctx_len * cfg.context_dim, batch=True)
        t.input(ctx_len, 1, batch=True)                    # context_mask (bool)
        if learned_null:
            ctx = t.new(ctx.numel, ctx.size)                 # torch.where with the learned null caption
        ctx = t.cast(ctx, tokens.size)                        # .to(tokens.dtype)
        if cfg.caption_projection:
            hid = t.linear(ctx, ctx_len, cfg.context_dim, d)
            ctx = t.linear(t.act(hid), ctx_len, d, d)
        ctx = t.cast_for_matmuls(ctx)                       # one cast for every block's keys and values
    if pooled_dim:
        c = t.add(c, t.linear(t.act(t.linear(t.input(pooled_dim), 1, pooled_dim, d)), 1, d, d))
    block_c = t.linear(t.act(c), 1, d, 6 * d) if cfg.adaln == "single" else c
    for _ in range(cfg.depth):
        inputs = (tokens, block_c) + ((ctx,) if ctx is not None else ())
        with t.checkpoint(checkpointing, inputs, "dit_block"):
            tokens = _dit_block(t, tokens, block_c, ctx, n, d, cfg.num_heads, mlp, ctx_len, cfg.adaln,
                                cfg.qk_norm, d)
    # final layer: LN, modulate, linear to p*p*C
    if cfg.adaln == "zero":
        mod = t.linear(t.act(c), 1, d, 2 * d)
    else:
        mod = t.add(t.new(2 * d, F32), c)
    one_plus = t.new(d, mod.size)
    m = t.add(t.mul(t.norm(tokens, n), one_plus), t.view(mod, d))
    t.linear(m, n, d, p * p * out_ch)
    return _finish(t, checkpointing)


# ----------------------------------------------------------------------------- stage two: MMDiT

def _modulate(t: Tape, a: Sym, shift: Sym, scale: Sym, d: int) -> Sym:
    one_plus = t.new(d, scale.size)                        # addcmul(shift, a, 1 + scale)
    return t.add(t.mul(a, one_plus), shift)


def _mmdit_block(t: Tape, img: Sym, txt: Sym, c_act: Sym, n: int, L: int, d: int, heads: int, mlp: int,
                 qk_norm: str, pre_only: bool) -> tuple[Sym, Optional[Sym]]:
    """ldm.mmdit.MMDiTBlock: two weight streams, one joint attention over n image + L text tokens."""
    img_mod = t.linear(c_act, 1, d, 6 * d)
    img_mod = [t.view(img_mod, d) for _ in range(6)]
    txt_mod = t.linear(c_act, 1, d, (2 if pre_only else 6) * d)
    txt_mod = [t.view(txt_mod, d) for _ in range(2 if pre_only else 6)]
    a_img = _modulate(t, t.norm(img, n), img_mod[0], img_mod[1], d)
    a_txt = _modulate(t, t.norm(txt, L), txt_mod[0], txt_mod[1], d)
    qkv = t.linear(a_img, n, d, 3 * d)
    q, k, v = (t.view(qkv, n * d) for _ in range(3))
    tqkv = t.linear(a_txt, L, d, 3 * d)
    tq, tk, tv = (t.view(tqkv, L * d) for _ in range(3))
    if qk_norm == "rms":
        q, k, tk = t.rms_norm(q, n * heads), t.rms_norm(k, n * heads), t.rms_norm(tk, L * heads)
        if not pre_only:
            tq = t.rms_norm(tq, L * heads)
    elif qk_norm == "layer":
        q, k, tk = t.norm(q, n * heads), t.norm(k, n * heads), t.norm(tk, L * heads)
        if not pre_only:
            tq = t.norm(tq, L * heads)
    lk = n + L
    k, v = t.new(lk * d, k.size), t.new(lk * d, v.size)    # torch.cat of the image and text keys / values
    lq = n if pre_only else lk
    if not pre_only:
        q = t.new(lq * d, q.size)
    o = t.attention(q, k, v, heads, lq, lk, d)
    o = t.new(lq * d, o.size)                              # transpose + reshape: a copy
    img = t.add(img, t.mul(img_mod[2], t.linear(t.view(o, n * d), n, d, d)))
    h = t.linear(_modulate(t, t.norm(img, n), img_mod[3], img_mod[4], d), n, d, mlp)
    img = t.add(img, t.mul(img_mod[5], t.linear(t.act(h), n, mlp, d)))
    if pre_only:
        return img, None
    txt = t.add(txt, t.mul(txt_mod[2], t.linear(t.view(o, L * d), L, d, d)))
    h = t.linear(_modulate(t, t.norm(txt, L), txt_mod[3], txt_mod[4], d), L, d, mlp)
    txt = t.add(txt, t.mul(txt_mod[5], t.linear(t.act(h), L, mlp, d)))
    return img, txt


def mmdit_forward(cfg, latent_hw: tuple[int, int], ctx_len: int = 77, precision: str = "fp32",
                  checkpointing: bool = False, pooled_dim: int = 0, learned_null: bool = False,
                  policy: str = "cuda", grad: bool = True) -> ForwardCount:
    """One sample through ldm.mmdit.MMDiT (`cfg`: ldm.config.MMDiTConfig) at latent size `latent_hw`,
    text length `ctx_len` (the joined tokens of every encoder)."""
    t = Tape(precision, policy, grad)
    d, p = cfg.hidden_size, cfg.patch_size
    gh, gw = latent_hw[0] // p, latent_hw[1] // p
    n, L = gh * gw, ctx_len
    out_ch = cfg.out_channels or cfg.in_channels
    mlp = int(d * cfg.mlp_ratio)
    x = t.input(cfg.in_channels * latent_hw[0] * latent_hw[1], batch=True)
    t.input(1, F32, batch=True)                            # t
    img = t.conv(x, gh, gw, cfg.in_channels, d, p)
    if cfg.pos_embed != "none":
        img = t.add(img, t.new(n * d, img.size))            # + positions
    c = t.linear(t.act(t.linear(t.input(256, img.size), 1, 256, d)), 1, d, d)
    ctx = t.input(L * cfg.context_dim, batch=True)
    t.input(L, 1, batch=True)                              # context_mask (bool)
    if learned_null:
        ctx = t.new(ctx.numel, ctx.size)
    if pooled_dim:
        c = t.add(c, t.linear(t.act(t.linear(t.input(pooled_dim), 1, pooled_dim, d)), 1, d, d))
    txt = t.linear(t.cast(ctx, img.size), L, cfg.context_dim, d)
    t.new(n + L, 1)                                        # the joint key mask (bool)
    c_act = t.act(c)
    for i in range(cfg.depth):
        pre_only = cfg.context_pre_only and i == cfg.depth - 1
        with t.checkpoint(checkpointing, (img, txt, c_act), "mmdit_block"):
            img, txt = _mmdit_block(t, img, txt, c_act, n, L, d, cfg.num_heads, mlp, cfg.qk_norm, pre_only)
    mod = t.linear(t.act(c), 1, d, 2 * d)
    m = _modulate(t, t.norm(img, n), t.view(mod, d), t.view(mod, d), d)
    t.linear(m, n, d, p * p * out_ch)
    return _finish(t, checkpointing)
