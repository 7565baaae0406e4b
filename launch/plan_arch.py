"""Analytic FLOPs and activation memory of the models, per sample, from their configs alone.

`ldm plan` needs two numbers per sample that no config states: the FLOPs of a forward pass and the
bytes autograd keeps for the backward pass. Both come from one symbolic walk over each
architecture (`unet_forward`, `dit_forward`, `autoencoder_forward`; the frozen text tower is a closed
form, `TextTower`) that mirrors the module's `forward` op by op on a `Tape`, with tensor *sizes*
instead of tensors:

FLOPs (2 per multiply-add; what `torch.utils.flop_counter` counts, so the two can be compared):
    linear      2 * tokens * d_in * d_out                   (bias adds not counted)
    conv        2 * H_out * W_out * C_out * C_in * k^2      (per group; bias not counted)
    attention   4 * L_q * L_k * d_model                     (Q K^T and A V; softmax not counted)
Norms, activations, residual adds, interpolation are not counted (memory-bound, < 1 % of the
matmul FLOPs of these models). Closed forms per block for the fp32 UNet/DiT are in `UNET_FORMULAS`
and `DIT_FORMULAS` below; the walk evaluates those sums (tests/plan/test_plan_flops.py checks both).

Activation memory is what autograd saves for backward, following PyTorch's derivative rules:
    linear / conv       saves its input (its weight is a parameter, counted elsewhere)
    GroupNorm/LayerNorm saves its input and per-group / per-token mean and rstd
    SiLU / GELU         saves its input
    a * b               saves both operands;  a + b, views, nearest upsampling: nothing
    fused attention     saves q, k, v, the output and the fp32 log-sum-exp (FlashAttention /
                        memory-efficient kernels on GPU, the flash kernel on CPU; never the
                        L_q x L_k probability matrix)
A tensor saved by several ops (e.g. the LayerNorm output feeding to_q, to_k and to_v) is counted
once, which is how the allocator sees it. Under bf16 autocast (`precision: bf16`, fp32 weights)
the walk also follows CUDA's autocast policy: matmuls/convs/attention cast their inputs to bf16
(a new tensor per call, uncached for activations) and produce bf16; GroupNorm/LayerNorm run and
output in fp32 (`policy="cuda"`); CPU autocast keeps norms in the input dtype (`policy="cpu"`,
used by the tests, which measure on CPU).

Activation checkpointing (`torch.utils.checkpoint`, non-reentrant, per block as ldm/unet.py and
ldm/dit.py wrap them) keeps only the inputs of each checkpointed block plus what the
non-checkpointed glue saves; during backward one block at a time is recomputed, so

    peak_no_ckpt = saved_total + transient
    peak_ckpt    = max(retained_total + transient,
                       max over blocks i of [retained_before(i) + saved_inside(i) + transient(i)])

where retained_before(i) is what the forward pass kept up to block i's inputs (blocks after i are
already back-propagated and freed when i is recomputed) and `transient` the backward working set:
the gradient of the activation being processed and the gradient of its input, taken as 2 x the
largest single activation tensor (of the whole model, or of block i). That bound is an assumption;
tests/plan/ measures the peaks on CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

F32 = 4
LOW = 2   # bf16 / fp16

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
               (+ 6 D N + 2 L D with RMS QK-norm)
         FLOPs 8 N D^2 + 4 N^2 D (self) + 4 N D^2 + 4 L D^2 + 4 N L D (cross) + 4 N D M (MLP)
               (+ 12 D^2 for adaLN-Zero's per-block modulation)
  embed  FLOPs 2 N D C p^2 (patchify) + 2 N D p^2 C_out (final) + 2 L (C_ctx D + D^2) (caption MLP)
               + 2 (256 D + D^2) (time MLP) + 12 D^2 (adaLN-single's shared modulation)
"""


# ----------------------------------------------------------------------------- the tape

@dataclass(eq=False)
class Sym:
    """A tensor of `numel` elements per sample and `size` bytes per element; `base` for views."""
    numel: int
    size: int
    base: Optional["Sym"] = None

    @property
    def storage(self) -> "Sym":
        return self.base.storage if self.base is not None else self

    @property
    def nbytes(self) -> int:
        return self.numel * self.size


@dataclass
class BlockRecord:
    name: str
    saved_bytes: int       # saved inside the block (what a recompute rebuilds), retained inputs excluded
    largest: int           # largest single tensor inside
    retained_before: int   # bytes kept for backward by everything up to and including this block's inputs

    @property
    def backward_peak(self) -> int:
        """Live activation bytes while this block is recomputed and back-propagated: what was kept up
        to its inputs (later blocks are already done and freed), its own activations, and the
        gradient working set (2 x its largest tensor)."""
        return self.retained_before + self.saved_bytes + 2 * self.largest


class Tape:
    """Symbolic forward pass: accumulates FLOPs and the storages autograd saves for backward.

    precision: "fp32" (all fp32), "fp16" (half weights and activations, DeepSpeed fp16) or "bf16"
    (torch autocast over fp32 weights). policy: "cuda" or "cpu" autocast rules for norms (see module
    docstring). `grad`: False for frozen forward passes (no_grad): FLOPs only, nothing saved."""

    def __init__(self, precision: str = "fp32", policy: str = "cuda", grad: bool = True):
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision {precision!r}")
        self.precision, self.policy, self.grad = precision, policy, grad
        self.autocast = precision == "bf16"
        self.act_size = LOW if precision in ("fp16", "bf16") else F32
        self.flops = 0
        self._scopes: list[dict[int, Sym]] = [{}]
        self.blocks: list[BlockRecord] = []
        self.largest = 0

    # ---- bookkeeping
    def new(self, numel: int, size: Optional[int] = None) -> Sym:
        s = Sym(int(numel), self.act_size if size is None else size)
        self.largest = max(self.largest, s.nbytes)
        return s

    def input(self, numel: int, size: int = F32, batch: bool = False) -> Sym:
        """A tensor the model makes from its inputs (fp32); the model casts it to its weights' dtype.
        `batch`: a tensor of the batch itself (latents, text states, mask), alive for the whole step."""
        x = Sym(int(numel), size)
        if batch and self.grad:
            self._scopes[0][id(x)] = x
        return self.cast(x, LOW) if self.precision == "fp16" else x

    def view(self, x: Sym, numel: Optional[int] = None) -> Sym:
        return Sym(x.numel if numel is None else int(numel), x.size, base=x)

    def save(self, *xs: Sym) -> None:
        if not self.grad:
            return
        for x in xs:
            st = x.storage
            if not any(id(st) in scope for scope in self._scopes[:-1]):
                self._scopes[-1][id(st)] = st

    def cast(self, x: Sym, size: int) -> Sym:
        return x if x.size == size else self.new(x.numel, size)

    def _mm_in(self, x: Sym) -> Sym:
        return self.cast(x, LOW) if self.autocast else x

    def cast_for_matmuls(self, x: Sym) -> Sym:
        """ldm.attention.cast_for_autocast: an input read by several Linears is cast to bf16 once."""
        return self._mm_in(x)

    # ---- ops
    def linear(self, x: Sym, tokens: int, d_in: int, d_out: int) -> Sym:
        self.flops += 2 * tokens * d_in * d_out
        self.save(self._mm_in(x))
        return self.new(tokens * d_out, LOW if self.autocast else x.size)

    def conv(self, x: Sym, h_out: int, w_out: int, c_in: int, c_out: int, k: int) -> Sym:
        self.flops += 2 * h_out * w_out * c_out * c_in * k * k
        self.save(self._mm_in(x))
        return self.new(h_out * w_out * c_out, LOW if self.autocast else x.size)

    def norm(self, x: Sym, stats: int) -> Sym:
        """GroupNorm / LayerNorm; `stats` = number of (mean, rstd) pairs per sample (groups or tokens)."""
        if self.autocast and self.policy == "cuda":
            x = self.cast(x, F32)
        self.save(x, self.new(2 * stats, F32) if self.grad else x)
        return self.new(x.numel, x.size)

    def act(self, x: Sym, numel: Optional[int] = None) -> Sym:
        """SiLU / GELU (saves its input; `numel` when the input is a view of part of a storage)."""
        self.save(x)
        return self.new(x.numel if numel is None else numel, x.size)

    def mul(self, a: Sym, b: Sym) -> Sym:
        self.save(a, b)
        return self.new(max(a.numel, b.numel), max(a.size, b.size))

    def add(self, a: Sym, b: Sym) -> Sym:
        return self.new(max(a.numel, b.numel), max(a.size, b.size))

    def attention(self, q: Sym, k: Sym, v: Sym, heads: int, lq: int, lk: int, dim: int) -> Sym:
        """Fused scaled-dot-product attention over `heads` heads, total width `dim`."""
        self.flops += 4 * lq * lk * dim
        if self.autocast:
            q, k, v = (self.cast(t, LOW) for t in (q, k, v))
        out = self.new(lq * dim, q.size)
        self.save(q, k, v, out, self.new(heads * lq, F32))
        return out

    def rms_norm(self, x: Sym) -> Sym:
        """ldm.attention.RMSNorm: x.float(); x * rsqrt(mean(x^2) + eps); * weight; back to x's dtype."""
        xf = self.cast(x, F32)
        y = self.new(x.numel, F32)
        self.save(xf, y)
        return self.cast(self.new(x.numel, F32), x.size)

    # ---- activation checkpointing
    @contextlib.contextmanager
    def checkpoint(self, enabled: bool, inputs: tuple[Sym, ...], name: str = "block") -> Iterator[None]:
        """A block run under torch.utils.checkpoint when `enabled`: its inputs are kept, its own saved
        tensors only exist while it is recomputed in backward."""
        if not enabled or not self.grad:
            yield
            return
        self.save(*inputs)
        retained_before = self.saved_bytes
        self._scopes.append({})
        largest_before, self.largest = self.largest, 0
        try:
            yield
        finally:
            inner = self._scopes.pop()
            self.blocks.append(BlockRecord(name, sum(s.nbytes for s in inner.values()), self.largest,
                                           retained_before))
            self.largest = max(largest_before, self.largest)

    # ---- results
    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self._scopes[0].values())

    @property
    def max_block_bytes(self) -> int:
        return max((b.saved_bytes for b in self.blocks), default=0)


@dataclass
class ForwardCount:
    """Per-sample results of one walk."""
    flops: int                      # forward FLOPs
    saved_bytes: int                # kept for backward (checkpointing: retained inputs + glue)
    max_block_bytes: int            # largest checkpointed block's recomputed activations (0 without)
    largest_tensor_bytes: int
    checkpointing: bool
    blocks: list[BlockRecord] = field(default_factory=list)

    @property
    def transient_bytes(self) -> int:
        return 2 * self.largest_tensor_bytes

    @property
    def peak_bytes(self) -> int:
        """Activation bytes per sample at the peak of backward (formulas in the module docstring):
        the start of backward (everything kept + the gradient working set), or, with checkpointing,
        the worst block recompute if that is higher."""
        return max([self.saved_bytes + self.transient_bytes] + [b.backward_peak for b in self.blocks])


def _finish(tape: Tape, checkpointing: bool) -> ForwardCount:
    return ForwardCount(tape.flops, tape.saved_bytes, tape.max_block_bytes, tape.largest, checkpointing,
                        list(tape.blocks))


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
        q, k = t.rms_norm(q), t.rms_norm(k)
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


# ----------------------------------------------------------------------------- frozen parts

def autoencoder_forward(cfg, image_hw: tuple[int, int], encoder: bool = True, decoder: bool = True,
                        precision: str = "fp32") -> ForwardCount:
    """FLOPs of autoencoder.model.Autoencoder (`cfg`: AutoencoderConfig) on one image of `image_hw`:
    the encoder (+ quant_conv, + the VQ distance matmul) and/or (post_quant_conv +) the decoder. Frozen: nothing is saved;
    `largest_tensor_bytes` is the largest feature map (the encoder's working set in no_grad mode is a
    few of those, see launch/plan.py)."""
    t = Tape(precision, grad=False)
    groups = cfg.norm_groups
    n_lv = len(cfg.ch_mult)

    def resblock(x, hw, c_in, c_out):
        h1 = t.conv(x, hw[0], hw[1], c_in, c_out, 3)
        h2 = t.conv(h1, hw[0], hw[1], c_out, c_out, 3)
        return t.conv(x, hw[0], hw[1], c_in, c_out, 1) if c_in != c_out else h2

    def attn(x, hw, c):
        n = hw[0] * hw[1]
        q = t.linear(x, n, c, c)
        t.linear(x, n, c, c)
        t.linear(x, n, c, c)
        o = t.attention(q, q, q, 1, n, n, c)
        return t.linear(o, n, c, c)

    hw = tuple(image_hw)
    z_out = 2 * cfg.z_channels if cfg.regularizer == "kl" else cfg.z_channels
    q_ch = 2 * cfg.embed_dim if cfg.regularizer == "kl" else cfg.embed_dim
    top = cfg.ch * cfg.ch_mult[-1]
    if encoder:
        x = t.input(cfg.in_channels * hw[0] * hw[1])
        h = t.conv(x, hw[0], hw[1], cfg.in_channels, cfg.ch, 3)
        widths_in = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult[:-1]]
        size = cfg.resolution
        for i, m in enumerate(cfg.ch_mult):
            c_in, c_out = widths_in[i], cfg.ch * m
            for j in range(cfg.num_res_blocks):
                h = resblock(h, hw, c_in if j == 0 else c_out, c_out)
                if size in cfg.attn_resolutions:
                    h = attn(h, hw, c_out)
            if i < n_lv - 1:
                hw = (hw[0] // 2, hw[1] // 2)                 # pad (0,1,0,1), 3x3 stride 2, no padding
                h = t.conv(h, hw[0], hw[1], c_out, c_out, 3)
                size //= 2
        h = resblock(h, hw, top, top)
        if cfg.mid_attention:
            h = attn(h, hw, top)
        h = resblock(h, hw, top, top)
        h = t.conv(h, hw[0], hw[1], top, z_out, 3)
        t.conv(h, hw[0], hw[1], (2 if cfg.regularizer == "kl" else 1) * cfg.z_channels, q_ch, 1)
        if cfg.regularizer == "vq":                            # nearest code: -2 z @ codebook^T
            t.flops += 2 * hw[0] * hw[1] * cfg.n_embed * cfg.embed_dim
    if decoder:
        f = 2 ** (n_lv - 1)
        hw = (image_hw[0] // f, image_hw[1] // f)
        z = t.input(cfg.embed_dim * hw[0] * hw[1])
        z = t.conv(z, hw[0], hw[1], cfg.embed_dim, cfg.z_channels, 1)
        h = t.conv(z, hw[0], hw[1], cfg.z_channels, top, 3)
        h = resblock(h, hw, top, top)
        if cfg.mid_attention:
            h = attn(h, hw, top)
        h = resblock(h, hw, top, top)
        c_in = top
        for i in reversed(range(n_lv)):
            c_out = cfg.ch * cfg.ch_mult[i]
            size = cfg.resolution // 2 ** i
            for j in range(cfg.num_res_blocks + 1):
                h = resblock(h, hw, c_in if j == 0 else c_out, c_out)
                if size in cfg.attn_resolutions:
                    h = attn(h, hw, c_out)
            c_in = c_out
            if i > 0:
                hw = (hw[0] * 2, hw[1] * 2)
                h = t.conv(h, hw[0], hw[1], c_out, c_out, 3)
        t.conv(h, hw[0], hw[1], cfg.ch * cfg.ch_mult[0], cfg.out_channels, 3)
    fc = _finish(t, False)
    widest = max(cfg.ch * m * (image_hw[0] // 2 ** i) * (image_hw[1] // 2 ** i) for i, m in enumerate(cfg.ch_mult))
    fc.largest_tensor_bytes = widest * (F32 if precision != "fp16" else LOW)
    return fc


def autoencoder_params(cfg) -> int:
    """Parameters of autoencoder.model.Autoencoder (encoder + decoder + quant convs + codebook)."""
    def conv(ci, co, k):
        return ci * co * k * k + co

    def norm(c):
        return 2 * c

    def res(ci, co):
        return norm(ci) + conv(ci, co, 3) + norm(co) + conv(co, co, 3) + (conv(ci, co, 1) if ci != co else 0)

    def attn(c):
        return norm(c) + 4 * conv(c, c, 1)

    n_lv, top = len(cfg.ch_mult), cfg.ch * cfg.ch_mult[-1]
    kl = cfg.regularizer == "kl"
    total = conv(cfg.in_channels, cfg.ch, 3)
    widths_in = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult[:-1]]
    size = cfg.resolution
    for i, m in enumerate(cfg.ch_mult):
        ci, co = widths_in[i], cfg.ch * m
        for j in range(cfg.num_res_blocks):
            total += res(ci if j == 0 else co, co) + (attn(co) if size in cfg.attn_resolutions else 0)
        if i < n_lv - 1:
            total += conv(co, co, 3)
            size //= 2
    mid = 2 * res(top, top) + (attn(top) if cfg.mid_attention else 0)
    total += mid + norm(top) + conv(top, (2 if kl else 1) * cfg.z_channels, 3)
    total += conv((2 if kl else 1) * cfg.z_channels, (2 if kl else 1) * cfg.embed_dim, 1)
    total += conv(cfg.embed_dim, cfg.z_channels, 1) + conv(cfg.z_channels, top, 3) + mid
    ci = top
    for i in reversed(range(n_lv)):
        co = cfg.ch * cfg.ch_mult[i]
        size = cfg.resolution // 2 ** i
        for j in range(cfg.num_res_blocks + 1):
            total += res(ci if j == 0 else co, co) + (attn(co) if size in cfg.attn_resolutions else 0)
        ci = co
        if i > 0:
            total += conv(co, co, 3)
    total += norm(cfg.ch * cfg.ch_mult[0]) + conv(cfg.ch * cfg.ch_mult[0], cfg.out_channels, 3)
    if cfg.regularizer == "vq" and not cfg.vq_ema:     # an EMA codebook is a buffer
        total += cfg.n_embed * cfg.embed_dim
    return total


@dataclass(frozen=True)
class TextTower:
    """The shape of an open_clip text transformer (from its model config's text_cfg)."""
    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512
    mlp_ratio: float = 4.0

    @property
    def params(self) -> int:
        """token + position embeddings, per layer (LN, in_proj 3w^2+3w, out_proj, LN, MLP), final LN,
        projection, logit_scale (open_clip keeps it on the CLIP module the text encoder holds)."""
        w, mw = self.width, int(self.width * self.mlp_ratio)
        layer = 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + w * mw + mw + mw * w + w
        return self.vocab_size * w + self.context_length * w + self.layers * layer + 2 * w + w * self.embed_dim + 1

    def forward_flops(self) -> int:
        """Per caption: every layer over all `context_length` tokens, plus the projection of one token."""
        w, mw, L = self.width, int(self.width * self.mlp_ratio), self.context_length
        per_layer = 2 * L * w * 3 * w + 4 * L * L * w + 2 * L * w * w + 2 * L * w * mw * 2
        return self.layers * per_layer + 2 * w * self.embed_dim


def text_tower(text_cfg) -> TextTower:
    """TextEncoderConfig -> TextTower, from open_clip's bundled (or the config's extra) model config."""
    import json
    from pathlib import Path

    tc: Optional[dict] = None
    embed = 512
    if text_cfg.model_config:
        from ldm.text import resolve_model_config

        path = resolve_model_config(text_cfg.model_config)
        files = [path] if path.is_file() else sorted(Path(path).glob("*.json"))
        for f in files:
            if f.stem == text_cfg.arch or len(files) == 1:
                data = json.loads(f.read_text())
                tc, embed = data["text_cfg"], data.get("embed_dim", embed)
    if tc is None:
        import open_clip

        data = open_clip.get_model_config(text_cfg.arch)
        if data is None:
            raise ValueError(f"text_encoder.arch {text_cfg.arch!r}: not an open_clip model config")
        tc, embed = data["text_cfg"], data.get("embed_dim", embed)
    ctx = text_cfg.context_length or tc.get("context_length", 77)
    return TextTower(width=tc.get("width", 512), layers=tc.get("layers", 12), heads=tc.get("heads", 8),
                     context_length=ctx, vocab_size=tc.get("vocab_size", 49408), embed_dim=embed,
                     mlp_ratio=tc.get("mlp_ratio", 4.0))
