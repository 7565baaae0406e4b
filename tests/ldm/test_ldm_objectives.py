"""Objectives: the time convention, schedules against diffusers, conversions, weighting, noise."""
from __future__ import annotations

import pytest
import torch

from ldm.config import ObjectiveConfig
from ldm.objectives import DiscreteDiffusion, RectifiedFlow, build_objective
from ldm.schedules import alphas_cumprod


def _data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), g


def test_time_convention_noise_end_flow():
    """flow: t = 1 is pure noise (x_1 == eps: unit variance, no data), t = 0 is data; fed as 1000 t."""
    obj = RectifiedFlow()
    x0, g = _data()
    x0 = 3 * x0 + 2                                    # data far from N(0, 1)
    eps = torch.randn(x0.shape, generator=g)
    ones = torch.ones(x0.shape[0])
    assert torch.equal(obj.noisy(x0, eps, ones), eps)
    assert torch.equal(obj.noisy(x0, eps, 0 * ones), x0)
    assert torch.allclose(obj.net_time(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0]))
    assert obj.unit_time(torch.tensor(1.0)) == 1
    times = obj.sampling_times(10)
    assert times[0] == 1 and times[-1] == 0 and bool((times[1:] < times[:-1]).all())


def test_time_convention_noise_end_discrete():
    """eps/v: t = T-1 is the noise end (exactly pure noise under zero-terminal-SNR), fed as the index."""
    x0, g = _data()
    x0 = 3 * x0 + 2
    eps = torch.randn(x0.shape, generator=g)
    last = torch.full((x0.shape[0],), 999.0)
    z = DiscreteDiffusion("v", zero_terminal_snr=True)
    a, b = z.coefficients(last[:1])
    assert a.item() == 0 and b.item() == 1
    x_t = z.noisy(x0, eps, last)
    assert torch.equal(x_t, eps)
    corr = torch.corrcoef(torch.stack([x_t.flatten(), x0.flatten()]))[0, 1]
    assert abs(x_t.var().item() - 1) < 0.01 and abs(corr) < 0.01
    sd = DiscreteDiffusion("eps")                      # SD schedule: almost, not exactly, pure noise
    a, b = sd.coefficients(last[:1])
    assert 0.05 < a.item() < 0.08                      # sqrt(abar_999) = 0.068 (SD's known non-zero SNR)
    assert torch.equal(sd.net_time(torch.tensor([0.0, 999.0])), torch.tensor([0.0, 999.0]))
    times = sd.sampling_times(10)
    assert times[0] == 999 and times[-1] == -1          # starts at the noise end, ends at the clean marker
    a, b = sd.coefficients(times[-1:])
    assert a.item() == 1 and b.item() == 0
    assert sd.unit_time(torch.tensor(999.0)) == 1
    t = sd.sample_t(10000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.round())


@pytest.mark.parametrize("schedule,diffusers_name,zsnr", [
    ("linear", "linear", False), ("scaled_linear", "scaled_linear", False),
    ("cosine", "squaredcos_cap_v2", False), ("scaled_linear", "scaled_linear", True)])
def test_schedules_match_diffusers(schedule, diffusers_name, zsnr):
    from diffusers import DDPMScheduler
    start, end = (1e-4, 0.02) if schedule == "linear" else (0.00085, 0.012)
    ref = DDPMScheduler(beta_schedule=diffusers_name, beta_start=start, beta_end=end,
                        rescale_betas_zero_snr=zsnr).alphas_cumprod.double()
    ours = alphas_cumprod(schedule, 1000, start, end, zsnr)
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()
    if zsnr:
        assert ours[-1] == 0


@pytest.mark.parametrize("obj", [DiscreteDiffusion("eps", schedule="linear", beta_start=1e-4, beta_end=0.02),
                                 DiscreteDiffusion("v"), DiscreteDiffusion("v", zero_terminal_snr=True),
                                 RectifiedFlow(time_sampling="uniform")], ids=["eps", "v", "v-ztsnr", "flow"])
def test_prediction_conversions_round_trip(obj):
    x0, g = _data(64)
    eps = torch.randn(x0.shape, generator=g)
    t = obj.sample_t(64, generator=g)
    if obj.kind == "eps":
        t = t.clamp(max=998)
    inp = obj.training_inputs(x0, t=t, noise=eps)
    x0_hat, eps_hat = obj.to_x0_eps(inp.target, inp.x_t, t)   # the ideal prediction recovers both
    assert torch.allclose(x0_hat, x0, atol=2e-4) and torch.allclose(eps_hat, eps, atol=2e-4)
    assert torch.allclose(obj.to_velocity(inp.target, inp.x_t, t), obj.velocity(x0, eps, t), atol=2e-4)
    if obj.kind == "flow":
        assert torch.allclose(inp.target, eps - x0)
    assert obj.loss(inp.target, inp.target, inp.weight).item() == 0


@pytest.mark.parametrize("obj,factor", [
    (DiscreteDiffusion("eps", min_snr_gamma=5.0), lambda snr, t: snr),
    (DiscreteDiffusion("v", min_snr_gamma=5.0), lambda snr, t: snr + 1),
    (RectifiedFlow(min_snr_gamma=5.0), lambda snr, t: 1 / t ** 2)], ids=["eps", "v", "flow"])
def test_min_snr_gamma_is_clamped_x0_weighting(obj, factor):
    """weight * (prediction-space / x0-space error ratio) == min(SNR, gamma), for every kind."""
    t = obj.sample_t(512, generator=torch.Generator().manual_seed(1)).clamp(min=1e-3)
    snr = obj.snr(t)
    assert torch.allclose(obj.weight(t) * factor(snr, t), snr.clamp(max=5.0), rtol=1e-4)
    # and the factor is right: the prediction error equals factor x the implied x0 error
    x0, g = _data(512)
    eps = torch.randn(x0.shape, generator=g)
    inp = obj.training_inputs(x0, t=t, noise=eps)
    bad = inp.target + 0.01 * torch.randn(x0.shape, generator=g)
    x0_bad = obj.to_x0(bad, inp.x_t, t)
    ratio = obj.per_sample_loss(bad, inp.target) / obj.per_sample_loss(x0_bad, x0)
    assert torch.allclose(ratio, factor(snr, t), rtol=1e-2)
    assert torch.equal(DiscreteDiffusion("eps").weight(t), torch.ones_like(t))


def test_offset_noise_adds_per_channel_constant():
    obj = DiscreteDiffusion("eps", offset_noise=0.5)
    x0 = torch.zeros(2000, 4, 16, 16)
    eps = obj.sample_noise(x0, torch.Generator().manual_seed(0))
    channel_means = eps.mean(dim=(2, 3))
    assert abs(channel_means.var().item() - 0.25) < 0.03           # 0.5^2 from the offset
    assert abs(eps.var().item() - 1.25) < 0.05
    plain = DiscreteDiffusion("eps").sample_noise(x0, torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).var().item() < 0.01


def test_flow_time_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    u = RectifiedFlow(time_sampling="uniform").sample_t(20000, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() >= 0 and u.max() <= 1
    ln = RectifiedFlow(time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0).sample_t(20000, generator=g)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    shifted = RectifiedFlow(time_sampling="logit_normal", shift=3.0).sample_t(20000, generator=g)
    assert shifted.median() > 0.7                               # shift 3 moves the median from 0.5 to 0.75
    assert torch.allclose(RectifiedFlow.shift_time(torch.tensor([0.0, 0.5, 1.0]), 3.0),
                          torch.tensor([0.0, 0.75, 1.0]))


def test_build_objective_from_config():
    assert isinstance(build_objective(ObjectiveConfig(kind="flow")), RectifiedFlow)
    v = build_objective(ObjectiveConfig(kind="v", zero_terminal_snr=True, schedule="cosine"))
    assert v.kind == "v" and v.alphas_cumprod[-1] == 0
    with pytest.raises(ValueError, match="zero_terminal_snr needs kind: v"):
        ObjectiveConfig(kind="eps", zero_terminal_snr=True).validate()
