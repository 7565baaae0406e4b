"""Attention: SDPA with a key padding mask equals a naive softmax; xformers equals SDPA on CUDA."""
from __future__ import annotations

import pytest
import torch

from ldm.attention import Attention, attention, naive_attention, xformers_available


def _qkv(b=3, h=4, lq=10, lk=7, d=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device) for n in (lq, lk, lk)]


def _mask(device="cpu"):
    return torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]],
                        dtype=torch.bool, device=device)


def test_sdpa_masked_equals_naive():
    q, k, v = _qkv()
    mask = _mask()
    out = attention(q, k, v, mask)
    assert torch.allclose(out, naive_attention(q, k, v, mask), atol=1e-5)
    assert torch.allclose(attention(q, k, v), naive_attention(q, k, v), atol=1e-5)
    # masked keys do not matter: change them and nothing moves
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:] += 5.0
    v2[1, :, 3:] -= 7.0
    assert torch.allclose(attention(q, k2, v2, mask)[1], out[1], atol=1e-6)


def test_fully_masked_row_is_finite():
    q, k, v = _qkv()
    mask = torch.zeros(3, 7, dtype=torch.bool)
    out = attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, attention(q, k, v), atol=1e-6)   # treated as unmasked


def test_module_cross_attention_ignores_padding_content():
    torch.manual_seed(0)
    attn = Attention(32, 4, context_dim=24, qk_norm="rms").eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 6, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    ctx2 = ctx.clone()
    ctx2[1, 2:] = torch.randn(4, 24)
    with torch.no_grad():
        a, b = attn(x, ctx, mask), attn(x, ctx2, mask)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(attn(x, ctx2)[1], a[1], atol=1e-3)


def test_xformers_backend_falls_back_on_cpu():
    q, k, v = _qkv()
    out = attention(q, k, v, _mask(), backend="xformers")     # CPU tensors: SDPA, same numbers
    assert torch.allclose(out, attention(q, k, v, _mask()), atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
def test_xformers_matches_sdpa_on_cuda():
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3)):
        q, k, v = (t.to(dtype) for t in _qkv(b=2, h=8, lq=64, lk=77, d=64, device="cuda"))
        mask = torch.ones(2, 77, dtype=torch.bool, device="cuda")
        mask[1, 9:] = False
        ref = attention(q, k, v, mask, backend="sdpa")
        out = attention(q, k, v, mask, backend="xformers")
        assert (out - ref).abs().max().item() < tol
