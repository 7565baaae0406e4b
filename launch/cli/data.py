"""`ldm data synth | write | inspect`: make, convert and check img2dataset-layout shards."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "data"
HELP = "data tools: synthetic shards, images/CSV/parquet to shards, inspection, precomputed latents"
DESCRIPTION = """Data tools for img2dataset-layout WebDataset shards (NNNNN.tar + .parquet + _stats.json).

  ldm data synth OUT --num N --size S [--seed K] [--shard-size M] [--tier shapes|compositional]
                                                                   captioned shapes (ARCHITECTURE.md §6)
  ldm data write SRC OUT                                            folder with sidecar .txt, or CSV/parquet
  ldm data inspect URLS [--json]                                    good samples, bad samples by reason, sizes
  ldm data precompute CONFIG --autoencoder EXPORT_DIR --out OUT     latents + text embeddings for stage two
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("synth", help="write the synthetic captioned-shapes data set",
                       description="One filled shape per image, caption 'a {color} {shape} on a {background} "
                                   "background'; deterministic for a seed.")
    p.add_argument("out", help="output folder")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--size", type=int, required=True, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", dest="image_format")
    p.add_argument("--exclude", action="append", default=[], metavar="COLOR:SHAPE:BACKGROUND",
                   help="leave this triple out (repeatable): the held-out set of a demo")
    p.add_argument("--only", action="append", default=[], metavar="COLOR:SHAPE:BACKGROUND",
                   help="draw only these triples (repeatable): write the held-out set to its own shards")
    p.add_argument("--tier", choices=("shapes", "compositional"), default="shapes",
                   help="shapes: one shape per image (default); compositional: one to three objects with "
                        "counts and relations (--exclude/--only then take its held-out items, e.g. "
                        "'pair:red:circle' or 'default')")

    p = sub.add_parser("write", help="images + captions to img2dataset-layout shards",
                       description="SRC is a folder of images (jpg/png/webp) with sidecar .txt captions, or a "
                                   ".csv / .parquet with 'path' and 'caption' columns (paths relative to the file).")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--shard-size", type=int, default=10_000, help="max samples per shard (default 10000)")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="max bytes per shard (approximate)")
    p.add_argument("--resize", type=int, default=None, help="downscale so the shorter side is at most this")
    p.add_argument("--format", choices=("keep", "jpg", "png", "webp"), default="keep", dest="image_format")

    p = sub.add_parser("inspect", help="count good and bad samples, caption lengths, image sizes",
                       description="One pass over the shards, decoding every image as training would.")
    p.add_argument("urls", nargs="+", help="shard paths, brace patterns, folders or pipe: commands")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--kind", choices=("raw", "precomputed"), default="raw",
                   help="precomputed: shards written by precompute (latents + text embeddings)")
    p.add_argument("--caption-key", default="txt")
    p.add_argument("--caption-json-field", default="caption")


    p = sub.add_parser("precompute", help="encode a diffusion config's shards to latents + text embeddings",
                       description="Reads the config's data.urls, encodes images with the autoencoder export "
                                   "(posterior mean and std, flipped pair when data.flip_prob > 0) and captions "
                                   "with the config's text encoder, and writes shards keyed like the source. "
                                   "Under torchrun/srun each rank takes its own slice of shards. Train on them "
                                   "with data.kind=precomputed data.urls=OUT/*.tar.")
    p.add_argument("config", help="a stage-two (diffusion) run config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--autoencoder", required=True, help="export directory of the trained autoencoder")
    p.add_argument("--out", required=True, help="output folder for the precomputed shards")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--flip", choices=("pair", "none"), default=None,
                   help="also encode the mirrored image (default: when data.flip_prob > 0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--overwrite", action="store_true", help="redo shards that are already there")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from data_pipeline.synthetic import write_synthetic

        summary = write_synthetic(args.out, args.num, size=args.size, seed=args.seed, shard_size=args.shard_size,
                                  image_format=args.image_format, exclude=args.exclude, only=args.only,
                                  tier=args.tier)
        print(json.dumps(summary))
        return 0
    if args.data_command == "write":
        from data_pipeline.write import write_from_source

        summary = write_from_source(args.src, args.out, shard_size=args.shard_size,
                                    max_shard_bytes=args.max_shard_bytes, resize=args.resize,
                                    image_format=args.image_format)
        print(json.dumps(summary))
        return 0 if summary["samples"] else 1
    if args.data_command == "inspect":
        from data_pipeline.config import DataConfig
        from data_pipeline.inspect import format_report, inspect_shards

        cfg = DataConfig(kind=args.kind, caption_key=args.caption_key, caption_json_field=args.caption_json_field)
        cfg.validate()
        report = inspect_shards(args.urls, cfg, num_workers=args.workers)
        print(json.dumps(report) if args.json else format_report(report))
        return 0
    if args.data_command == "precompute":
        from launch.runtime.config import load_config
        from launch.runtime.precompute import precompute

        cfg = load_config(args.config, args.overrides)
        summary = precompute(cfg, args.autoencoder, args.out, batch_size=args.batch_size, flip=args.flip,
                             dtype=args.dtype, overwrite=args.overwrite)
        print(json.dumps(summary))
        return 0
    print(f"ldm data: unknown action {args.data_command!r}", file=sys.stderr)
    return 2
