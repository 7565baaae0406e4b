"""init.from for stage one: an SD-style VAE (a diffusers AutoencoderKL folder, or the same weights as an LDM
single file) starts our autoencoder, which then computes what diffusers computes."""
from __future__ import annotations

import dataclasses
import json

import torch

from init_helpers import REPO, tiny_vae


def _stage(tmp_path, source, vae):
    from autoencoder.convert import config_from_diffusers
    from launch.runtime import stages
    from launch.runtime.config import load_config
    from launch.runtime.init import initialise

    cfg = load_config(REPO / "configs/autoencoder/kl-f4-small.yaml",
                      [f"run_dir={tmp_path / 'run'}", f"init.from={source}", "data.urls=[x]"])
    cfg = dataclasses.replace(cfg, autoencoder=config_from_diffusers(json.loads(json.dumps(dict(vae.config)))))
    stage = stages.build_stage(cfg)
    initialise(cfg, stage, lambda _: None)
    return stage.autoencoder.eval()


def test_stage_one_from_a_diffusers_vae_and_an_ldm_file(tmp_path):
    from safetensors.torch import save_file

    from autoencoder.convert import to_ldm

    vae = tiny_vae()
    vae.save_pretrained(str(tmp_path / "vae"))
    from autoencoder.convert import config_from_diffusers

    ae_cfg = config_from_diffusers(json.loads(json.dumps(dict(vae.config))))
    ours = _stage(tmp_path, tmp_path / "vae", vae)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a = ours.decode(ours.encode(x).mean)
        b = vae.decode(vae.encode(x).latent_dist.mean).sample
    diff = float((a - b).abs().max())
    print(f"stage one from diffusers AutoencoderKL: reconstruction max|diff| {diff:.2e}")
    assert float(b.abs().max()) > 1e-2 and diff < 1e-4

    ldm = {"first_stage_model." + k: v for k, v in to_ldm(ours.state_dict(), ae_cfg).items()}
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "sd.safetensors"))
    again = _stage(tmp_path, tmp_path / "sd.safetensors", vae)
    sa, sb = ours.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
