"""Importing an existing VAE (LDM / SD checkpoint, diffusers folder) as our autoencoder export."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from autoencoder import convert
from autoencoder.config import AutoencoderConfig
from autoencoder.model import build_autoencoder
from export_helpers import cli
from launch.runtime.exportdir import ExportError, export_metadata, load_autoencoder
from launch.interop.vae_import import import_diffusers_vae, import_ldm_vae

# the SD VAE topology (4 levels, 2 blocks, mid attention, 4 latent channels, 32 groups as LDM hard-codes)
# at 1/4 of the width
SD_LIKE = AutoencoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4, resolution=64)


def _random_autoencoder(seed: int, cfg: AutoencoderConfig = SD_LIKE):
    torch.manual_seed(seed)
    model = build_autoencoder(cfg).eval()
    with torch.no_grad():    # default init leaves the GroupNorms at identity: make every tensor count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _same_outputs(a, b) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        assert torch.equal(a.encode(x).mean, b.encode(x).mean)
        assert torch.equal(a.decode(z), b.decode(z))
        assert a.decode(z).abs().mean() > 1e-2


def test_full_sd_checkpoint_with_yaml_and_scale_factor(tmp_path):
    ours = _random_autoencoder(0)
    sd = convert.to_ldm(ours.state_dict(), SD_LIKE, prefix="first_stage_model.")
    sd["model.diffusion_model.conv_in.weight"] = torch.zeros(1)          # the rest of an SD checkpoint
    sd["first_stage_model.loss.logvar"] = torch.zeros(())                 # LDM's training-loss keys
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)               # plain tensors: weights_only loads it
    yaml = tmp_path / "v1-inference.yaml"
    yaml.write_text(
        "model:\n  params:\n    scale_factor: 0.18215\n    first_stage_config:\n      params:\n"
        "        embed_dim: 4\n        ddconfig: {double_z: true, z_channels: 4, resolution: 64, in_channels: 3,"
        " out_ch: 3, ch: 32, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}\n")
    out = import_ldm_vae(ckpt, tmp_path / "out", ldm_config=yaml)
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "autoencoder" and config["scaling_factor"] == pytest.approx(0.18215)
    assert config["source"]["kind"] == "ldm" and export_metadata(out)["weights"] == "imported"
    model, _ = load_autoencoder(out)
    _same_outputs(model, ours)


def test_vae_safetensors_without_yaml_via_cli_and_reexport_for_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = _random_autoencoder(1)
    path = tmp_path / "vae-ft-mse.safetensors"
    save_file(convert.to_ldm(ours.state_dict(), SD_LIKE), str(path))
    rc, out, err = cli("export", "--from-ldm-vae", path, tmp_path / "cli", "--resolution", "64", "--scaling-factor",
                       "0.5", "--shift-factor", "0.1", "--format", "diffusers")
    assert rc == 0, err
    files = json.loads(out.strip().splitlines()[-1])["files"]
    assert {"model.safetensors", "config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"} <= set(files)
    model, config = load_autoencoder(tmp_path / "cli")
    assert (config["scaling_factor"], config["shift_factor"]) == (0.5, 0.1)
    _same_outputs(model, ours)
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "cli", subfolder="vae").eval()
    assert vae.config.scaling_factor == 0.5 and vae.config.shift_factor == 0.1
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (vae.decode(z).sample - ours.decode(z)).abs().max() < 1e-4


def test_diffusers_folder_imports_exactly(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=32,
                            norm_groups=8)
    torch.manual_seed(4)
    theirs = diffusers.AutoencoderKL(**convert.diffusers_config(cfg, scaling_factor=0.7, shift_factor=-0.2)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "pipe" / "vae")                     # a pipeline folder with vae/
    rc, out, err = cli("export", "--from-diffusers-vae", tmp_path / "pipe", tmp_path / "ours", "--format", "diffusers")
    assert rc == 0, err
    assert "vae/config.json" in json.loads(out.strip().splitlines()[-1])["files"]
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(0.7) and config["shift_factor"] == pytest.approx(-0.2)
    ours, _ = load_autoencoder(tmp_path / "ours")
    g = torch.Generator().manual_seed(5)
    x, z = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() < 1e-5
        assert (ours.encode(x).mean - theirs.encode(x).latent_dist.mean).abs().max() < 1e-5
    # and the re-export loads back in diffusers with the same weights
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours", subfolder="vae")
    for k, v in theirs.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_pickled_objects_are_refused_not_unpickled(tmp_path):
    import argparse

    path = tmp_path / "lightning.ckpt"   # old Lightning checkpoints carry hyper-parameter objects besides tensors
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ExportError, match="weights_only=True"):
        import_ldm_vae(path, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no_such.safetensors"):
        import_ldm_vae(tmp_path / "no_such.safetensors", tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        import_diffusers_vae(tmp_path, tmp_path / "z")
