"""From a resolved Config to the objects the runtime trains: stage, data, preview module.

The only place that knows both the config tree and the concrete stage classes; everything here
is plain construction. Checks that need the filesystem run in `check` before any compute.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .config import Config
from .configio import ConfigError
from .dist import DistEnv


# ----------------------------------------------------------------------------- checks

def _export_config(path: str, key: str) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ConfigError(f"config key '{key}' = {path!r}: no export there (expected {f}, written by `ldm export`)")
    return json.loads(f.read_text())


def check(cfg: Config) -> None:
    """Cross-section and filesystem checks, before any compute. Raises ConfigError naming the key."""
    if not cfg.data.urls and not getattr(cfg.data, "sources", None):
        raise ConfigError("config key 'data.urls' is empty: give shard URLs (local, brace patterns or pipe:)")
    if cfg.stage != "diffusion":
        return
    for i, entry in enumerate(cfg.text.encoders):
        if entry.kind == "t5":
            from ldm.t5 import resolve_t5_folder

            try:
                resolve_t5_folder(entry.path, f"text.encoders[{i}].path")
            except FileNotFoundError as e:
                raise ConfigError(str(e)) from None
    if cfg.latents.source == "precomputed" and cfg.data.kind != "precomputed":
        raise ConfigError("config key 'latents.source' = 'precomputed' needs data.kind = 'precomputed' "
                          f"(got {cfg.data.kind!r})")
    if cfg.data.kind == "raw" and cfg.latents.autoencoder is None:
        raise ConfigError("config key 'latents.autoencoder' is null but data.kind = 'raw': raw images must be "
                          "encoded online by a trained autoencoder (give its export directory), or precompute "
                          "latents with `ldm data precompute` and set data.kind=precomputed")
    if cfg.latents.autoencoder is not None:
        ae = _export_config(cfg.latents.autoencoder, "latents.autoencoder")
        if ae.get("kind") != "autoencoder":
            raise ConfigError(f"config key 'latents.autoencoder' = {cfg.latents.autoencoder!r} is a "
                              f"{ae.get('kind')!r} export, not an autoencoder")
    if cfg.conditioning.null_embedding == "learned" and cfg.denoiser.learned_null_tokens <= 0:
        raise ConfigError("config key 'conditioning.null_embedding' = 'learned' needs denoiser.learned_null_tokens "
                          "> 0 (the text length, 77 for open_clip)")


def resolved_latents(cfg: Config, autoencoder_config: dict | None):
    """LatentConfig with scaling/shift filled from the autoencoder export when the config leaves them null."""
    lat = cfg.latents
    scale, shift = lat.scaling_factor, lat.shift_factor
    if autoencoder_config is not None:
        scale = scale if scale is not None else autoencoder_config.get("scaling_factor")
        shift = shift if shift is not None else autoencoder_config.get("shift_factor")
    if scale is None:
        warnings.warn("latents.scaling_factor is unset and no autoencoder export provides one: using 1.0")
        scale = 1.0
    return dataclasses.replace(lat, scaling_factor=float(scale), shift_factor=float(shift or 0.0))


def precompute_info(urls: list[str]) -> dict | None:
    """OUT/precompute.json beside local precomputed shards (written by `ldm data precompute`)."""
    from data_pipeline.shards import expand_urls

    for url in expand_urls(urls)[:1]:
        if not url.startswith("pipe:"):
            info = Path(url).parent / "precompute.json"
            if info.is_file():
                return json.loads(info.read_text())
    return None


# ----------------------------------------------------------------------------- stages

def build_stage(cfg: Config):
    if cfg.stage == "autoencoder":
        from autoencoder.training import AutoencoderStage

        return AutoencoderStage.from_config(cfg)
    from ldm.training import DiffusionStage

    autoencoder, ae_config = None, None
    if cfg.latents.autoencoder is not None:
        from .exportdir import load_autoencoder

        autoencoder, ae_config = load_autoencoder(cfg.latents.autoencoder)
    elif cfg.data.kind == "precomputed":
        ae_config = precompute_info(cfg.data.urls)   # the scale of the autoencoder that made the shards
    cfg = dataclasses.replace(cfg, latents=resolved_latents(cfg, ae_config))
    return DiffusionStage.from_config(cfg, autoencoder=autoencoder)


def eval_module_factory(cfg: Config) -> Callable[[], nn.Module]:
    """A fresh, un-partitioned instance of the main module (previews load EMA weights into it)."""
    if cfg.stage == "autoencoder":
        def make():
            from autoencoder.training import AutoencoderStage

            return AutoencoderStage(cfg.autoencoder, cfg.loss, build_lpips=False).autoencoder
        return make

    def make_denoiser():
        from ldm.training import build_denoiser_for

        return build_denoiser_for(cfg)
    return make_denoiser


def build_models_on_meta(cfg: Config) -> dict[str, nn.Module]:
    """The config's models without allocating memory (for `ldm info` and `ldm plan`)."""
    with torch.device("meta"):
        if cfg.stage == "autoencoder":
            from autoencoder.discriminator import build_discriminator
            from autoencoder.model import build_autoencoder

            models = {"autoencoder": build_autoencoder(cfg.autoencoder)}
            if cfg.loss.use_discriminator:
                models["discriminator"] = build_discriminator(cfg.loss, cfg.autoencoder.out_channels)
            return models
        from ldm.training import build_denoiser

        return {"denoiser": build_denoiser(cfg.denoiser)}


# ----------------------------------------------------------------------------- data

def build_data(cfg: Config, env: DistEnv) -> tuple[object, Callable[[], Iterable] | None]:
    from data_pipeline.loader import build_eval_loader, build_train_loader, heldout_urls

    train = build_train_loader(cfg.data, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                               batch_size=cfg.train.micro_batch_size, uint8_images=True)   # scaled in to_device
    val = None
    val_urls = heldout_urls(cfg.data)   # data.val_urls, or the shards data.val_fraction holds out of training
    if val_urls:
        val_cfg = dataclasses.replace(cfg.data, num_workers=0)   # a few fixed batches: no worker start-up cost

        def val():
            return iter(build_eval_loader(val_cfg, val_urls, rank=env.rank, world_size=env.world_size,
                                          batch_size=cfg.train.micro_batch_size))
    return train, val


def stats_data_factory(cfg: Config) -> Callable[[], Iterable] | None:
    """Stage one measures latent statistics on a fresh one-pass read of its training shards (rank 0)."""
    if cfg.stage != "autoencoder":
        return None

    def batches():
        from data_pipeline.loader import build_eval_loader, training_sources

        urls = [u for source, _ in training_sources(cfg.data) for u in source]   # without held-out shards
        return iter(build_eval_loader(dataclasses.replace(cfg.data, num_workers=0), urls, rank=0,
                                      world_size=1, batch_size=cfg.train.micro_batch_size))
    return batches
