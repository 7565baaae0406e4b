"""The autoencoder/loss sections load from the shipped YAML files and reject bad values by key."""
from __future__ import annotations

import pytest

from launch.runtime.config import ConfigError, load_config

CONFIGS = ["kl-f8", "vq-f4", "kl-f4-small", "vq-f4-small"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(repo, name):
    cfg = load_config(repo / "configs" / "autoencoder" / f"{name}.yaml")
    assert cfg.stage == "autoencoder"
    assert cfg.run_dir == f"runs/{name}"
    assert cfg.data.urls and cfg.train.max_steps >= 1


def test_kl_f8_matches_ldm(repo):
    cfg = load_config(repo / "configs/autoencoder/kl-f8.yaml")
    a, l = cfg.autoencoder, cfg.loss
    assert (a.embed_dim, a.z_channels, a.resolution, a.ch, a.ch_mult, a.num_res_blocks, a.attn_resolutions) == \
        (4, 4, 256, 128, (1, 2, 4, 4), 2, ())
    assert a.regularizer == "kl" and a.downsample_factor == 8
    assert (l.kl_weight, l.disc_start, l.disc_weight) == (1e-6, 50001, 0.5)


def test_vq_f4_matches_ldm(repo):
    cfg = load_config(repo / "configs/autoencoder/vq-f4.yaml")
    a, l = cfg.autoencoder, cfg.loss
    assert (a.embed_dim, a.n_embed, a.z_channels, a.ch, a.ch_mult, a.num_res_blocks) == (3, 8192, 3, 128, (1, 2, 4), 2)
    assert a.regularizer == "vq" and a.downsample_factor == 4
    assert (l.disc_start, l.disc_weight, l.codebook_weight) == (0, 0.75, 1.0)


@pytest.mark.parametrize("override, needle", [
    ("autoencoder.norm_groups=7", "norm_groups"),
    ("autoencoder.regularizer=fsq autoencoder.fsq_levels=[8,8]", "fsq_levels"),
    ("autoencoder.attn_resolutions=[5]", "attn_resolutions"),
    ("loss.disc_warmup_steps=-1", "disc_warmup_steps"),
    ("loss.disc_norm=instance", "loss.disc_norm"),
    ("loss.vgg_sha256=xyz", "vgg_sha256"),
    ("loss.disc_lr=0", "loss.disc_lr"),
    ("autoencoder.vq_betaa=1", "vq_beta"),
])
def test_bad_values_name_the_key(repo, override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(repo / "configs/autoencoder/kl-f4-small.yaml", override.split())
