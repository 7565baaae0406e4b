"""Architecture: parameter count of kl-f8, shapes of each regularizer, the posterior."""
from __future__ import annotations

import torch

from autoencoder.config import AutoencoderConfig
from autoencoder.distributions import DiagonalGaussian
from autoencoder.model import AttnBlock, build_autoencoder, count_parameters
from launch.runtime.config import load_config

from ae_helpers import tiny_kl

SD_V1_VAE_PARAMS = 83_653_863   # diffusers AutoencoderKL with the SD v1 VAE config


def test_kl_f8_parameter_count_on_meta(repo):
    cfg = load_config(repo / "configs/autoencoder/kl-f8.yaml").autoencoder
    with torch.device("meta"):
        model = build_autoencoder(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == SD_V1_VAE_PARAMS
    # attention only in the two mid blocks by default
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 2


def test_shapes_of_each_regularizer():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    kl = build_autoencoder(tiny_kl())
    out = kl(x)
    assert out["reconstruction"].shape == (2, 3, 32, 32)
    assert out["latent"].shape == (2, 4, 16, 16) and out["kl"].shape == (2,)
    vq = build_autoencoder(tiny_kl(regularizer="vq", n_embed=32, z_channels=3, embed_dim=3, ch_mult=(1, 2, 2)))
    out = vq(x)
    assert out["latent"].shape == (2, 3, 8, 8) and out["indices"].shape == (2, 8, 8)
    assert out["reg_loss"].ndim == 0 and 0 <= float(out["usage"]) <= 1
    fsq = build_autoencoder(tiny_kl(regularizer="fsq", embed_dim=3, fsq_levels=(5, 5, 5)))
    out = fsq(x)
    assert out["latent"].shape == (2, 3, 16, 16) and int(out["indices"].max()) < 125
    assert float(out["latent"].detach().abs().max()) <= 1.0


def test_attn_resolutions_add_attention_where_asked():
    model = build_autoencoder(tiny_kl(attn_resolutions=(16,)))
    # encoder level 1 (16 px): 1 block -> 1 attn; decoder level 1: 2 blocks -> 2 attn; plus 2 mid
    assert len(model.encoder.levels[1].attn) == 1 and len(model.decoder.levels[1].attn) == 2
    assert len(model.encoder.levels[0].attn) == 0
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 5
    assert model(torch.randn(1, 3, 32, 32))["reconstruction"].shape == (1, 3, 32, 32)


def test_diagonal_gaussian():
    mean = torch.zeros(2, 4, 3, 3)
    p = DiagonalGaussian(torch.cat([mean, torch.zeros_like(mean)], 1))   # N(0, I)
    assert torch.allclose(p.kl(), torch.zeros(2))
    big = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert float(big.logvar.max()) == 20.0                                # clamped
    small = DiagonalGaussian(torch.cat([mean + 1, torch.full_like(mean, -100.0)], 1))
    assert float(small.logvar.min()) == -30.0
    assert torch.allclose(small.sample(), small.mode(), atol=1e-6)
    # KL of N(1, e^-30) vs N(0, 1) per element = 0.5 * (1^2 + e^-30 - 1 + 30) = 15
    assert torch.allclose(small.kl(), torch.full((2,), 36 * 15.0), rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    wide = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 100, 100), torch.full((1, 1, 100, 100), 2 * 0.6931472)], 1))
    s = wide.sample(g)
    assert abs(float(s.std()) - 2.0) < 0.05 and abs(float(s.mean())) < 0.05


def test_full_config_default_is_kl_f8():
    cfg = AutoencoderConfig()
    assert (cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.embed_dim) == (128, (1, 2, 4, 4), 4, 4)
