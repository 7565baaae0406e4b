"""Denoisers: parameter counts, equivalence with diffusers, init, masks, options, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.config import DenoiserConfig, DiTConfig, MMDiTConfig, UNetConfig
from ldm.convert import (dit_pixart_config, dit_to_pixart, to_diffusers, unet_diffusers_config,
                         unet_from_diffusers, unet_to_diffusers)
from ldm.dit import DiT, DiTBlock
from ldm.mmdit import MMDiT, MMDiTBlock
from ldm.training import build_denoiser
from ldm.unet import TransformerBlock, UNet

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "ldm").glob("*.yaml"))
SD15_PARAMS = 859_520_964
DIT_XL2_PUBLISHED = 675_000_000     # DiT paper, class-conditional XL/2 (the code counts 675,129,632)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturb(module, scale=0.02, seed=0):
    """Random-init weights that are not zero anywhere (zero-init layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def load(name):
    from launch.runtime.config import load_config
    return load_config(REPO / "configs" / "ldm" / name)


# ----------------------------------------------------------------------------------------- fidelity

def test_sd15_unet_has_exactly_the_diffusers_parameter_count():
    cfg = load("unet-sd15.yaml")
    with torch.device("meta"):
        ours = build_denoiser(cfg.denoiser)
        from diffusers import UNet2DConditionModel
        theirs = UNet2DConditionModel(**unet_diffusers_config(cfg.denoiser.unet))
    assert count(ours) == SD15_PARAMS
    assert count(theirs) == SD15_PARAMS


def _dit_xl2(**kw) -> DiTConfig:
    return DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, **kw)


def test_dit_xl2_class_form_within_one_percent_and_cross_attention_cost(capsys):
    with torch.device("meta"):
        cls_form = DiT(_dit_xl2(num_classes=1000, cross_attention=False, adaln="zero", learn_sigma=True))
        cls_learned_pos = DiT(_dit_xl2(num_classes=1000, cross_attention=False, adaln="zero", learn_sigma=True,
                                       pos_embed="learned"))
        text_zero = DiT(_dit_xl2(context_dim=1024, adaln="zero"))
        text_single = DiT(_dit_xl2(context_dim=1024, adaln="single"))
    n_cls = count(cls_form)
    assert abs(n_cls - DIT_XL2_PUBLISHED) / DIT_XL2_PUBLISHED < 0.01
    assert count(cls_learned_pos) == 675_129_632       # DiT's own count (its fixed pos-embed is a Parameter)
    d = 1152
    cross_per_block = 4 * (d * d + d)                    # q, k, v, out projections with bias
    caption_proj = (1024 * d + d) + (d * d + d)
    label_table, sigma_out = 1001 * d, d * 16 + 16
    assert count(text_zero) == n_cls - label_table - sigma_out + 28 * cross_per_block + caption_proj
    adaln_saving = 28 * (6 * d * d + 6 * d) + (2 * d * d + 2 * d) - (d * 6 * d + 6 * d) - 28 * 6 * d - 2 * d
    assert count(text_single) == count(text_zero) - adaln_saving
    with capsys.disabled():
        print(f"\nDiT-XL/2 class form {n_cls:,} ({n_cls / DIT_XL2_PUBLISHED - 1:+.2%} vs 675 M); "
              f"cross-attention adds {28 * cross_per_block:,} + caption projection {caption_proj:,}; "
              f"text + adaLN-Zero {count(text_zero):,}; text + adaLN-single {count(text_single):,}")


SD15_TOPOLOGY_SMALL = UNetConfig(in_channels=4, out_channels=4, sample_size=16, model_channels=32,
                                 channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                                 num_heads=8, transformer_depth=1, context_dim=48, linear_projection=False,
                                 norm_groups=32)
SD2_STYLE_SMALL = UNetConfig(sample_size=12, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_levels=(1,), head_dim=16, transformer_depth=2, context_dim=48,
                             linear_projection=True, norm_groups=16)


def _compare_unet(cfg: UNetConfig, batch=2, seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ours = perturb(UNet(cfg)).eval()
    theirs = UNet2DConditionModel(**unet_diffusers_config(cfg)).eval()
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.linspace(3, 980, batch)
    ctx = torch.randn(batch, 9, cfg.context_dim, generator=g)
    mask = torch.ones(batch, 9, dtype=torch.bool)
    mask[-1, 4:] = False
    with torch.no_grad():
        for m in (None, mask):
            a = ours(x, t, ctx, m)
            b = theirs(x, t, ctx, encoder_attention_mask=m).sample
            assert (a - b).abs().max().item() < 1e-4
    back = unet_from_diffusers(theirs.state_dict(), cfg)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    return ours


@pytest.mark.parametrize("cfg", [SD15_TOPOLOGY_SMALL, SD2_STYLE_SMALL], ids=["sd15-topology", "sd2-style"])
def test_unet_matches_diffusers_after_conversion(cfg):
    _compare_unet(cfg)


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers():
    _compare_unet(load("unet-sd15.yaml").denoiser.unet, batch=1)


def test_dit_matches_pixart_after_conversion():
    from diffusers import PixArtTransformer2DModel
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, context_dim=24,
                    learn_sigma=True)
    ours = perturb(DiT(cfg)).eval()
    theirs = PixArtTransformer2DModel(**dit_pixart_config(cfg)).eval()
    theirs.load_state_dict(dit_to_pixart(ours.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.bool)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        a = ours(x, t, ctx, mask)
        b = theirs(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask.long()).sample
    assert a.shape == (2, 8, 8, 8)
    assert (a - b).abs().max().item() < 1e-4
    for bad in (DiTConfig(adaln="zero"), DiTConfig(qk_norm="rms"), DiTConfig(pos_embed="learned")):
        with pytest.raises(ValueError, match="does not match diffusers' PixArtTransformer2DModel"):
            to_diffusers({}, DenoiserConfig(kind="dit", dit=bad))
    with pytest.raises(ValueError, match="qk_norm"):
        unet_to_diffusers({}, UNetConfig(qk_norm="rms"))


# ----------------------------------------------------------------------------------------- behaviour

SMALL_DIT = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, context_dim=24)


def test_dit_adaln_zero_starts_as_zero_output_and_identity_blocks():
    model = DiT(DiTConfig(**SMALL_DIT, adaln="zero"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 24, generator=g)
    out = model(x, torch.tensor([1.0, 500.0, 999.0]), ctx)
    assert torch.count_nonzero(out) == 0
    tokens, c = torch.randn(3, 16, 64, generator=g), torch.randn(3, 64, generator=g)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, model.caption_proj(ctx)), tokens)
    single = DiT(DiTConfig(**SMALL_DIT, adaln="single"))
    assert torch.count_nonzero(single(x, torch.tensor([1.0, 500.0, 999.0]), ctx)) == 0   # final layer zeroed
    assert torch.count_nonzero(single.final.linear.weight) == 0
    assert all(torch.count_nonzero(b.cross_attn.to_out.weight) == 0 for b in single.blocks)


@pytest.mark.parametrize("patch", [1, 2, 4])
@pytest.mark.parametrize("qk_norm,pos", [("none", "sincos"), ("rms", "learned"), ("layer", "sincos")])
def test_dit_options_and_text_mask(patch, qk_norm, pos):
    cfg = DiTConfig(**{**SMALL_DIT, "patch_size": patch}, qk_norm=qk_norm, pos_embed=pos)
    model = perturb(DiT(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 24, generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    t = torch.tensor([5.0, 900.0])
    with torch.no_grad():
        out = model(x, t, ctx, mask)
        ctx2 = ctx.clone()
        ctx2[1, 2:] += 3.0                                        # padding content: must not matter
        assert torch.allclose(model(x, t, ctx2, mask), out, atol=1e-5)
        assert not torch.allclose(model(x, t, ctx2), model(x, t, ctx), atol=1e-4)
        bigger = model(torch.randn(2, 4, 16, 8, generator=g), t, ctx, mask)   # other resolution
    assert out.shape == (2, 4, 8, 8) and bigger.shape == (2, 4, 16, 8) and torch.isfinite(bigger).all()


def test_dit_class_form_uses_labels_and_null_label():
    model = perturb(DiT(DiTConfig(**SMALL_DIT, num_classes=10, cross_attention=False, adaln="zero",
                                  learn_sigma=True))).eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100.0, 100.0])
    with torch.no_grad():
        a = model(x, t, labels=torch.tensor([1, 2]))
        b = model(x, t, labels=torch.tensor([1, 2]), drop=torch.tensor([False, True]))
        c = model(x, t, labels=torch.tensor([1, 10]))
    assert a.shape == (2, 8, 8, 8)
    assert torch.allclose(b, c) and not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_learned_null_caption_substitution(kind):
    cfg = DenoiserConfig(kind=kind, learned_null_tokens=6, pooled_dim=8,
                         unet=UNetConfig(sample_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                         attention_levels=(1,), num_heads=4, context_dim=24, norm_groups=8),
                         dit=DiTConfig(**SMALL_DIT))
    model = perturb(build_denoiser(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 24, generator=g), torch.randn(2, 8)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    t = torch.tensor([50.0, 600.0])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        out = model(x, t, ctx, mask, pooled, drop)
        null_ctx = torch.stack([ctx[0], model.null_context])
        null_pooled = torch.stack([pooled[0], model.null_pooled])
        ref = model(x, t, null_ctx, torch.ones(2, 6, dtype=torch.bool), null_pooled)
        assert torch.allclose(out[1], ref[1], atol=1e-5)
        assert torch.allclose(out[0], model(x, t, ctx, mask, pooled)[0], atol=1e-5)
    assert torch.count_nonzero(model.null_pooled) > 0        # perturbed: really substituted, not zeros


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    cfg = DenoiserConfig(kind=kind, unet=UNetConfig(sample_size=8, model_channels=32, channel_mult=(1, 2),
                                                    num_res_blocks=1, attention_levels=(0, 1), num_heads=4,
                                                    context_dim=24, norm_groups=8),
                         dit=DiTConfig(**SMALL_DIT))
    torch.manual_seed(0)
    model = perturb(build_denoiser(cfg)).train()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24), torch.tensor([10.0, 500.0])
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        model(x, t, ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_load_and_build_on_meta(path):
    from launch.runtime.config import load_config
    cfg = load_config(path)
    assert cfg.stage == "diffusion" and cfg.run_dir == f"runs/{path.stem}"
    with torch.device("meta"):
        model = build_denoiser(cfg.denoiser)
    assert next(model.parameters()).is_meta and count(model) > 0


@pytest.mark.parametrize("kind", ["dit", "mmdit", "unet"])
def test_transformer_blocks_see_contiguous_tokens(kind):
    """Image tokens enter every transformer block laid out contiguously. A transposed view of the patch
    embedding is numerically the same, but residual adds keep their first operand's layout, so it stays
    transposed through the whole stack and every autocast cast and Linear input pays a strided copy."""
    g = torch.Generator().manual_seed(0)
    if kind == "dit":
        model, block_type = DiT(DiTConfig(**SMALL_DIT)), DiTBlock
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 24, generator=g)
    elif kind == "mmdit":
        model, block_type = MMDiT(MMDiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                              num_heads=4, context_dim=32)), MMDiTBlock
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    else:
        model, block_type = UNet(SD15_TOPOLOGY_SMALL), TransformerBlock
        x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 6, 48, generator=g)
    layouts = []
    for module in model.modules():
        if isinstance(module, block_type):
            module.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous()))
    with torch.autocast("cpu", torch.bfloat16):
        model(x, torch.tensor([3.0, 700.0]), ctx).float().sum().backward()
    assert len(layouts) >= 2 and all(layouts), layouts
