"""AutoencoderStage through the runtime protocol, with plain modules and torch AdamW as `nets`."""
from __future__ import annotations

import math

import pytest
import torch

from autoencoder.training import AutoencoderStage, frozen, latent_statistics, unwrap
from launch.runtime.config import load_config

from ae_helpers import shapes_batch, tiny_kl, tiny_loss


def _stage(ae_kw=None, **loss_kw) -> AutoencoderStage:
    torch.manual_seed(0)
    loss_kw.setdefault("perceptual_weight", 0.0)
    if loss_kw["perceptual_weight"] == 0:
        return AutoencoderStage(tiny_kl(**(ae_kw or {})), tiny_loss(**loss_kw), build_lpips=False)
    return AutoencoderStage(tiny_kl(**(ae_kw or {})), tiny_loss(**loss_kw))


def _optimizers(stage: AutoencoderStage, lr: float = 1e-3) -> dict:
    return {name: torch.optim.AdamW(stage.param_groups(name), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
            for name in stage.trainable_modules()}


def _train(stage, steps, size=32, batch=8, lr=1e-3, seed0=0):
    nets = stage.trainable_modules()
    opts = _optimizers(stage, lr)
    history = []
    step = 0
    for i in range(steps):
        losses, logs = stage.training_step(nets, {"image": shapes_batch(batch, size, seed=seed0 + i)}, step)
        for name in nets:   # autoencoder first: its graph runs through D's current weights
            if name in losses:
                opts[name].zero_grad(set_to_none=True)
                losses[name].backward()
                opts[name].step()
        if "autoencoder" in losses:
            step += 1
        history.append((losses, logs))
    return history


def test_short_run_lowers_reconstruction_moving_average():
    stage = _stage({"ch": 16}, disc_start=10_000)
    hist = _train(stage, 50, lr=2e-3)
    l1 = [float(logs["l1"]) for _, logs in hist]
    psnr = [float(logs["psnr"]) for _, logs in hist]
    first, last = sum(l1[:10]) / 10, sum(l1[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert sum(psnr[-10:]) / 10 > sum(psnr[:10]) / 10 + 1.0            # dB
    assert all(set(losses) == {"autoencoder"} for losses, _ in hist)   # before disc_start: no D at all
    assert "kl" in hist[-1][1] and "lpips" not in hist[-1][1]


def test_random_perceptual_backbone_is_logged_apart():
    stage = _stage(disc_start=10_000, perceptual_weight=1.0, perceptual_backbone="random")
    assert stage.loss.perceptual_name == "perceptual_random"
    losses, logs = stage.training_step(stage.trainable_modules(), {"image": shapes_batch(2, 32)}, 0)
    assert "perceptual_random" in logs and "lpips" not in logs
    assert float(logs["perceptual_random"]) > 0


def test_gan_phase_returns_both_losses_and_g_leaves_d_without_grad():
    stage = _stage(disc_start=0)
    nets = stage.trainable_modules()
    assert list(nets) == ["autoencoder", "discriminator"]
    losses, logs = stage.training_step(nets, {"image": shapes_batch(4, 32)}, step=0)
    assert set(losses) == {"autoencoder", "discriminator"}
    for key in ("d_weight", "logits_real", "logits_fake", "disc_loss", "g_loss", "psnr", "l1", "kl"):
        assert key in logs and math.isfinite(float(logs[key])), key
    d, ae = nets["discriminator"], nets["autoencoder"]
    assert all(p.requires_grad for p in d.parameters())          # flags restored after G's loss
    losses["autoencoder"].backward()
    assert all(p.grad is None for p in d.parameters())           # G's loss leaves D untouched
    assert ae.decoder.conv_out.weight.grad is not None
    ae.zero_grad(set_to_none=True)
    losses["discriminator"].backward()
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in ae.parameters())          # D trains on detached fakes
    # a few joint steps with both optimizers
    hist = _train(stage, 4, batch=4)
    assert all(set(l) == {"autoencoder", "discriminator"} for l, _ in hist)
    assert all(math.isfinite(float(l["discriminator"].detach())) for l, _ in hist)


def test_disc_start_and_warmup_gate_by_generator_steps():
    stage = _stage(disc_start=10, disc_warmup_steps=4)
    nets = stage.trainable_modules()
    x = {"image": shapes_batch(2, 32)}
    phases = {}
    for step in (5, 6, 9, 10):
        losses, logs = stage.training_step(nets, x, step)
        phases[step] = (sorted(losses), "d_weight" in logs)
    assert phases[5] == (["autoencoder"], False)
    assert phases[6] == (["autoencoder", "discriminator"], False)   # D warms up, G has no GAN term yet
    assert phases[9] == (["autoencoder", "discriminator"], False)
    assert phases[10] == (["autoencoder", "discriminator"], True)
    no_disc = _stage(disc_weight=0.0)
    assert list(no_disc.trainable_modules()) == ["autoencoder"]
    assert set(no_disc.training_step(no_disc.trainable_modules(), x, 0)[0]) == {"autoencoder"}


def test_alternating_steps():
    stage = _stage({"regularizer": "vq", "n_embed": 16}, disc_start=0, gan_steps="alternating")
    nets = stage.trainable_modules()
    x = {"image": shapes_batch(2, 32)}
    vq = stage.autoencoder.quantize
    seen = []
    for _ in range(4):
        before = int(vq.updates)
        losses, logs = stage.training_step(nets, x, step=0)
        seen.append((sorted(losses), int(vq.updates) - before))
    assert seen == [(["autoencoder"], 1), (["discriminator"], 0)] * 2   # D's turn leaves the codebook alone


def test_vq_stage_logs_usage():
    stage = _stage({"regularizer": "vq", "n_embed": 16, "vq_ema": True}, disc_start=0)
    losses, logs = stage.training_step(stage.trainable_modules(), {"image": shapes_batch(2, 32)}, 0)
    for key in ("codebook", "usage", "perplexity", "d_weight"):
        assert key in logs, key
    losses["autoencoder"].backward()


def test_learned_logvar_and_param_groups():
    stage = _stage(disc_start=0, learn_logvar=True, logvar_init=0.5, disc_lr=3e-5)
    names = [n for n, _ in stage.autoencoder.named_parameters()]
    assert "logvar" in names
    losses, logs = stage.training_step(stage.trainable_modules(), {"image": shapes_batch(2, 32)}, 0)
    assert float(logs["logvar"]) == pytest.approx(0.5)
    losses["autoencoder"].backward()
    assert stage.autoencoder.logvar.grad is not None and float(stage.autoencoder.logvar.grad) != 0
    groups = stage.param_groups("autoencoder")
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in stage.autoencoder.parameters())
    assert any(g.get("weight_decay") == 0.0 and any(p is stage.autoencoder.logvar for p in g["params"]) for g in groups)
    assert all(g["lr"] == 3e-5 for g in stage.param_groups("discriminator"))
    fixed = _stage()
    assert "logvar" not in dict(fixed.autoencoder.named_parameters())


def test_batchnorm_discriminator_sees_mixed_batches():
    stage = _stage(disc_start=0, disc_norm="batch")
    d = stage.discriminator
    sizes = []
    d.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    stage.training_step(stage.trainable_modules(), {"image": shapes_batch(3, 32)}, 0)
    assert sizes == [6, 6]   # G's and D's calls both get real + fake concatenated


def test_validation_preview_and_latent_statistics():
    stage = _stage()
    ae = stage.autoencoder.eval()
    x = shapes_batch(4, 32)
    val = stage.validation_step({"autoencoder": ae}, {"image": x}, seed=0)
    assert set(val) == {"l1", "psnr", "ssim", "kl"}
    assert val == stage.validation_step({"autoencoder": ae}, {"image": x}, seed=0)   # deterministic
    assert -1 <= val["ssim"] <= 1 and val["l1"] > 0
    grid = stage.preview(ae, {"image": x}, seed=0)
    assert grid.shape == (4, 3, 32, 64) and float(grid.abs().max()) <= 1
    assert torch.equal(grid[..., :32], x)
    batches = [shapes_batch(4, 32, seed=s) for s in range(3)]
    stats = latent_statistics(ae, ({"image": b} for b in batches + [torch.full((4, 3, 32, 32), float("nan"))]),
                              num_batches=3, sample=False)
    with torch.no_grad():
        z = torch.cat([ae.encode(b).mode() for b in batches]).double()
    assert stats.count == z.numel()
    assert stats.shift_factor == pytest.approx(float(z.mean()), abs=1e-6)
    assert stats.scaling_factor == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-5)
    assert set(stats.as_dict()) >= {"scaling_factor", "shift_factor"}


def test_frozen_and_unwrap():
    m = torch.nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with frozen(m):
        assert not any(p.requires_grad for p in m.parameters())
    assert m.weight.requires_grad and not m.bias.requires_grad

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Engine(m)) is m and unwrap(m) is m


def test_stage_from_shipped_small_config(repo):
    cfg = load_config(repo / "configs/autoencoder/kl-f4-small.yaml", ["loss.disc_start=0"])
    with pytest.warns(UserWarning, match="perceptual_weight"):
        stage = AutoencoderStage.from_config(cfg)
    assert stage.main_module == "autoencoder"
    nets = stage.trainable_modules()
    stage.setup(torch.device("cpu"))
    losses, _ = stage.training_step(nets, {"image": shapes_batch(2, 32)}, 0)
    assert set(losses) == {"autoencoder", "discriminator"}
