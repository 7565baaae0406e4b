"""The one attention used by the UNet and the DiT.

`attention(q, k, v, key_mask)` takes [B, heads, L, head_dim] tensors and a boolean key padding mask
[B, Lk] (True = attend). It runs torch's `scaled_dot_product_attention` by default; with
backend="xformers" it runs xformers' `memory_efficient_attention` when xformers imports and the
tensors are on CUDA, and otherwise falls back to SDPA (so a config written for a GPU cluster still
runs on a laptop). Both give the same result within floating-point tolerance.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Backend = str  # "sdpa" | "xformers"


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: F401
        return xops
    except Exception:  # ImportError, or a build that does not match torch
        return None


def xformers_available() -> bool:
    return _xformers_ops() is not None


def _safe_key_mask(key_mask: torch.Tensor) -> torch.Tensor:
    # A row with no valid key would softmax over nothing (NaN). Such rows (an all-padding caption) attend
    # to every key instead, which keeps the output finite and is what an unmasked model would do.
    return key_mask | ~key_mask.any(dim=-1, keepdim=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
              backend: Backend = "sdpa", dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale q k^T + mask) v for q [B,H,Lq,d], k/v [B,H,Lk,d], key_mask bool [B,Lk]; scale as
    SDPA's (None: 1/sqrt(d); 1.0 when q arrives scaled, e.g. by its RMS norm)."""
    if key_mask is not None:
        key_mask = _safe_key_mask(key_mask.to(torch.bool))
    if backend == "xformers" and q.is_cuda:
        xops = _xformers_ops()
        if xops is not None:
            return _xformers_attention(xops, q, k, v, key_mask, dropout_p, scale)
        _warn_no_xformers()
    if _use_cpu_math(q, k, dropout_p):
        return _cpu_math_attention(q, k, v, key_mask, q.shape[-1] ** -0.5 if scale is None else scale)
    mask = None if key_mask is None else key_mask[:, None, None, :]   # broadcast over heads and queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# CPU, bf16/fp16: attention as matmul -> softmax -> matmul, in chunks of (batch, heads) whose score
# tensor stays in cache. Why: torch's CPU flash-attention kernel in bf16 costs ~8 ms per call even at 16
# tokens, and its backward was 40 % of a bf16 UNet training step; these three ops run at bf16 GEMM speed
# and were 2.5-9x faster (fwd + bwd) for every attention shape of our UNet, DiT and autoencoder on this
# CPU. Chunking matters for long sequences: 256 x 256 scores for 128 (batch, head) pairs ran 2.4x faster
# in chunks of ~1 M scores than in one piece (the softmax and both matmuls then hit cache, not memory).
# The softmax reads bf16 scores and accumulates in fp32 inside the kernel (no fp32 copy of the scores).
# Above _MATH_MAX_SCORES per (batch, head) the saved probabilities would cost too much memory (autograd
# keeps them for backward), so long sequences go to SDPA. In fp32, SDPA is as fast, so it stays there.
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MATH_MAX_SCORES = 512 * 512          # Lq * Lk per (batch, head)
_CHUNK_SCORES = 1 << 20               # scores per chunk (2 MB in bf16)
# Up to twice that, one piece: two half-size chunks cost the loop and the torch.cat (forward and backward)
# without the cache gain. The MMDiT row's joint attention (141 tokens x 96 (batch, head) pairs, 1.9 M
# scores) was split in two; one piece ran its bf16 block forward + backward 4-16 % faster (min of 30,
# alternated). Longer sequences (the UNet's 256 x 256 x 128 pairs: 8.4 M) are chunked as before.
_SPLIT_SCORES = 2 * _CHUNK_SCORES


def _use_cpu_math(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    return (q.device.type == "cpu" and q.dtype in _LOW_PRECISION and dropout_p == 0.0
            and q.shape[-2] * k.shape[-2] <= _MATH_MAX_SCORES)


def _math_attention(q, k, v, bias, scale):
    scores = torch.matmul(q if scale == 1.0 else q * scale, k.transpose(-2, -1))
    if bias is not None:
        scores = scores + bias         # an add, not masked_fill: 10x cheaper on bf16 CPU tensors
    return torch.matmul(scores.softmax(dim=-1), v)


def _cpu_math_attention(q, k, v, key_mask, scale):
    b, h, lq, _ = q.shape
    bias = None
    if key_mask is not None:           # additive mask: 0 to attend, -inf to skip ([B, 1, 1, Lk])
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_mask, float("-inf"))
        bias = bias[:, None, None, :]
    pairs = max(1, _CHUNK_SCORES // (lq * k.shape[-2]))   # (batch, head) pairs per chunk
    if b * h * lq * k.shape[-2] <= _SPLIT_SCORES:
        return _math_attention(q, k, v, bias, scale)
    heads = min(h, pairs)
    rows = max(1, pairs // h)
    out = []
    for i in range(0, b, rows):
        sl = slice(i, i + rows)
        parts = [_math_attention(q[sl, j:j + heads], k[sl, j:j + heads], v[sl, j:j + heads],
                                 None if bias is None else bias[sl], scale) for j in range(0, h, heads)]
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.cat(out, dim=0)


@functools.lru_cache(maxsize=1)
def _warn_no_xformers() -> None:
    warnings.warn("attention_backend is 'xformers' but xformers is not importable; using torch SDPA", stacklevel=3)


def _xformers_attention(xops, q, k, v, key_mask, dropout_p, scale):
    # xformers wants [B, L, H, d] and an additive bias; its kernels need the bias' last dimension padded to
    # a multiple of 8, so allocate padded storage and slice it (the documented way to pass odd lengths).
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    bias = None
    if key_mask is not None:
        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        padded = (lk + 7) // 8 * 8
        storage = torch.zeros(b, h, lq, padded, device=q.device, dtype=q.dtype)
        bias = storage[..., :lk]
        bias.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def naive_attention(q, k, v, key_mask=None):
    """Reference implementation for tests: an explicit masked softmax over plain matmuls."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        key_mask = _safe_key_mask(key_mask.to(torch.bool))
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class _RMSNormFunction(torch.autograd.Function):
    """RMS norm in fp32 with a closed-form backward, written for memory bandwidth: on a CPU these small
    elementwise ops are bound by it, so every pass over the tensor counts. Autograd through the plain
    formula kept fp32 copies of the input and each intermediate and ran ~14 ops back, each into a fresh
    buffer; here the fp32 work happens in place in two buffers, the row sums come from one norm and one
    matrix-vector product. Saved for backward: the input in its own dtype and the fp32 rstd.
    On the MMDiT's q/k shape ([16, 6, 77, 64] bf16) forward + backward ran 2.8x faster than autograd.
    `scale` multiplies the output through the gain: free here, where the attention would spend a pass over
    q forward and one backward on it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
        x32 = x.to(torch.float32, copy=True)     # a copy even for fp32 input: the ops below are in place
        rstd = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        ctx.scale = scale
        return x32.mul_(rstd).mul_(weight.float() * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        w = weight.float() * ctx.scale
        x_hat = x.to(torch.float32, copy=True).mul_(rstd)
        g = grad.to(torch.float32, copy=True)
        g_x_hat = g * x_hat
        grad_weight = g_x_hat.flatten(0, -2).sum(0).mul_(ctx.scale)
        # d/dx of x * rstd(x) * w = rstd * (g w - x_hat * mean(g w x_hat)); the mean is (g x_hat) . w / d
        mean_gwx = torch.matmul(g_x_hat, w).unsqueeze_(-1).div_(x.shape[-1])
        grad_x = g.mul_(w).addcmul_(x_hat, mean_gwx, value=-1).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain (QK-norm), computed in fp32 and
    returned in the input's dtype; `scale`, a constant factor on the output (not a parameter, not saved)."""

    def __init__(self, dim: int, eps: float = 1e-6, scale: float = 1.0):
        super().__init__()
        self.eps, self.scale = eps, scale
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.scale)


def make_qk_norm(kind: str, head_dim: int, query: bool = False) -> nn.Module:
    """The q or k norm of one attention. An RMS q-norm also applies the scores' 1/sqrt(d) on its way (saves
    a pass over q and one back); pass `scores_scale(q_norm)` to `attention` so it is not applied twice."""
    if kind == "rms":
        return RMSNorm(head_dim, scale=head_dim ** -0.5 if query else 1.0)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"qk_norm {kind!r}: expected 'none', 'rms' or 'layer'")


def scores_scale(q_norm: nn.Module) -> Optional[float]:
    """`attention`'s scale after this q-norm: 1.0 where the norm already scaled q, else None (1/sqrt(d))."""
    return 1.0 if isinstance(q_norm, RMSNorm) and q_norm.scale != 1.0 else None


def cast_for_autocast(x: torch.Tensor) -> torch.Tensor:
    """Under autocast every Linear casts its fp32 input to the autocast dtype. When one input feeds several
    projections (q, k and v of self-attention; keys and values of every cross-attention), casting it once
    here gives the same numbers and saves the repeated copies (they were ~7 % of a bf16 DiT step)."""
    device = x.device.type
    if x.dtype == torch.float32 and device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class PackedTokens(NamedTuple):
    """Text tokens without their padding: `rows` [N, D] are the rows of a padded [batch, length, D] tensor
    listed by `index` (flat positions b * length + l). Projections of padding keys and values are wasted
    work, since the key mask hides them from every query: the denoisers pack the caption once per forward
    (`pack_tokens`) and each cross-attention projects only the N real tokens, then scatters keys and
    values back into the padded layout for the masked attention. Same outputs, less compute (captions are
    mostly padding: 77 open_clip positions, 10-20 real tokens for typical captions)."""
    rows: torch.Tensor
    index: torch.Tensor
    batch: int
    length: int

    def map(self, fn) -> "PackedTokens":
        return self._replace(rows=fn(self.rows))

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        out = rows.new_zeros(self.batch * self.length, rows.shape[-1]).index_copy_(0, self.index, rows)
        return out.view(self.batch, self.length, rows.shape[-1])


Context = Union[torch.Tensor, PackedTokens]


def pack_tokens(context: torch.Tensor, key_mask: Optional[torch.Tensor]) -> Context:
    """[B, L, D] context + bool key mask [B, L] -> PackedTokens of the attended rows; the context itself when
    nothing is masked (or no mask is given), while torch.compile traces (data-dependent sizes), or on the
    meta device (no values: `ldm plan` counts every caption at full length, the worst case)."""
    if key_mask is None or key_mask.device.type == "meta" or torch.compiler.is_compiling():
        return context
    keep = _safe_key_mask(key_mask.to(torch.bool))
    if bool(keep.all()):
        return context
    b, n = keep.shape
    index = keep.flatten().nonzero().squeeze(1)
    return PackedTokens(context.reshape(b * n, -1).index_select(0, index), index, b, n)


def prepare_context(context: torch.Tensor, key_mask: Optional[torch.Tensor],
                    project: Optional[nn.Module] = None) -> Context:
    """What the denoisers hand to their cross-attentions: the caption packed, passed through `project`
    (a caption projection: real tokens only) and cast once for autocast (every block's keys and values
    read it; same numbers as per-Linear casts)."""
    packed = pack_tokens(context, key_mask)
    if isinstance(packed, PackedTokens):
        return packed.map(lambda rows: cast_for_autocast(project(rows) if project is not None else rows))
    return cast_for_autocast(project(packed) if project is not None else packed)


def unpack_tokens(context: Context) -> torch.Tensor:
    """The padded [B, L, D] tensor (padding rows zero) of a packed context; a tensor passes through."""
    return context.unpack(context.rows) if isinstance(context, PackedTokens) else context


class Attention(nn.Module):
    """Multi-head self- or cross-attention (cross when `context_dim` is given).

    Projections are named to_q/to_k/to_v/to_out, one Linear each, so that checkpoints map one-to-one onto
    diffusers' Attention. `qk_norm` normalises q and k per head before the dot product (SD3).
    """

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, qkv_bias: bool = False,
                 qk_norm: str = "none", dropout: float = 0.0, backend: Backend = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.backend = backend
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.q_norm = make_qk_norm(qk_norm, self.head_dim, query=True)
        self.k_norm = make_qk_norm(qk_norm, self.head_dim)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[Context] = None,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, Lq, dim]; context [B, Lk, context_dim] or PackedTokens of it (None: self-attention);
        key_mask [B, Lk] bool, True = attend."""
        if context is None:
            x = context = cast_for_autocast(x)
        q = self.q_norm(self._split(self.to_q(x)))
        if isinstance(context, PackedTokens):    # project the real tokens only (see PackedTokens)
            k = self.k_norm(self._split(context.unpack(self.to_k(context.rows))))
            v = self._split(context.unpack(self.to_v(context.rows)))
        else:
            k = self.k_norm(self._split(self.to_k(context)))
            v = self._split(self.to_v(context))
        out = attention(q, k, v, key_mask, backend=self.backend, scale=scores_scale(self.q_norm))
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.dropout(self.to_out(out))
