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
from typing import Optional

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
              backend: Backend = "sdpa", dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q [B,H,Lq,d], k/v [B,H,Lk,d], key_mask bool [B,Lk]."""
    if key_mask is not None:
        key_mask = _safe_key_mask(key_mask.to(torch.bool))
    if backend == "xformers" and q.is_cuda:
        xops = _xformers_ops()
        if xops is not None:
            return _xformers_attention(xops, q, k, v, key_mask, dropout_p)
        _warn_no_xformers()
    mask = None if key_mask is None else key_mask[:, None, None, :]   # broadcast over heads and queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@functools.lru_cache(maxsize=1)
def _warn_no_xformers() -> None:
    warnings.warn("attention_backend is 'xformers' but xformers is not importable; using torch SDPA", stacklevel=3)


def _xformers_attention(xops, q, k, v, key_mask, dropout_p):
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
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout_p)
    return out.transpose(1, 2)


def naive_attention(q, k, v, key_mask=None):
    """Reference implementation for tests: an explicit masked softmax over plain matmuls."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if key_mask is not None:
        key_mask = _safe_key_mask(key_mask.to(torch.bool))
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned gain (QK-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module:
    if kind == "rms":
        return RMSNorm(head_dim)
    if kind == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"qk_norm {kind!r}: expected 'none', 'rms' or 'layer'")


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
        self.q_norm = make_qk_norm(qk_norm, self.head_dim)
        self.k_norm = make_qk_norm(qk_norm, self.head_dim)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.q_norm(self._split(self.to_q(x)))
        k = self.k_norm(self._split(self.to_k(context)))
        v = self._split(self.to_v(context))
        out = attention(q, k, v, key_mask, backend=self.backend)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.dropout(self.to_out(out))
