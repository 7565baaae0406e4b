"""Stage-two training from precomputed latents against encoding online, through the real pipeline.

Both sides run the same thing the runtime runs per micro-batch: `build_train_loader` batches (one loader
worker), `DiffusionStage.training_step` (eps objective, condition dropout), backward, AdamW step, all under
the same precision. Online: PNG shards -> images -> the frozen autoencoder's encoder and the frozen
open_clip text tower inside the step. Precomputed: the same shards written by `precompute_shards` (what
`ldm data precompute` does) -> posterior mean/std and text states read from the shards. Steps of the two
alternate (A B A B) in one process; medians of img/s, and their ratio (target >= 1.4x, the cost
mosaicml reports for encoding online).

Models: the 35 M-parameter UNet of the training benchmark on 16x16x4 latents, i.e. 128 px images through
the kl-f8 autoencoder architecture (`configs/autoencoder/kl-f8.yaml`, 84 M parameters, the SD VAE
layout; random weights: cost does not depend on them), and the small open_clip text tower of the demo
configs (`configs/ldm/open_clip/ldm-tiny-text.json`). Quick mode: tiny autoencoder and UNet, 32 px.

    python -m bench.precomputed [--quick] [--json] [--threads N] [--dtype bf16|fp32]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .common import alternate, host, markdown_table, median, save, set_threads

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.4
TEXT_CONFIG = "configs/ldm/open_clip/ldm-tiny-text.json"


def _models(quick: bool):
    from autoencoder.config import AutoencoderConfig
    from autoencoder.model import build_autoencoder
    from ldm.config import TextEncoderConfig, UNetConfig
    from ldm.text import build_text_encoder
    from ldm.unet import UNet

    from .models import UNET_KW

    torch.manual_seed(0)
    if quick:
        ae_cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=32)
        unet_cfg = UNetConfig(**dict(UNET_KW, model_channels=32, channel_mult=(1, 2), attention_levels=(1,),
                                     num_heads=4, sample_size=4, num_res_blocks=1, context_dim=128))
        size, batch = 32, 4
    else:
        ae_cfg = AutoencoderConfig(resolution=128)                     # kl-f8: the SD VAE architecture
        unet_cfg = UNetConfig(**dict(UNET_KW, context_dim=128))        # context: the text tower's width
        size, batch = 128, 16
    text = build_text_encoder(TextEncoderConfig(arch="ldm-tiny-text", model_config=TEXT_CONFIG, pretrained=None))
    return build_autoencoder(ae_cfg).eval().requires_grad_(False), text, UNet(unet_cfg), size, batch


def run(quick: bool = False, threads: Optional[int] = None, dtype: str = "bf16", repeats: Optional[int] = None,
        save_results: bool = True) -> dict:
    from data_pipeline import DataConfig, build_train_loader
    from data_pipeline.precompute import precompute_shards
    from data_pipeline.synthetic import write_synthetic
    from launch.runtime.precompute import image_encoder
    from ldm.config import ConditioningConfig, LatentConfig
    from ldm.objectives import DiscreteDiffusion
    from ldm.training import DiffusionStage

    threads = set_threads(threads)
    repeats = repeats or (3 if quick else 8)
    autoencoder, text, unet, size, batch = _models(quick)
    num = batch * (repeats + 4) * 2
    with tempfile.TemporaryDirectory(prefix="bench_precomputed_") as tmp:
        src, pre = Path(tmp, "raw"), Path(tmp, "latents")
        write_synthetic(src, num, size=size, seed=0, shard_size=max(batch * 4, 32))
        raw_cfg = DataConfig(urls=[str(src)], image_size=size, num_workers=1, flip_prob=0.0)
        with torch.no_grad():
            precompute_shards(raw_cfg, raw_cfg.urls, pre, encode_images=image_encoder(autoencoder, torch.device("cpu")),
                              encode_captions=lambda caps: {k: v.float() if v.is_floating_point() else v
                                                            for k, v in text(caps).items()},
                              batch_size=batch, flip="none")
        pre_cfg = DataConfig(urls=[str(pre)], kind="precomputed", num_workers=1)
        latents = LatentConfig(scaling_factor=1.0, shift_factor=0.0)
        stage = DiffusionStage(unet, DiscreteDiffusion("eps"), text_encoder=text, autoencoder=autoencoder,
                               conditioning=ConditioningConfig(dropout_prob=0.1), latents=latents)
        stage.setup(torch.device("cpu"))
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
        loaders = {name: build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=batch)
                   for name, cfg in (("online", raw_cfg), ("precomputed", pre_cfg))}
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext

        def step_fn(name):
            it = loaders[name]

            def step():
                b = next(it)
                with autocast():
                    losses, _ = stage.training_step({"denoiser": unet}, b, 0)
                losses["denoiser"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        try:
            times = alternate([step_fn("online"), step_fn("precomputed")], repeats, warmup=2)
        finally:
            for loader in loaders.values():
                if hasattr(loader, "close"):
                    loader.close()
    online, precomputed = batch / median(times[0]), batch / median(times[1])
    ratio = precomputed / online
    result = {"name": "precomputed", "quick": quick, "dtype": dtype, "threads": threads, "repeats": repeats,
              "batch": batch, "image_size": size, "latent_shape": [unet.cfg.in_channels, unet.cfg.sample_size, unet.cfg.sample_size],
              "autoencoder_params": sum(p.numel() for p in autoencoder.parameters()),
              "unet_params": sum(p.numel() for p in unet.parameters()),
              "text_params": sum(p.numel() for p in text.parameters()),
              "online_img_per_s": round(online, 3), "precomputed_img_per_s": round(precomputed, 3),
              "ratio": round(ratio, 3), "online_step_ms_all": [round(1e3 * t, 1) for t in times[0]],
              "precomputed_step_ms_all": [round(1e3 * t, 1) for t in times[1]],
              "target": TARGET, "meets_target": None if quick else ratio >= TARGET, "host": host(threads)}
    if save_results:
        save("precomputed" + ("_quick" if quick else ""), result, table(result))
    return result


def table(r: dict) -> str:
    return markdown_table(["data", "img/s", "vs online"],
                          [("online encoding (images + captions)", r["online_img_per_s"], "1.00x"),
                           ("precomputed latents + text", r["precomputed_img_per_s"], f"{r['ratio']:.2f}x")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args(argv)
    result = run(args.quick, args.threads, args.dtype)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
