"""MMDiT (ldm/mmdit.py): the SD3-medium parameter count, equivalence with diffusers' SD3Transformer2DModel
through ldm/convert_mmdit.py, zero init, text masks, RoPE, and what the conversion refuses."""
from __future__ import annotations

import pytest
import torch

from ldm.config import DenoiserConfig, MMDiTConfig
from ldm.convert_mmdit import (mmdit_config_from_diffusers, mmdit_from_diffusers, mmdit_to_diffusers,
                               sd3_diffusers_config)
from ldm.mmdit import MMDiT
from ldm.training import build_denoiser, latent_shape

SD3_MEDIUM_PARAMS = 2_028_328_000   # diffusers' SD3Transformer2DModel for stabilityai/stable-diffusion-3-medium


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturb(module, scale=0.05, seed=0):
    """Move every weight off its init: zero-initialised modulations would hide a mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def tiny(**kw) -> MMDiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, context_dim=32,
                pos_embed_max_size=6)
    base.update(kw)
    return MMDiTConfig(**base)


def sd3_medium() -> MMDiTConfig:
    return MMDiTConfig(input_size=128, patch_size=2, in_channels=16, hidden_size=1536, depth=24, num_heads=24,
                       context_dim=4096, qk_norm="none", pos_embed_max_size=192)


def test_sd3_medium_has_exactly_the_diffusers_parameter_count():
    from diffusers import SD3Transformer2DModel
    cfg = sd3_medium()
    with torch.device("meta"):
        ours = MMDiT(cfg, pooled_dim=2048)
        theirs = SD3Transformer2DModel(**sd3_diffusers_config(cfg, 2048))
    assert count(ours) == SD3_MEDIUM_PARAMS
    assert count(theirs) == SD3_MEDIUM_PARAMS


@pytest.mark.parametrize("qk_norm,latent", [("none", 8), ("rms", 8), ("layer", 8), ("rms", 12)],
                         ids=["sd3-no-qk-norm", "rms-qk-norm", "layer-qk-norm", "larger-grid-crop"])
def test_matches_diffusers_sd3_transformer(qk_norm, latent):
    """Same weights, same inputs: outputs agree to 1e-4. A 12x12 latent crops a 6x6 token grid out of the
    position table centrally in both models."""
    from diffusers import SD3Transformer2DModel
    cfg = tiny(qk_norm=qk_norm)
    torch.manual_seed(0)
    ours = perturb(MMDiT(cfg, pooled_dim=24)).eval()
    theirs = SD3Transformer2DModel(**sd3_diffusers_config(cfg, 24)).eval()
    theirs.load_state_dict(mmdit_to_diffusers(ours.state_dict(), cfg, 24), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([300.0, 870.0])
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 24, generator=g)
    with torch.no_grad():
        a = ours(x, t, ctx, pooled=pooled)
        b = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    assert a.shape == b.shape == x.shape
    assert a.abs().max() > 0.1          # not a trivially zero comparison
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", ["rms", "none"])
def test_gradients_match_diffusers_sd3_transformer(qk_norm):
    """Training needs the backward equal too: our hand-written pieces (the fused q/k/v split's gradient
    written straight into the projection's layout, the RMS q-norm carrying the scores' 1/sqrt(d)) against
    autograd through diffusers' separate projections. Every weight's gradient, mapped by the converter,
    and the input's agree to 1e-4 of their size."""
    from diffusers import SD3Transformer2DModel
    cfg = tiny(qk_norm=qk_norm)
    torch.manual_seed(0)
    ours = perturb(MMDiT(cfg, pooled_dim=24))
    theirs = SD3Transformer2DModel(**sd3_diffusers_config(cfg, 24))
    theirs.load_state_dict(mmdit_to_diffusers(ours.state_dict(), cfg, 24), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300.0, 870.0])
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 24, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ours(xa, t, ctx, pooled=pooled) * target).sum().backward()
    out = theirs(hidden_states=xb, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    (out * target).sum().backward()

    def close(a, b):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    close(xa.grad, xb.grad)
    # None: weights the last (context-pre-only) block never uses (we skip its text queries; diffusers
    # computes and drops them, a zero gradient)
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in ours.named_parameters()}
    grads.update({k: torch.zeros_like(b) for k, b in ours.named_buffers()})
    mapped = mmdit_to_diffusers(grads, cfg, 24)
    checked = 0
    for name, p in theirs.named_parameters():
        close(mapped[name], p.grad)
        checked += p.grad.abs().max().item() > 0
    assert checked > 0.9 * len(list(theirs.parameters()))     # not a comparison of zeros


def test_conversion_round_trips_exactly_and_reads_the_config_back():
    from diffusers import SD3Transformer2DModel
    cfg = tiny(qk_norm="rms")
    ours = perturb(MMDiT(cfg, pooled_dim=24))
    theirs = SD3Transformer2DModel(**sd3_diffusers_config(cfg, 24))
    theirs.load_state_dict(mmdit_to_diffusers(ours.state_dict(), cfg, 24))
    back = mmdit_from_diffusers(theirs.state_dict(), cfg, 24)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    read, pooled = mmdit_config_from_diffusers(theirs.config)
    assert (read.hidden_size, read.depth, read.num_heads, read.qk_norm, read.max_grid, pooled) == (64, 3, 4, "rms", 6, 24)


def test_conversion_refuses_what_sd3_cannot_hold():
    for cfg, pooled, reason in [(tiny(rope=True), 24, "RoPE"), (tiny(), 0, "pooled"),
                                (tiny(context_pre_only=False), 24, "context-pre-only"),
                                (tiny(mlp_ratio=2.0), 24, "mlp_ratio")]:
        with pytest.raises(ValueError, match=reason):
            mmdit_to_diffusers(MMDiT(cfg, pooled).state_dict(), cfg, pooled)


def test_starts_at_zero_output_and_every_parameter_gets_a_gradient():
    """Every parameter but one learns: the context-pre-only block computes no text queries, yet keeps their
    norm so the weights load into diffusers' block (which holds one) strictly."""
    cfg = tiny(rope=True, pos_embed="none", qk_norm="rms")
    model = MMDiT(cfg, pooled_dim=24)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randn(2, 24)
    assert torch.equal(model(x, torch.tensor([10.0, 500.0]), ctx, pooled=pooled), torch.zeros_like(x))
    perturb(model)
    model(x, torch.tensor([10.0, 500.0]), ctx, pooled=pooled).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == ["blocks.2.attn.txt_q_norm.weight"], no_grad


def test_masked_text_padding_does_not_change_the_output():
    cfg = tiny(qk_norm="rms")
    model = perturb(MMDiT(cfg, pooled_dim=24)).eval()
    x, pooled, t = torch.randn(1, 4, 8, 8), torch.randn(1, 24), torch.tensor([400.0])
    ctx = torch.randn(1, 7, 32)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    with torch.no_grad():
        short = model(x, t, ctx[:, :4], pooled=pooled)
        padded = model(x, t, torch.cat([ctx[:, :4], 50 * torch.randn(1, 3, 32)], 1), mask, pooled=pooled)
        unmasked = model(x, t, torch.cat([ctx[:, :4], 50 * torch.randn(1, 3, 32)], 1), pooled=pooled)
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)
    assert (unmasked - short).abs().max() > 1e-3


def test_rope_sees_token_positions():
    """Without absolute positions, RoPE is what tells tokens apart: rolling the latent no longer rolls the
    output (a position-free model would be exactly shift-equivariant)."""
    cfg = tiny(rope=True, pos_embed="none")
    model = perturb(MMDiT(cfg, pooled_dim=24)).eval()
    x, ctx, pooled, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32), torch.randn(1, 24), torch.tensor([300.0])
    with torch.no_grad():
        rolled_out = model(torch.roll(x, 2, dims=-1), t, ctx, pooled=pooled)
        out_rolled = torch.roll(model(x, t, ctx, pooled=pooled), 2, dims=-1)
    assert (rolled_out - out_rolled).abs().max() > 1e-3


def test_built_from_the_denoiser_config_and_bad_options_are_named():
    cfg = DenoiserConfig(kind="mmdit", pooled_dim=24, mmdit=tiny())
    assert isinstance(build_denoiser(cfg), MMDiT) and latent_shape(cfg) == (4, 8, 8)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        tiny(pos_embed_max_size=2).validate()
    with pytest.raises(ValueError, match="without rope"):
        tiny(pos_embed="none").validate()
    with pytest.raises(ValueError, match="exceeds the position grid"):
        MMDiT(tiny(), 24)(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), torch.randn(1, 5, 32),
                          pooled=torch.randn(1, 24))
