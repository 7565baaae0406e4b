"""Which parameters each loss term reaches; the adaptive weight under bf16 and its guard."""
from __future__ import annotations

import math

import pytest
import torch

from autoencoder.discriminator import PatchDiscriminator, build_discriminator
from autoencoder.loss import AutoencoderLoss, hinge_d_loss, vanilla_d_loss
from autoencoder.model import build_autoencoder
from autoencoder.perceptual import LPIPS

from ae_helpers import shapes_batch, tiny_kl, tiny_loss


def _setup(vgg16_file, **loss_kw):
    torch.manual_seed(0)
    cfg = tiny_loss(perceptual_weight=1.0, vgg_path=str(vgg16_file), disc_start=0, **loss_kw)
    ae = build_autoencoder(tiny_kl())
    disc = build_discriminator(cfg)
    loss = AutoencoderLoss(cfg, "kl", LPIPS("vgg16", vgg_path=str(vgg16_file)))
    return cfg, ae, disc, loss


def _with_features(ae):
    """Keep the input of the decoder's last conv, as AutoencoderStage does."""
    feats = {}
    ae.decoder.conv_out.register_forward_hook(lambda m, i, o: feats.__setitem__("x", i[0].detach()))
    return feats


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_each_term_reaches_the_right_parameters(vgg16_file):
    cfg, ae, disc, loss = _setup(vgg16_file, adaptive_weight=False)   # fixed weight: per-term graphs kept
    x = shapes_batch(4, 32)
    for p in disc.parameters():
        p.requires_grad_(False)   # as the stage does for the generator's loss
    out = ae(x)
    res = loss.generator_loss(x, out, step=0, disc=disc)
    assert {"l1", "perceptual", "kl", "gan"} <= res.terms.keys()
    assert "lpips" in res.logs and "perceptual_random" not in res.logs
    assert float(res.logs["d_weight"]) == pytest.approx(cfg.disc_weight)
    reached = {}
    for name in ("perceptual", "gan", "kl"):
        ae.zero_grad(set_to_none=True)
        res.terms[name].backward(retain_graph=True)
        reached[name] = (_grads(ae.decoder), _grads(ae.encoder),
                         all(p.grad is not None for p in ae.decoder.parameters()))
    # LPIPS and GAN: through the reconstruction into every decoder parameter (and on to the encoder)
    for name in ("perceptual", "gan"):
        dec, enc, every = reached[name]
        assert dec > 0 and enc > 0 and every, name
    # KL: a function of the posterior only -> the encoder side; the decoder has no path from it
    dec, enc, _ = reached["kl"]
    assert enc > 0 and dec == 0.0
    assert all(p.grad is None for p in disc.parameters())


def test_adaptive_weight_gradients_equal_differentiating_the_total_loss(vgg16_file):
    """The detached-reconstruction path (no second backward through the autoencoder) gives the same
    adaptive weight and the same parameter gradients as LDM's autograd.grad formulation."""
    cfg, ae, disc, loss = _setup(vgg16_file)
    feats = _with_features(ae)
    x = shapes_batch(4, 32)
    for p in disc.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    res = loss.generator_loss(x, ae(x, generator=gen), 0, disc, ae.decoder.conv_out, feats.pop("x"))
    ae.zero_grad(set_to_none=True)
    res.loss.backward()
    ours = {n: p.grad.clone() for n, p in ae.named_parameters()}

    # reference: LDM's way, on the same sample
    gen = torch.Generator().manual_seed(3)
    out = ae(x, generator=gen)
    xr = out["reconstruction"]
    rec = (x - xr).abs().flatten(1).mean(1) + cfg.perceptual_weight * loss.perceptual(xr, x).float()
    nll = rec.mean()
    g_loss = -disc(xr).float().mean()
    w = ae.decoder.conv_out.weight
    g1 = torch.autograd.grad(nll, w, retain_graph=True)[0]
    g2 = torch.autograd.grad(g_loss, w, retain_graph=True)[0]
    d_ref = (g1.norm() / (g2.norm() + 1e-4)).clamp(0, cfg.adaptive_weight_max) * cfg.disc_weight
    assert float(res.logs["d_weight"]) == pytest.approx(float(d_ref), rel=1e-5)
    total = nll + d_ref.detach() * cfg.disc_factor * g_loss + cfg.kl_weight * (out["kl"] / x[0].numel()).mean()
    assert float(res.loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    ae.zero_grad(set_to_none=True)
    total.backward()
    for n, p in ae.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-7), n
    assert all(p.grad is None for p in disc.parameters())


def test_adaptive_weight_finite_under_bf16_autocast(vgg16_file):
    cfg, ae, disc, loss = _setup(vgg16_file)
    feats = _with_features(ae)
    x = shapes_batch(4, 32)
    for p in disc.parameters():
        p.requires_grad_(False)
    out = ae(x, sample=False)
    ref = loss.generator_loss(x, out, 0, disc, ae.decoder.conv_out, feats.pop("x")).logs["d_weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(x, sample=False)
        assert out["reconstruction"].dtype == torch.bfloat16
        res = loss.generator_loss(x, out, 0, disc, ae.decoder.conv_out, feats.pop("x"))
    w = res.logs["d_weight"]
    assert w.dtype == torch.float32 and math.isfinite(float(w)) and float(w) > 0
    assert abs(float(w) / float(ref) - 1) < 0.3   # same quantity, bf16 noise
    assert math.isfinite(float(res.loss.detach()))
    res.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ae.parameters() if p.grad is not None)


def test_adaptive_weight_guard_and_clamp():
    loss = AutoencoderLoss(tiny_loss(disc_weight=0.5, adaptive_weight_max=100.0), "kl")
    g = torch.ones(3)
    # finite: ratio of gradient norms times disc_weight
    assert math.isclose(float(loss.adaptive_weight(3 * g, g)), 0.5 * 3 / (1 + 1e-4 / 3 ** 0.5), rel_tol=1e-4)
    # GAN gradient ~0: clamped to the maximum
    assert float(loss.adaptive_weight(3 * g, 0 * g)) == pytest.approx(50.0)
    # overflowing or NaN NLL gradient: non-finite ratio -> 0
    assert float(loss.adaptive_weight(g * float("inf"), g)) == 0.0
    assert float(loss.adaptive_weight(g * float("nan"), g)) == 0.0
    # adaptive weighting off: the configured weight
    fixed = AutoencoderLoss(tiny_loss(disc_weight=0.7, adaptive_weight=False), "kl")
    assert float(fixed.adaptive_weight(g, g)) == pytest.approx(0.7)
    # the last layer's weight gradient from its input and output gradient equals autograd's
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    y = conv(h)
    gy = torch.randn_like(y)
    auto, = torch.autograd.grad((y * gy).sum(), conv.weight)
    assert torch.allclose(AutoencoderLoss.last_layer_grad(h, conv, gy), auto, atol=1e-5)


def test_discriminator_objectives():
    hi, lo = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert float(hinge_d_loss(hi, lo)) == 0.0                # confident and right: no hinge loss
    assert float(hinge_d_loss(lo, hi)) == pytest.approx(3.0)
    assert float(vanilla_d_loss(hi, lo)) == pytest.approx(math.log1p(math.exp(-2.0)))
    loss = AutoencoderLoss(tiny_loss(disc_loss="vanilla"), "kl")
    assert float(loss.generator_adversarial(lo)) == pytest.approx(math.log1p(math.exp(2.0)))  # non-saturating
    hinge = AutoencoderLoss(tiny_loss(), "kl")
    assert float(hinge.generator_adversarial(lo)) == pytest.approx(2.0)


def test_gan_gated_by_disc_start():
    torch.manual_seed(0)
    cfg = tiny_loss(disc_start=100, disc_warmup_steps=20)
    loss = AutoencoderLoss(cfg, "kl")
    ae, disc = build_autoencoder(tiny_kl()), build_discriminator(cfg)
    feats = _with_features(ae)
    x = shapes_batch(2, 32)
    before = loss.generator_loss(x, ae(x), 99, disc, ae.decoder.conv_out, feats.pop("x"))
    after = loss.generator_loss(x, ae(x), 100, disc, ae.decoder.conv_out, feats.pop("x"))
    assert "gan" not in before.terms and "d_weight" not in before.logs
    assert "gan" in after.terms and "d_weight" in after.logs
    assert [loss.disc_active(s) for s in (79, 80)] == [False, True]
    assert [loss.gan_active(s) for s in (99, 100)] == [False, True]


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_patch_discriminator(norm):
    d = PatchDiscriminator(3, 64, 3, norm)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    n = sum(p.numel() for p in d.parameters())
    # pix2pix NLayerDiscriminator(ndf=64, n_layers=3): convs 3136 + 131072 + 524288 + 2097152 + 8193,
    # norm affines 256 + 512 + 1024 (convs before a norm carry no bias); without norm: biases 128 + 256 + 512
    with_norm = 3136 + 131072 + 524288 + 2097152 + 8193 + 256 + 512 + 1024
    assert n == (with_norm if norm != "none" else with_norm - 1792 + 896)
    assert with_norm == 2_765_633
