"""`ldm demo [--out DIR]`: the embedded end-to-end job (synthetic data, both stages, samples, report)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = "end-to-end demo on embedded synthetic data: both stages, export, samples, report"
DESCRIPTION = """Synthesize captioned shapes, train the autoencoder, measure the latent scale, precompute
latents and text embeddings, train the text-conditioned denoiser, export to OUT/export/, sample,
score prompt adherence from the pixels and write OUT/report.md. A second run reuses finished
phases (their inputs unchanged); --redo PHASE (or all) runs them again.

Phases: data stage1 export1 recon precompute stage2 export2 sample adherence report

--tier compositional runs the same phases on one to three objects per image (pairs, counts, positions;
held-out compositions) and scores GenEval's tasks from the pixels (launch/demo/compositional.py); its
default output folder is demo_out_compositional.

--finetune then teaches the finished model a color it never saw (pink) with LoRA, judges samples before
and after, and adds the section to OUT/report.md (phases ft_*, launch/demo/finetune.py).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None,
                   help="output folder (default demo_out, or demo_out_compositional for --tier compositional)")
    p.add_argument("--tier", choices=["shapes", "compositional"], default="shapes",
                   help="shapes: one shape per image (default); compositional: one to three objects, GenEval tasks")
    p.add_argument("--redo", action="append", default=[], metavar="PHASE",
                   help="run this phase again even if done (repeatable; 'all' for everything)")
    p.add_argument("--stage1", nargs="*", default=[], metavar="key=value", help="overrides for stage one")
    p.add_argument("--stage2", nargs="*", default=[], metavar="key=value", help="overrides for stage two")
    p.add_argument("--train-images", type=int, default=None, help="synthetic training images (default 8000)")
    p.add_argument("--finetune", action="store_true",
                   help="then fine-tune the finished model on a new color with LoRA (before/after in the report)")
    p.add_argument("--finetune-steps", type=int, default=None, help="LoRA steps of --finetune (default 700)")
    p.add_argument("--readme", action="store_true",
                   help="also rewrite the README's demo block (and docs/assets) from this run's report")


def run(args) -> int:
    from launch.demo.run import DemoSettings, run_demo, tier_of

    if args.finetune and args.tier != "shapes":
        raise SystemExit("ldm demo: --finetune teaches the shapes tier's model a new color; drop --tier "
                         f"{args.tier} or --finetune")
    out = Path(args.out or ("demo_out" if args.tier == "shapes" else f"demo_out_{args.tier}"))
    s = DemoSettings.for_tier(args.tier, out, overrides_stage1=list(args.stage1),
                              overrides_stage2=list(args.stage2))
    if args.train_images:
        s.train_images = args.train_images
    run_demo(s, redo=set(args.redo))
    if args.finetune:
        from launch.demo.finetune import FinetuneSettings, run_finetune

        f = FinetuneSettings()
        if args.finetune_steps:
            f.steps = args.finetune_steps
        run_finetune(s, f, redo=set(args.redo))
    if args.readme:
        from launch.demo.run import REPO

        tier_of(s).update_readme(s.out.resolve(), REPO / "README.md", REPO / "docs" / "assets")
    return 0
