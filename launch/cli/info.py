"""`ldm info CONFIG [--json]`: parameter counts of a config's models, built on the meta device."""
from __future__ import annotations

import argparse
import json

NAME = "info"
HELP = "parameter counts of a config's models (built on the meta device, nothing allocated)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def count(module) -> dict:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    children = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    return {"total": total, "trainable": trainable, "children": children}


def run(args) -> int:
    from launch.runtime import stages
    from launch.runtime.config import load_config

    cfg = load_config(args.config, args.overrides)
    models = stages.build_models_on_meta(cfg)
    report = {"config": args.config, "stage": cfg.stage, "models": {n: count(m) for n, m in models.items()}}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.config} (stage: {cfg.stage})")
    for name, info in report["models"].items():
        print(f"  {name:<16} {info['total']:>15,d} parameters ({info['trainable']:,d} trainable)")
        for child, n in info["children"].items():
            print(f"    {child:<22} {n:>13,d}")
    return 0
