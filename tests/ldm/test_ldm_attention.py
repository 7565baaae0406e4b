"""Attention: SDPA with a key padding mask equals a naive softmax; xformers equals SDPA on CUDA."""
from __future__ import annotations

import pytest
import torch

from ldm.attention import Attention, RMSNorm, attention, naive_attention, xformers_available


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


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_forward_and_gradients_equal_the_formula(dtype, tol, scale):
    """RMSNorm's hand-written backward against autograd through x * rsqrt(mean(x^2) + eps) * w * scale in
    float64, on q as the MMDiT hands it over: one slice of a permuted [B, N, 3, heads, d] projection
    (strided, with gaps; an fp32 input must not be changed in place). scale: the attention's 1/sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, scale=scale)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(16, generator=g))
    qkv = torch.randn(2, 5, 3, 3, 16, generator=g).to(dtype)
    x = qkv.permute(2, 0, 3, 1, 4)[0].requires_grad_()        # [B, heads, N, d]
    before = x.detach().clone()
    grad = torch.randn(2, 3, 5, 16, generator=g).to(dtype)
    y = norm(x)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), grad)

    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * w64 * scale
    rx, rw = torch.autograd.grad(y64, (x64, w64), grad.double())
    assert y.dtype == gx.dtype == dtype and gw.dtype == torch.float32
    assert torch.equal(x.detach(), before)
    for ours, ref in ((y, y64), (gx, rx), (gw, rw)):
        err = (ours.double() - ref).abs().max() / ref.abs().max()
        assert err < tol, (err, tol)


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


def test_bf16_cpu_math_path_matches_fp32_including_chunks(monkeypatch):
    """bf16 on CPU runs matmul-softmax-matmul in (batch, head) chunks: same as the fp32 reference within
    bf16 rounding, with and without a mask, in one piece and split into chunks, gradients included."""
    import ldm.attention as A

    q, k, v = _qkv(b=3, h=4, lq=12, lk=7)
    ref = naive_attention(q, k, v, _mask())
    for chunk in (1 << 20, 7 * 12 * 3):                       # one piece; chunks of 3 (batch, head) pairs
        monkeypatch.setattr(A, "_CHUNK_SCORES", chunk)
        qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
        assert A._use_cpu_math(qb, kb, 0.0)
        out = attention(qb, kb, vb, _mask())
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() < 3e-2
        out.float().sum().backward()
        q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
        naive_attention(q32, k32, v32, _mask()).sum().backward()
        assert (kb.grad.float() - k32.grad).abs().max() < 5e-2 * k32.grad.abs().max()
        assert torch.all(kb.grad[1, :, 3:] == 0)                # masked keys get no gradient


def test_packed_caption_equals_padded():
    """Cross-attention on packed real tokens (padding rows never projected) equals the padded path."""
    from ldm.attention import pack_tokens

    torch.manual_seed(0)
    attn = Attention(32, 4, context_dim=24).eval()
    x, ctx = torch.randn(3, 5, 32), torch.randn(3, 7, 24)
    mask = _mask()
    packed = pack_tokens(ctx, mask)
    assert packed.rows.shape[0] == int(mask.sum())
    with torch.no_grad():
        assert torch.allclose(attn(x, packed, mask), attn(x, ctx, mask), atol=1e-6)
    assert pack_tokens(ctx, torch.ones(3, 7, dtype=torch.bool)) is ctx     # nothing to drop: unchanged


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=["fp32-sdpa", "bf16-cpu-math"])
def test_rms_qk_norm_module_equals_the_naive_formula(dtype, tol):
    """With an RMS q-norm the module hands q over already scaled by 1/sqrt(d) (and tells `attention` so):
    the result must still be softmax(norm(q) norm(k)^T / sqrt(d)) v, on both CPU paths."""
    torch.manual_seed(0)
    attn = Attention(64, 4, context_dim=24, qk_norm="rms").eval()
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.add_(0.3 * torch.randn(16))
    x, ctx, mask = torch.randn(3, 5, 64), torch.randn(3, 7, 24), _mask()
    with torch.no_grad():
        split = lambda t: t.view(3, -1, 4, 16).transpose(1, 2)
        rms = lambda t, norm: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
        q, k = rms(split(attn.to_q(x)), attn.q_norm), rms(split(attn.to_k(ctx)), attn.k_norm)
        v = split(attn.to_v(ctx))
        ref = attn.to_out(naive_attention(q, k, v, mask).transpose(1, 2).reshape(3, 5, 64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = attn(x, ctx, mask).float()
    assert attn.q_norm.scale == 0.25
    assert (out - ref).abs().max() < tol * ref.abs().max(), (out - ref).abs().max()
