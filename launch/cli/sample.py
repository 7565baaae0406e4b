"""`ldm sample EXPORT_DIR --prompt TEXT --out DIR`: PNGs from a stage-two export."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "sample"
HELP = "sample images from a stage-two export: one PNG per image, prompts.json, optional grid"
DESCRIPTION = """Sample from an export written by `ldm export` (stage two).

  DIR/00000.png ...   one image per file; every prompt --num times, prompt after prompt
  DIR/prompts.json    file name -> prompt
  DIR/sampling.json   the settings used
  --grid PNG          also all images in one grid (a row per prompt when --num > 1)

Deterministic for a seed: image i starts from noise seeded by (seed, i), so two runs give byte-identical
PNGs, and a batch size change does not change the images (up to float rounding) for the deterministic
samplers (ddim with eta 0, euler, heun, dpmpp_2m). Defaults for --steps, --cfg and --sampler come from the
export's sampling section. An export with several text encoders (an MMDiT on CLIP + CLIP + T5 exported with
--format diffusers) samples the same way: our encoders are rebuilt from its text_encoder{,_2,_3}/ folders.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    src.add_argument("--prompts", default=None, metavar="FILE",
                     help="prompts file: one per line, a JSON list, or a prompts.json")
    p.add_argument("--num", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (1: none)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun", "dpmpp_2m"), default=None)
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for unit time in [LO, HI] (1 = noise end; 0 1: every step); "
                        "default: the export's sampling.guidance_interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="denoiser dtype (text encoder and autoencoder stay fp32)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the trained size)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid", default=None, metavar="PNG", help="also write a grid of all images")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from launch.interop.sample import read_prompts, sample_export

    try:
        prompts = args.prompt if args.prompt else read_prompts(args.prompts)
        summary = sample_export(args.export_dir, prompts, args.out, num=args.num, steps=args.steps,
                                cfg_scale=args.cfg, sampler=args.sampler, seed=args.seed,
                                batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                grid=args.grid, size=args.size, progress=not args.no_progress,
                                guidance_interval=args.guidance_interval)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"ldm sample: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
