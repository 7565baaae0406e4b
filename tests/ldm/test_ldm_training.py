"""DiffusionStage against launch/runtime/stage.py, with plain modules as `nets` and torch AdamW (no DeepSpeed)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ldm.config import (ConditioningConfig, DenoiserConfig, DiTConfig, LatentConfig, MMDiTConfig, SamplingConfig,
                        UNetConfig)
from ldm.objectives import DiscreteDiffusion, RectifiedFlow
from ldm.text import OpenCLIPTextEncoder
from ldm.training import DiffusionStage, build_denoiser, latent_shape

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle on a blue background", "a green square on a white background",
            "a blue triangle on a yellow background", "a black circle on an orange background"]


class StandInAutoencoder(nn.Module):
    """Tests only (the real one is autoencoder/): 8x downsampling KL-style encoder and a decoder."""

    class Posterior:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def sample(self):
            return self.mean + self.std * torch.randn_like(self.mean)

        def mode(self):
            return self.mean

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 8, stride=8)
        self.dec = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def encode(self, x):
        mean, logvar = self.enc(x).chunk(2, dim=1)
        return self.Posterior(mean, torch.exp(0.5 * logvar.clamp(-8, 2)))

    def decode(self, z):
        return torch.tanh(self.dec(z))


@pytest.fixture(scope="module")
def text_encoder(tiny_text_checkpoint):
    arch, path, _ = tiny_text_checkpoint
    return OpenCLIPTextEncoder(arch, pretrained=str(path), layer="penultimate")


def make_stage(kind, text_encoder, objective=None, null="empty", p=0.1, autoencoder=None, **dcfg):
    cfg = DenoiserConfig(kind=kind, learned_null_tokens=77 if null == "learned" else 0,
                         unet=UNetConfig(sample_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                         attention_levels=(1,), num_heads=4, context_dim=64, norm_groups=8),
                         dit=DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                                       context_dim=64, learn_sigma=True),
                         mmdit=MMDiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                           num_heads=4, context_dim=64), **dcfg)
    torch.manual_seed(0)
    stage = DiffusionStage(build_denoiser(cfg), objective or DiscreteDiffusion("eps"), text_encoder=text_encoder,
                           autoencoder=autoencoder,
                           conditioning=ConditioningConfig(dropout_prob=p, null_embedding=null),
                           latents=LatentConfig(scaling_factor=0.5, shift_factor=0.1),
                           sampling=SamplingConfig(sampler="ddim", steps=4, cfg_scale=3.0),
                           use_pooled=cfg.pooled_dim > 0, latent_shape=latent_shape(cfg))
    stage.setup(torch.device("cpu"))
    return stage


def latent_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latent_mean": torch.randn(n, 4, 8, 8, generator=g) * 2,
            "latent_std": torch.full((n, 4, 8, 8), 0.05),
            "caption": (CAPTIONS * 4)[:n], "key": [str(i) for i in range(n)]}


@pytest.mark.parametrize("kind,objective,null,ratio", [
    ("unet", DiscreteDiffusion("eps"), "empty", 0.7),
    ("dit", RectifiedFlow(), "learned", 0.85),   # flow's velocity target has a high floor at small t
    ("mmdit", RectifiedFlow(), "learned", 0.85),
    ("unet", DiscreteDiffusion("v", zero_terminal_snr=True, min_snr_gamma=5.0), "learned", 0.9)],
    ids=["unet-eps", "dit-flow-learned-null", "mmdit-flow-learned-null", "unet-v-minsnr"])
def test_training_step_lowers_the_loss(text_encoder, kind, objective, null, ratio):
    """Validation loss (fixed seed, five fixed noise levels) after 60 AdamW steps on 8 random latents is
    below `ratio` times its value at initialisation."""
    stage = make_stage(kind, text_encoder, objective, null)
    nets = stage.trainable_modules()
    assert set(nets) == {"denoiser"} and stage.main_module == "denoiser"
    opt = torch.optim.AdamW(stage.param_groups("denoiser"), lr=3e-3, weight_decay=0.01)
    batch = latent_batch()
    before = stage.validation_step(nets, batch, seed=5)["val_loss"]
    for step in range(60):
        losses, logs = stage.training_step(nets, batch, step)
        assert set(losses) == {"denoiser"} and losses["denoiser"].requires_grad
        assert 0 <= float(logs["t_mean"]) <= 1 and torch.isfinite(logs["loss"])
        opt.zero_grad(set_to_none=True)
        losses["denoiser"].backward()
        opt.step()
    after = stage.validation_step(nets, batch, seed=5)["val_loss"]
    assert after < ratio * before, (before, after)


def test_param_groups_cover_every_parameter_once(text_encoder):
    stage = make_stage("dit", text_encoder, RectifiedFlow(), "learned")
    groups = stage.param_groups("denoiser")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(stage.denoiser.parameters()))
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    assert id(stage.denoiser.null_context) in no_decay and id(stage.denoiser.blocks[0].attn.to_q.bias) in no_decay
    assert id(stage.denoiser.blocks[0].attn.to_q.weight) not in no_decay


def test_precomputed_text_is_interchangeable_with_captions(text_encoder):
    stage = make_stage("unet", text_encoder, pooled_dim=32)
    enc = text_encoder(CAPTIONS)
    from_captions = stage.condition({"caption": CAPTIONS})
    from_shards = stage.condition({"text_hidden": enc["text_hidden"], "text_mask": enc["text_mask"],
                                   "text_pooled": enc["text_pooled"]})
    assert from_captions.keys() == from_shards.keys() == {"context", "context_mask", "pooled"}
    for key in from_captions:
        assert torch.equal(from_captions[key], from_shards[key])
    batch = latent_batch(4)
    del batch["caption"]
    batch.update(text_hidden=enc["text_hidden"], text_mask=enc["text_mask"], text_pooled=enc["text_pooled"])
    losses, _ = stage.training_step(stage.trainable_modules(), batch, 0)
    assert torch.isfinite(losses["denoiser"])


class Spy(nn.Module):
    """Wraps a denoiser and records the context it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x, t, **cond):
        self.seen.append(cond)
        return self.inner(x, t, **cond)


def test_train_time_dropout_uses_the_empty_prompt(text_encoder):
    stage = make_stage("unet", text_encoder, p=1.0)
    spy = Spy(stage.denoiser)
    _, logs = stage.training_step({"denoiser": spy}, latent_batch(4), 0)
    empty = text_encoder([""])
    assert logs["cond_drop"] == 1.0
    assert torch.equal(spy.seen[0]["context"], empty["text_hidden"].expand(4, -1, -1))
    assert torch.equal(spy.seen[0]["context_mask"], empty["text_mask"].expand(4, -1))
    learned = make_stage("dit", text_encoder, RectifiedFlow(), "learned", p=1.0)
    spy = Spy(learned.denoiser)
    learned.training_step({"denoiser": spy}, latent_batch(4), 0)
    assert spy.seen[0]["drop"].all()
    with torch.device("meta"):
        no_table = build_denoiser(DenoiserConfig(kind="dit"))
    with pytest.raises(ValueError, match="learned_null_tokens"):
        DiffusionStage(no_table, RectifiedFlow(), conditioning=ConditioningConfig(null_embedding="learned"))


def test_latents_from_posterior_online_and_precomputed(text_encoder):
    torch.manual_seed(0)
    ae = StandInAutoencoder()
    stage = make_stage("unet", text_encoder, autoencoder=ae)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    post = ae.encode(images)
    g = torch.Generator().manual_seed(3)
    z = stage.encode_latents({"image": images}, generator=g)
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
    expected = (post.mean + post.std * noise - 0.1) * 0.5           # (sample - shift) * scale
    assert torch.allclose(z, expected, atol=1e-6)
    pre = stage.encode_latents({"latent_mean": post.mean, "latent_std": post.std},
                               generator=torch.Generator().manual_seed(3))
    assert torch.allclose(pre, expected, atol=1e-6)                  # precomputed == online, same noise
    assert all(not p.requires_grad for p in ae.parameters()) and not ae.training
    # flips are the data loader's (tests/data/test_data_precompute.py): mirrored partners are refused, by name
    with pytest.raises(ValueError, match="latent_mean_flip.*data.flip_prob"):
        stage.encode_latents({"latent_mean": torch.zeros(2, 4, 1, 1), "latent_mean_flip": torch.ones(2, 4, 1, 1)})
    losses, _ = stage.training_step(stage.trainable_modules(), {"image": images, "caption": CAPTIONS[:3]}, 0)
    assert torch.isfinite(losses["denoiser"])


def test_validation_is_reproducible_from_a_seed(text_encoder):
    stage = make_stage("dit", text_encoder, RectifiedFlow())
    nets, batch = stage.trainable_modules(), latent_batch(4)
    a, b = stage.validation_step(nets, batch, 11), stage.validation_step(nets, batch, 11)
    c = stage.validation_step(nets, batch, 12)
    assert a == b and a != c
    assert set(a) == {"val_loss", "val_loss_u0.1", "val_loss_u0.3", "val_loss_u0.5", "val_loss_u0.7",
                      "val_loss_u0.9"}


@pytest.mark.parametrize("kind,null", [("unet", "empty"), ("dit", "learned")])
def test_preview_samples_for_captions(text_encoder, kind, null):
    torch.manual_seed(0)
    ae = StandInAutoencoder()
    stage = make_stage(kind, text_encoder, RectifiedFlow() if kind == "dit" else None, null, autoencoder=ae)
    main = stage.denoiser.train()
    a = stage.preview(main, {"caption": CAPTIONS[:2]}, seed=3)
    b = stage.preview(main, {"caption": CAPTIONS[:2]}, seed=3)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b) and main.training
    assert a.min() >= -1 and a.max() <= 1
    bare = make_stage(kind, text_encoder, None, null)                 # no autoencoder: latent channels shown
    img = bare.preview(bare.denoiser, {"caption": CAPTIONS[:3]}, seed=0)
    assert img.shape == (3, 3, 8, 8) and img.abs().max() <= 1


def test_stage_from_the_small_configs():
    from launch.runtime.config import load_config
    for name in ("unet-small.yaml", "dit-small.yaml"):
        cfg = load_config(REPO / "configs" / "ldm" / name)
        stage = DiffusionStage.from_config(cfg)
        stage.setup(torch.device("cpu"))
        batch = {"latent_mean": torch.randn(2, 4, 8, 8), "caption": CAPTIONS[:2]}
        losses, logs = stage.training_step(stage.trainable_modules(), batch, 0)
        assert torch.isfinite(losses["denoiser"])
        assert stage.text_encoder.context_length == cfg.denoiser.learned_null_tokens or \
            cfg.conditioning.null_embedding == "empty"
    bad = SimpleNamespace(**{k: getattr(cfg, k) for k in ("text_encoder", "objective", "conditioning", "latents",
                                                           "sampling")})
    bad.denoiser = DenoiserConfig(kind="dit", learned_null_tokens=10, dit=cfg.denoiser.dit)
    with pytest.raises(ValueError, match="learned_null_tokens = 10"):
        DiffusionStage.from_config(bad, text_encoder=stage.text_encoder)
