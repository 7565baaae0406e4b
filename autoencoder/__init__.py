"""Stage one: the latent autoencoder (KL / VQ / FSQ), its losses and the training stage.

Plain PyTorch; nothing here knows DeepSpeed, Slurm or wandb.
  config.py         AutoencoderConfig (`autoencoder:`), AutoencoderLossConfig (`loss:`)
  model.py          Encoder, Decoder, Autoencoder, build_autoencoder
  distributions.py  DiagonalGaussian (the KL posterior)
  quantize.py       VectorQuantizer (EMA, dead-code restart, usage), FSQ
  perceptual.py     LPIPS (VGG16, offline, sha256-checked)
  discriminator.py  PatchDiscriminator
  loss.py           AutoencoderLoss (NLL + KL/codebook + adaptive GAN; discriminator loss)
  metrics.py        psnr, ssim
  training.py       AutoencoderStage (launch/runtime/stage.py protocol), latent_statistics
  convert.py        diffusers AutoencoderKL and LDM / SD checkpoint layouts

Names below are imported lazily so `import autoencoder.config` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AutoencoderConfig": "config", "AutoencoderLossConfig": "config",
    "Autoencoder": "model", "Encoder": "model", "Decoder": "model", "build_autoencoder": "model",
    "DiagonalGaussian": "distributions", "VectorQuantizer": "quantize", "FSQ": "quantize",
    "LPIPS": "perceptual", "PatchDiscriminator": "discriminator", "AutoencoderLoss": "loss",
    "psnr": "metrics", "ssim": "metrics", "AutoencoderStage": "training", "latent_statistics": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'autoencoder' has no attribute {name!r}")
