"""`ldm bench quality`: a recipe table on the compositional tier, equal training compute per row.

Our own small version of the SD3 paper's comparison of formulations, on a CPU, from one command. Every row
trains stage two from the same precomputed latents and text embeddings of `ldm demo --tier compositional`
(its data, autoencoder and precompute phases are run or reused in --demo DIR), then samples the same
captions (seen and held-out compositions) and is judged by GenEval's tasks from the pixels.

Equal compute = equal training FLOPs: each row's denoiser is counted once (torch's FlopCounterMode over a
forward and backward of one batch), and a row gets steps = reference steps x reference FLOPs per sample /
its FLOPs per sample, the reference being the demo's recipe (UNet, flow matching, logit-normal t) at
--steps. The batch, optimizer, EMA and sampler are the demo config's in every row.

    ldm bench quality [--demo demo_out_compositional] [--steps 1800] [--rows unet-flow-ln,dit-flow-ln]
                      [--seen 240] [--held-out 120] [--quick] [--json]
Rows are reused by a second run when nothing they depend on changed (phases in DEMO/bench_quality/.demo).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .common import host, markdown_table, save

# name -> (what it is, overrides over configs/demo/compositional/diffusion.yaml)
_DIT = ["denoiser.kind=dit", "denoiser.dit.input_size=10", "denoiser.dit.patch_size=1", "denoiser.dit.in_channels=8",
        "denoiser.dit.hidden_size=128", "denoiser.dit.depth=6", "denoiser.dit.num_heads=4",
        "denoiser.dit.context_dim=128"]
_MMDIT = ["denoiser.kind=mmdit", "denoiser.mmdit.input_size=10", "denoiser.mmdit.patch_size=1",
          "denoiser.mmdit.in_channels=8", "denoiser.mmdit.hidden_size=128", "denoiser.mmdit.depth=4",
          "denoiser.mmdit.num_heads=4", "denoiser.mmdit.context_dim=128"]
ROWS = {
    "unet-flow-ln": ("UNet, flow matching, logit-normal t (the demo's recipe)", []),
    "unet-flow-uniform": ("UNet, flow matching, uniform t", ["objective.time_sampling=uniform"]),
    "unet-v": ("UNet, v-prediction, scaled-linear betas, uniform t", ["objective.kind=v"]),
    "unet-eps": ("UNet, eps-prediction, scaled-linear betas, uniform t", ["objective.kind=eps"]),
    "dit-flow-ln": ("DiT (PixArt form), patch 1, flow matching, logit-normal t", _DIT),
    "mmdit-flow-ln": ("MMDiT (SD3 form), patch 1, flow matching, logit-normal t", _MMDIT),
}
REFERENCE = "unet-flow-ln"
QUICK = dict(train_images=96, val_images=32, holdout_images=16, shard_size=48,
             overrides_stage1=["train.max_steps=10", "autoencoder.latent_stats_batches=1", "data.num_workers=0",
                               "validation.every=5", "validation.sample_every=10", "train.checkpoint_every=10"],
             overrides_stage2=["train.max_steps=4", "validation.every=0", "validation.sample_every=0",
                               "data.num_workers=0", "sampling.steps=3", "train.checkpoint_every=4"])
SECONDS_PER_REF_STEP = 0.36   # the reference row on 2 cores (1,800 steps ~ 650 s): the ETA of the progress lines


def flops_per_sample(config: Path, overrides: list[str], batch: int = 4) -> tuple[float, int]:
    """Training FLOPs (forward + backward) of one sample through the row's denoiser, and its parameter count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from launch.runtime.config import load_config
    from ldm.training import build_denoiser_for, latent_shape

    cfg = load_config(config, overrides)
    net = build_denoiser_for(cfg)
    c, h, w = latent_shape(cfg.denoiser)
    length = cfg.text_encoder.context_length or 77
    width = {"unet": lambda d: d.unet.context_dim, "dit": lambda d: d.dit.context_dim,
             "mmdit": lambda d: d.mmdit.context_dim}[cfg.denoiser.kind](cfg.denoiser)
    x, t = torch.randn(batch, c, h, w), torch.rand(batch) * 999
    context = torch.randn(batch, length, width)
    mask = torch.ones(batch, length, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        net(x, t, context, mask).float().pow(2).mean().backward()
    return counter.get_total_flops() / batch, sum(p.numel() for p in net.parameters())


def run(demo: Path, rows: list[str], steps: int, seen: int, held_out: int, quick: bool, threads: int) -> dict:
    from launch.demo.compositional import CompositionalTier
    from launch.demo.run import DemoSettings, Phases, _fingerprint, _shards, _train, run_demo
    from launch.interop.export import export_run
    from launch.interop.sample import sample_export
    from launch.runtime.exportdir import load_pipeline

    log = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    tier_options = {"seen": seen, "held_out": held_out}
    s = DemoSettings.for_tier("compositional", demo, threads=threads, tier_options=tier_options,
                              **(QUICK if quick else {}))
    # the data, stage one and precompute phases of the compositional demo (reused when done); a demo that never
    # ran trains its own stage two too, which the table does not use
    if not (demo / "data" / "latents").is_dir():
        run_demo(s, log=log)
    tier = CompositionalTier(**tier_options)
    config = s.diffusion_config
    common = [f"data.image_size={s.image_size}", f"train.seed={s.seed}", f"data.urls={_shards(demo / 'data' / 'latents')}",
              "data.kind=precomputed", "latents.source=precomputed", f"latents.autoencoder={demo / 'stage1_export'}",
              "validation.every=0", "validation.sample_every=0", "logging.mfu=false"]
    if quick:
        common += ["sampling.steps=3", "train.log_every=2", "data.num_workers=0"]
    ref_flops, _ = flops_per_sample(config, [*common, *ROWS[REFERENCE][1]])
    counted = {name: flops_per_sample(config, [*common, *ROWS[name][1]]) for name in rows}
    row_steps_of = {name: max(1, round(steps * ref_flops / fps)) for name, (fps, _) in counted.items()}
    out = demo / "bench_quality"
    estimates = {}
    for name in rows:   # equal FLOPs: each row's training takes about the reference's time
        estimates.update({f"{name}_train": steps * SECONDS_PER_REF_STEP, f"{name}_sample": 60.0})
    ph = Phases(out, set(), estimates, log)
    table = []
    for name in rows:
        what, overrides = ROWS[name]
        (fps, params), row_steps = counted[name], row_steps_of[name]
        run_dir, export, samples = out / name / "run", out / name / "export", out / name / "samples"
        train = [*common, *overrides, f"train.max_steps={row_steps}", f"train.checkpoint_every={row_steps}"]
        fp = _fingerprint(name, train, (demo / "stage1_export" / "config.json").read_text(), seen, held_out)
        result = ph.run(f"{name}_train", f"{name}: {row_steps} steps", fp, lambda: _train(config, run_dir, train, threads))

        def sample_and_judge() -> dict:
            shutil.rmtree(export, ignore_errors=True)
            shutil.rmtree(samples, ignore_errors=True)
            export_run(run_dir, export, autoencoder=demo / "stage1_export")
            pipeline = load_pipeline(export, "cpu")
            for sub, prompts, num, seed in tier.score_sets(s):
                sample_export(export, prompts, samples / sub, num=num, seed=seed, batch_size=128, pipeline=pipeline,
                              progress=True)
            return tier.judge(samples, s)
        judged = ph.run(f"{name}_sample", f"{name}: sample and judge", fp, sample_and_judge)
        train_s = ph.timings[f"{name}_train"]["seconds"]
        table.append({"row": name, "what": what, "params": params, "gflop_per_sample": fps / 1e9, "steps": row_steps,
                      "train_gflop": fps * row_steps * _batch(config, train) / 1e9, "train_seconds": train_s,
                      "final_step": result.get("step"),
                      "overall": judged["all"]["overall"], "seen": judged["seen"]["overall"],
                      "held_out": judged["held_out"]["overall"],
                      "tasks": {t: v["accuracy"] for t, v in judged["all"]["tasks"].items()}})
    return {"benchmark": "quality", "quick": quick, "reference": REFERENCE, "reference_steps": steps,
            "seen_prompts": seen, "held_out_prompts": held_out, "rows": table, "host": host(threads)}


def _batch(config: Path, overrides: list[str]) -> int:
    from launch.runtime.config import load_config

    cfg = load_config(config, overrides)
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps


def to_markdown(result: dict) -> str:
    from data_pipeline.compositional import TASKS

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"
    rows = [(r["row"], r["what"], f"{r['params'] / 1e6:.2f} M", r["steps"], f"{r['train_gflop'] / 1e3:,.0f}",
             f"{r['train_seconds']:.0f}", *(pct(r["tasks"][t]) for t in TASKS), pct(r["seen"]), pct(r["held_out"]),
             f"**{pct(r['overall'])}**") for r in result["rows"]]
    return markdown_table(["row", "recipe", "params", "steps", "train TFLOP", "train s", *TASKS, "seen",
                           "held-out", "overall"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ldm bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out_compositional", help="the compositional demo's folder (run or reused)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=None, help="steps of the reference row (default: the config's)")
    p.add_argument("--seen", type=int, default=240, help="scored captions of training compositions")
    p.add_argument("--held-out", type=int, default=120, help="scored captions with a held-out item")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="toy sizes (what the test runs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"--rows: unknown {unknown}; allowed: {', '.join(ROWS)}")
    steps = args.steps
    if steps is None:
        from launch.demo.compositional import SETTINGS
        from launch.runtime.config import load_config

        steps = 4 if args.quick else load_config(SETTINGS["diffusion_config"]).train.max_steps
    result = run(Path(args.demo).resolve(), rows, steps, args.seen, args.held_out, args.quick, args.threads)
    save("quality" + ("_quick" if args.quick else ""), result, to_markdown(result))
    print(json.dumps(result, indent=1) if args.json else to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
