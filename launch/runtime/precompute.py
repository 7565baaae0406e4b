"""`ldm data precompute`: encode a diffusion config's shards with a trained autoencoder and its
text encoder(s), into shards stage two reads with `data.kind: precomputed`.

The data side (`data_pipeline.precompute`) is model-agnostic; this file supplies the encoders.
Ranks (RANK/WORLD_SIZE from torchrun, or SLURM_PROCID/SLURM_NTASKS) own fixed slices of the shard
list and need no process group. Rank 0 writes OUT/precompute.json describing what produced the
shards, so a training run can tell them apart from shards of another autoencoder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import Config
from .configio import to_plain
from .progress import task_bar


def _rank_world() -> tuple[int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 1


def image_encoder(autoencoder: torch.nn.Module, device: torch.device):
    """images [-1,1] -> posterior mean/std (KL) or quantized latents (VQ/FSQ), in autoencoder units."""
    @torch.no_grad()
    def encode(images: torch.Tensor) -> dict:
        enc = autoencoder.encode(images.to(device))
        if isinstance(enc, tuple):           # VQ / FSQ: deterministic latents
            return {"latent_mean": enc[0].float()}
        return {"latent_mean": enc.mean.float(), "latent_std": enc.std.float()}
    return encode


def precompute(cfg: Config, autoencoder_dir: str | Path, out: str | Path, *, batch_size: int = 64,
               flip: str | None = None, dtype: str = "float32", device: str | None = None,
               overwrite: bool = False, progress: bool = True) -> dict:
    from data_pipeline.precompute import precompute_shards
    from data_pipeline.shards import expand_urls
    from ldm.text_encoders import build_text_encoders, encode_for_storage, text_encoder_entries

    from .exportdir import load_autoencoder

    rank, world = _rank_world()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autoencoder, ae_config = load_autoencoder(autoencoder_dir, dev)
    # Several text encoders: every encoder's output is stored on its own (ldm/text_encoders.py says why)
    text = build_text_encoders(cfg).to(dev)
    flip = flip or ("pair" if getattr(cfg.data, "flip_prob", 0.0) > 0 else "none")
    total = len(expand_urls(cfg.data.urls))
    bar = task_bar(total=0, desc=f"precompute (rank {rank})", unit="img", enabled=progress)
    seen = {"n": 0}

    def on_progress(summary: dict) -> None:
        bar.update(summary["samples"] - seen["n"])
        seen["n"] = summary["samples"]

    try:
        summary = precompute_shards(cfg.data, cfg.data.urls, out, encode_images=image_encoder(autoencoder, dev),
                                    encode_captions=lambda caps: {k: v.float() if v.is_floating_point() else v
                                                                  for k, v in encode_for_storage(text, caps).items()},
                                    rank=rank, world_size=world, batch_size=batch_size, flip=flip, dtype=dtype,
                                    overwrite=overwrite, progress=on_progress)
    finally:
        bar.close()
    if rank == 0:
        info = {"autoencoder": str(Path(autoencoder_dir).resolve()),
                "scaling_factor": ae_config.get("scaling_factor"), "shift_factor": ae_config.get("shift_factor"),
                "autoencoder_step": ae_config.get("step"), "text_encoder": to_plain(cfg.text_encoder),
                "text_encoders": [to_plain(e) for e in text_encoder_entries(cfg)],
                "text_layout": "per-encoder: encoder i >= 1 as text_hidden_i, text_mask_i, text_pooled_i",
                "source_urls": list(cfg.data.urls), "source_shards": total, "image_size": cfg.data.image_size,
                "flip": flip, "dtype": dtype}
        Path(out, "precompute.json").write_text(json.dumps(info, indent=1))
    return summary
