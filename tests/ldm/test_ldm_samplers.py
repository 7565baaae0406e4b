"""Samplers with an analytic optimal denoiser, spacing against diffusers, determinism.

For x0 ~ N(mu, Sigma) and x_t = a x0 + b eps, the optimal denoiser is
    E[x0 | x_t] = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu),
so every sampler, fed that denoiser in the objective's own parametrisation, must return N(mu, Sigma) up to
its discretisation error. Tolerances (20,000 samples; sampling std error ~0.007 on the mean, ~0.01 on the
covariance): |mean - mu|_max < 0.03 and |cov - Sigma|_max < 0.05 with the step counts below (measured
discretisation bias <= 0.02).
"""
from __future__ import annotations

import pytest
import torch

from ldm.objectives import DiscreteDiffusion, RectifiedFlow
from ldm.samplers import SAMPLERS, ddim, sample

MU = torch.tensor([0.5, -1.0])
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.61]])
STEPS = {"ddpm": 400, "ddim": 200, "euler": 200, "heun": 40, "dpmpp_2m": 40}
OBJECTIVES = {
    "eps-linear": lambda: DiscreteDiffusion("eps", schedule="linear", beta_start=1e-4, beta_end=0.02),
    "v-scaled-linear-ztsnr": lambda: DiscreteDiffusion("v", schedule="scaled_linear", zero_terminal_snr=True),
    "v-cosine": lambda: DiscreteDiffusion("v", schedule="cosine"),
    "flow-shift3": lambda: RectifiedFlow(shift=3.0),
}


def optimal_denoiser(objective):
    """model(x, t, cond) returning the objective's prediction for Gaussian data (closed form)."""
    def model(x, t, cond):
        a, b = objective.coefficients(t)
        a3, b3 = a[:, None, None], b[:, None, None]
        cov = a3 * a3 * SIGMA + b3 * b3 * torch.eye(2)
        gain = a3 * SIGMA @ torch.linalg.inv(cov)                      # [B, 2, 2]
        x0 = MU + ((x - a[:, None] * MU)[:, None, :] @ gain.transpose(1, 2))[:, 0]
        eps = (x - a[:, None] * x0) / b[:, None]
        return objective.target(x0, eps, t)
    return model


@pytest.mark.parametrize("sampler", list(STEPS))
@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_optimal_gaussian_denoiser_reproduces_data(objective_name, sampler):
    objective = OBJECTIVES[objective_name]()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 2, generator=g)
    with torch.no_grad():
        out = sample(sampler, optimal_denoiser(objective), objective, noise, {}, STEPS[sampler], generator=g)
    mean_err = (out.mean(0) - MU).abs().max().item()
    cov_err = (torch.cov(out.T) - SIGMA).abs().max().item()
    assert mean_err < 0.03, mean_err
    assert cov_err < 0.05, cov_err


def test_eps_on_cosine_trap_and_its_remedies():
    """An eps error of 0.01 near the cosine schedule's noise end (a = 5e-5 at t = 999) becomes an x0 error of
    ~200 on the first step of a trailing grid: the samples land far off the data. Starting from t = 981
    (leading spacing) avoids it; clamping the data estimate (clip_x0) bounds it."""
    objective = DiscreteDiffusion("eps", schedule="cosine")
    exact = optimal_denoiser(objective)

    def wrong_near_noise(x, t, cond):
        return exact(x, t, cond) + 0.01 * (t[:, None] > 900)

    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))

    def mean_err(**kw):
        out = sample("ddim", wrong_near_noise, objective, noise, {}, 50, **kw)
        return (out.mean(0) - MU).abs().max().item()

    assert mean_err(spacing="trailing") > 1.0
    assert mean_err(spacing="leading") < 0.1
    assert mean_err(spacing="trailing", clip_x0=3.0) < 0.25


def test_first_order_error_shrinks_with_steps():
    objective = RectifiedFlow(shift=1.0)
    errs = []
    for steps in (20, 80):
        g = torch.Generator().manual_seed(0)
        out = sample("euler", optimal_denoiser(objective), objective, torch.randn(20000, 2, generator=g), {}, steps)
        errs.append((torch.cov(out.T) - SIGMA).abs().max().item())
    assert errs[1] < errs[0] / 2.5, errs   # first order: 4x the steps, ~4x smaller bias


@pytest.mark.parametrize("spacing,first,last", [("leading", 981, 1), ("trailing", 999, 19), ("linspace", 999, 0)])
def test_discrete_spacing_matches_diffusers(spacing, first, last):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(50)
    times = DiscreteDiffusion().sampling_times(50, spacing)
    assert times[:-1].long().tolist() == sched.timesteps.tolist()
    assert (times[0].item(), times[-2].item(), times[-1].item()) == (first, last, -1)


def test_ddim_matches_diffusers_scheduler():
    """Our DDIM (eta 0) on a fixed eps model equals diffusers' DDIMScheduler step by step."""
    from diffusers import DDIMScheduler
    objective = DiscreteDiffusion("eps", schedule="scaled_linear")
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(20)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.3

    def model(x, t, cond):
        return torch.tanh(x @ w) + 0.001 * t[:, None]

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    ours = ddim(model, objective, x.clone(), {}, objective.sampling_times(20, "trailing"))
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, t.float().expand(8), {}), t, ref).prev_sample
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeded_and_batched(sampler):
    objective = DiscreteDiffusion("v", schedule="cosine")
    model = optimal_denoiser(objective)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        runs.append(sample(sampler, model, objective, torch.randn(16, 2, generator=g), {}, 10, eta=1.0,
                           generator=g))
    assert torch.equal(runs[0], runs[1])
    g = torch.Generator().manual_seed(8)
    other = sample(sampler, model, objective, torch.randn(16, 2, generator=g), {}, 10, eta=1.0, generator=g)
    assert not torch.equal(runs[0], other)
    assert runs[0].shape == (16, 2)


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        sample("plms", lambda x, t, c: x, RectifiedFlow(), torch.zeros(1, 2), {}, 2)
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "heun", "dpmpp_2m"}
