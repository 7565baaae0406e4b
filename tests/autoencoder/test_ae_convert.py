"""Our KL autoencoder <-> diffusers AutoencoderKL and the LDM / SD key layout."""
from __future__ import annotations

import pytest
import torch

from autoencoder import convert
from autoencoder.config import AutoencoderConfig
from autoencoder.model import build_autoencoder

diffusers = pytest.importorskip("diffusers")

# the kl-f8 topology (4 levels, 2 blocks, mid attention, 4 latent channels) at 1/4 of the width
SMALL_F8 = AutoencoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4, resolution=64)


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves every GroupNorm at identity/zero: make them informative for the check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _check_equivalent(ours, theirs, cfg: AutoencoderConfig, size: int) -> None:
    g = torch.Generator().manual_seed(1)
    f = cfg.downsample_factor
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(2, cfg.embed_dim, size // f, size // f, generator=g)
    with torch.no_grad():
        post = ours.encode(x)
        dist = theirs.encode(x).latent_dist
        assert (post.mean - dist.mean).abs().max() <= 1e-5
        assert (post.logvar - dist.logvar).abs().max() <= 1e-5
        a, b = ours.decode(z), theirs.decode(z).sample
        assert a.shape == b.shape == (2, 3, size, size)
        assert (a - b).abs().max() <= 1e-5
        assert a.abs().mean() > 1e-2   # not trivially equal zeros


def _roundtrip(cfg: AutoencoderConfig, size: int) -> None:
    torch.manual_seed(0)
    ours = build_autoencoder(cfg).eval()
    _perturb_norms(ours, 0)
    theirs = diffusers.AutoencoderKL(**convert.diffusers_config(cfg)).eval()
    theirs.load_state_dict(convert.to_diffusers(ours.state_dict(), cfg), strict=True)
    _check_equivalent(ours, theirs, cfg, size)

    # the other direction: a diffusers model (fresh random weights) into ours
    torch.manual_seed(1)
    theirs2 = diffusers.AutoencoderKL(**convert.diffusers_config(cfg)).eval()
    _perturb_norms(theirs2, 1)
    cfg2 = convert.config_from_diffusers(theirs2.config)
    assert cfg2 == cfg
    ours2 = build_autoencoder(cfg2).eval()
    ours2.load_state_dict(convert.from_diffusers(theirs2.state_dict(), cfg2), strict=True)
    _check_equivalent(ours2, theirs2, cfg, size)


def test_diffusers_both_directions_small_f8_topology():
    _roundtrip(SMALL_F8, 64)


@pytest.mark.slow
def test_diffusers_both_directions_full_kl_f8():
    _roundtrip(AutoencoderConfig(), 64)


def test_diffusers_config_matches_sd_vae():
    d = convert.diffusers_config(AutoencoderConfig(), scaling_factor=0.18215)
    assert d["block_out_channels"] == [128, 256, 512, 512] and d["layers_per_block"] == 2
    assert d["latent_channels"] == 4 and d["scaling_factor"] == 0.18215 and d["shift_factor"] is None
    with torch.device("meta"):
        n = sum(p.numel() for p in diffusers.AutoencoderKL(**d).parameters())
    assert n == 83_653_863


def test_ldm_layout_roundtrip_and_inference():
    torch.manual_seed(0)
    ours = build_autoencoder(SMALL_F8)
    sd = ours.state_dict()
    ldm = convert.to_ldm(sd, SMALL_F8, prefix=convert.LDM_PREFIX)
    assert len(ldm) == len(sd) == 248   # the SD v1 VAE has 248 first-stage tensors
    for key in ("encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight", "encoder.mid.block_2.conv2.bias",
                "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.norm1.weight",
                "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.bias"):
        assert convert.LDM_PREFIX + key in ldm, key
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (128, 128, 1, 1)
    # a full SD-style checkpoint: wrapper, other models' keys and LDM's loss keys are ignored
    ckpt = {"state_dict": {**ldm, "model.diffusion_model.out.0.weight": torch.zeros(1),
                           "first_stage_model.loss.logvar": torch.zeros(())}}
    assert convert.config_from_ldm_state_dict(ckpt, resolution=64) == SMALL_F8
    back = convert.from_ldm(ckpt)   # architecture inferred from the shapes
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # linear-shaped attention weights (some converted SD files) are accepted too
    bare = {k[len(convert.LDM_PREFIX):]: v for k, v in ldm.items()}
    bare["encoder.mid.attn_1.k.weight"] = bare["encoder.mid.attn_1.k.weight"].flatten(1)
    assert torch.equal(convert.from_ldm(bare, SMALL_F8)["encoder.mid.attn.k.weight"], sd["encoder.mid.attn.k.weight"])


def test_conversion_errors_name_the_keys():
    sd = build_autoencoder(SMALL_F8).state_dict()
    extra = dict(sd, **{"encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="encoder.bogus.weight"):
        convert.to_diffusers(extra, SMALL_F8)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.weight"}
    with pytest.raises(KeyError, match="decoder.conv_out.weight"):
        convert.to_ldm(missing, SMALL_F8)
    with pytest.raises(ValueError, match="attn_resolutions"):
        convert.diffusers_config(AutoencoderConfig(ch=32, resolution=64, attn_resolutions=(8,)))
    with pytest.raises(ValueError, match="KL"):
        convert.to_diffusers(sd, AutoencoderConfig(regularizer="vq"))
    # a learned logvar attached for training is not part of the exported model
    with_logvar = dict(sd, logvar=torch.zeros(()))
    assert "logvar" not in convert.to_diffusers(with_logvar, SMALL_F8)


def test_config_from_ldm_yaml_params():
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    assert convert.config_from_ldm_yaml({"embed_dim": 4, "ddconfig": dd}) == AutoencoderConfig()
    vq = convert.config_from_ldm_yaml({"embed_dim": 3, "n_embed": 8192,
                                       "ddconfig": dict(dd, double_z=False, z_channels=3, ch_mult=[1, 2, 4])})
    assert (vq.regularizer, vq.n_embed, vq.embed_dim, vq.downsample_factor) == ("vq", 8192, 3, 4)
