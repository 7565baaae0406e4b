"""init.from: a run starts from diffusers models built and saved by diffusers in the test, and its step-0
training loss equals the loss diffusers computes on the same batch, noise and timesteps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from init_helpers import (PIXART_OVERRIDES, REPO, VAE_SCALE, save_pipeline_parts, tiny_pixart, tiny_unet,
                          tiny_vae)


def _cfg(tmp_path: Path, init_from, *extra):
    from launch.runtime.config import load_config

    return load_config(REPO / "configs/ldm/unet-small.yaml",
                       [f"run_dir={tmp_path / 'run'}", f"init.from={init_from}", "conditioning.dropout_prob=0",
                        "latents.sample_posterior=false", f"latents.scaling_factor={VAE_SCALE}", *extra])


def _batch(seed=0, n=2, size=16):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "text_hidden": torch.randn(n, 77, 128, generator=g), "text_mask": torch.ones(n, 77, dtype=torch.bool),
            "caption": ["x"] * n}


def _our_step0_loss(stage, batch, t, noise):
    """stage.training_step with the objective's draw of (t, noise) replaced by the given ones."""
    orig = stage.objective.training_inputs
    stage.objective.training_inputs = lambda z, t_=None, noise_=None, **kw: orig(z, t=t, noise=noise)
    try:
        losses, _ = stage.training_step({"denoiser": stage.denoiser}, batch, 0)
    finally:
        stage.objective.training_inputs = orig
    return float(losses["denoiser"].detach())


def _diffusers_loss(denoiser, vae, batch, t, noise, pixart=False):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    with torch.no_grad():
        lat = vae.encode(batch["image"]).latent_dist.mean * vae.config.scaling_factor
        x_t = sched.add_noise(lat, noise, t)
        if pixart:
            pred = denoiser(x_t, encoder_hidden_states=batch["text_hidden"], timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        else:
            pred = denoiser(x_t, t, encoder_hidden_states=batch["text_hidden"]).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def _stage(cfg, vae_export):
    import dataclasses

    from launch.runtime import stages
    from launch.runtime.init import initialise

    cfg = dataclasses.replace(cfg, latents=dataclasses.replace(cfg.latents, autoencoder=str(vae_export)))
    torch.manual_seed(0)
    stage = stages.build_stage(cfg)
    logs = []
    initialise(cfg, stage, logs.append)
    return stage, logs


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers pipeline folder (unet/ + vae/) and our export of its VAE (the frozen first stage)."""
    from launch.interop.vae_import import import_diffusers_vae

    root = tmp_path_factory.mktemp("sd")
    unet, vae = tiny_unet(), tiny_vae()
    save_pipeline_parts(root / "pipe", unet=unet, vae=vae)
    ae = import_diffusers_vae(root / "pipe", root / "ae_export")
    return root / "pipe", ae, unet, vae


def test_unet_from_diffusers_pipeline_step0_loss_equals_diffusers(pipeline, tmp_path):
    pipe, ae, unet, vae = pipeline
    stage, logs = _stage(_cfg(tmp_path, pipe), ae)
    batch = _batch()
    t, noise = torch.tensor([37, 811]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = _our_step0_loss(stage, batch, t, noise)
    ref = _diffusers_loss(unet, vae, batch, t, noise)
    print(f"UNet step-0 loss ours {ours:.8f} diffusers {ref:.8f} diff {abs(ours - ref):.2e}")
    assert ref > 1e-3
    assert abs(ours - ref) <= 1e-5
    assert any("tensors of 'denoiser'" in line for line in logs)
    # a fresh init is a different model: the check cannot pass by accident
    import dataclasses
    fresh_cfg = _cfg(tmp_path, pipe)
    fresh_cfg = dataclasses.replace(fresh_cfg, init=dataclasses.replace(fresh_cfg.init, from_=None))
    fresh, _ = _stage(fresh_cfg, ae)
    assert abs(_our_step0_loss(fresh, batch, t, noise) - ref) > 1e-3


def test_unet_subfolder_and_single_file_load_the_same(pipeline, tmp_path):
    from safetensors.torch import save_file

    pipe, ae, _, _ = pipeline
    a, _ = _stage(_cfg(tmp_path, pipe / "unet"), ae)
    from safetensors.torch import load_file
    f = tmp_path / "unet.safetensors"
    save_file(load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors")), str(f))
    b, _ = _stage(_cfg(tmp_path, f), ae)
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pixart_into_dit_step0_loss_equals_diffusers(pipeline, tmp_path):
    _, ae, _, vae = pipeline
    pix = tiny_pixart()
    pix.save_pretrained(str(tmp_path / "pixart"))
    stage, _ = _stage(_cfg(tmp_path, tmp_path / "pixart", *PIXART_OVERRIDES), ae)
    batch = _batch(1)
    t, noise = torch.tensor([123, 640]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ours = _our_step0_loss(stage, batch, t, noise)
    ref = _diffusers_loss(pix, vae, batch, t, noise, pixart=True)
    print(f"PixArt step-0 loss ours {ours:.8f} diffusers {ref:.8f} diff {abs(ours - ref):.2e}")
    assert ref > 1e-3
    assert abs(ours - ref) <= 1e-5


def test_strict_names_bad_keys_before_compute(pipeline, tmp_path):
    """A config that does not fit the source (wider first level, other head count): strict stops with the
    keys and config entries by name; strict false loads what fits and keeps the rest fresh."""
    import dataclasses

    from launch.runtime.configio import ConfigError

    pipe, ae, _, _ = pipeline
    cfg = _cfg(tmp_path, pipe, "denoiser.unet.model_channels=16", "denoiser.unet.num_heads=2")
    with pytest.raises(ConfigError) as e:
        _stage(cfg, ae)
    msg = str(e.value)
    print(msg[:600])
    assert "shape-mismatched" in msg and "conv_in.weight (source (32, 4, 3, 3), ours (16, 4, 3, 3))" in msg
    assert "attention_head_dim" in msg and "init.strict=false" in msg
    assert not (tmp_path / "run" / "init.json").exists()
    loose = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, strict=False))
    stage, logs = _stage(loose, ae)
    assert any("shape-mismatched" in line for line in logs)
    import json
    report = json.loads((tmp_path / "run" / "init.json").read_text())
    assert "conv_in.weight" not in report["loaded"] and report["mismatched"]


def test_wrong_kind_of_source_is_named(pipeline, tmp_path):
    from launch.runtime.configio import ConfigError

    pipe, ae, _, _ = pipeline
    with pytest.raises(ConfigError, match="PixArtTransformer2DModel"):
        _stage(_cfg(tmp_path, pipe / "unet", *PIXART_OVERRIDES), ae)
