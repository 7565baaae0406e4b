"""`ldm bench quality`: a recipe table on a demo tier's data, equal training compute per row.

Our own small version of the SD3 paper's comparison of formulations, on a CPU, from one command. Every row
trains stage two from the same precomputed latents and text embeddings of `ldm demo --tier TIER` (its data,
autoencoder and precompute phases are run or reused in --demo DIR), then samples the tier's scored prompts
and is judged from the pixels: GenEval's tasks on the compositional tier (seen and held-out compositions),
colour / shape / background on the shapes tier (held-out triples apart).

Equal compute = equal training FLOPs: each row's denoiser is counted once (torch's FlopCounterMode over a
forward and backward of one batch), and a row gets steps = reference steps x reference FLOPs per sample /
its FLOPs per sample, the reference being the demo's recipe (UNet, flow matching, logit-normal t) at
--steps. The optimizer, EMA and sampler are the demo config's in every row; the batch is TABLE_BATCH unless a
row sets its own (`train.micro_batch_size`), which then gets TABLE_BATCH / its batch times the steps.

    ldm bench quality [--tier compositional|shapes] [--demo DIR] [--steps N] [--rows unet-flow-ln,dit-flow-ln]
                      [--seen 240] [--held-out 120] [--quick] [--json]
Rows are reused by a second run when nothing they depend on changed (phases in DEMO/bench_quality/.demo).
A run of some rows adds them to the saved table when the table was made with the same tier, reference steps
and prompt counts (a row run again replaces its old one); each row keeps the host and time it was measured on.
A --steps other than the demo config's saves a table of its own (`quality_shapes_steps3300`: the README shows
it below the equal-compute one), so a longer trial never replaces the default table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from .common import RESULTS, RESULTS_ENV, host, markdown_table, save, steps_table


def _transformer(kind: str, depth: int, patch: int = 1) -> Callable[[int], list[str]]:
    """A transformer row over the tier's latent grid (side x side, 8 channels), width 128."""
    return lambda side: [f"denoiser.kind={kind}", f"denoiser.{kind}.input_size={side}",
                         f"denoiser.{kind}.patch_size={patch}", f"denoiser.{kind}.in_channels=8",
                         f"denoiser.{kind}.hidden_size=128", f"denoiser.{kind}.depth={depth}",
                         f"denoiser.{kind}.num_heads=4", f"denoiser.{kind}.context_dim=128"]


def _pooled_mmdit(*extra: str) -> Callable[[int], list[str]]:
    """The patch-2 MMDiT with the pooled text vector (64 wide in the demo's shards) in its modulation."""
    return lambda side: [*_transformer("mmdit", 4, patch=2)(side), "denoiser.pooled_dim=64", *extra]


def _fixed(overrides: list[str]) -> Callable[[int], list[str]]:
    return lambda side: list(overrides)


# name -> (what it is, latent side -> overrides over the tier's diffusion config)
ROWS = {
    "unet-flow-ln": ("UNet, flow matching, logit-normal t (the demo's recipe)", _fixed([])),
    "unet-flow-uniform": ("UNet, flow matching, uniform t", _fixed(["objective.time_sampling=uniform"])),
    "unet-v": ("UNet, v-prediction, scaled-linear betas, uniform t", _fixed(["objective.kind=v"])),
    "unet-eps": ("UNet, eps-prediction, scaled-linear betas, uniform t", _fixed(["objective.kind=eps"])),
    "dit-flow-ln": ("DiT (PixArt form), patch 1, flow matching, logit-normal t", _transformer("dit", 6)),
    "mmdit-flow-ln": ("MMDiT (SD3 form), patch 1, flow matching, logit-normal t", _transformer("mmdit", 4)),
    # patch 2, as SD3 and PixArt train: 4x fewer image tokens, so more steps at the same FLOPs
    "dit-p2-flow-ln": ("DiT (PixArt form), patch 2, flow matching, logit-normal t", _transformer("dit", 6, patch=2)),
    "mmdit-p2-flow-ln": ("MMDiT (SD3 form), patch 2, flow matching, logit-normal t", _transformer("mmdit", 4, patch=2)),
    # SD3 feeds the pooled text vector into every block's modulation (adaLN) beside the joint attention; the
    # demo's precomputed shards carry open_clip's pooled feature (64 wide)
    "mmdit-p2-pooled-flow-ln": ("MMDiT (SD3 form) with pooled text in the modulation, patch 2, flow matching, "
                                "logit-normal t", _pooled_mmdit()),
    # the same at batch 32: four times the optimizer steps for the same FLOPs
    "mmdit-p2-pooled-b32-flow-ln": ("MMDiT (SD3 form) with pooled text in the modulation, patch 2, batch 32, flow "
                                    "matching, logit-normal t", _pooled_mmdit("train.micro_batch_size=32")),
    # the same at batch 128 and 4x the demo's learning rate (scratch runs: 4e-3 79 %, 1.6e-2 74 % shape)
    "mmdit-p2-pooled-lr8-flow-ln": ("MMDiT (SD3 form) with pooled text in the modulation, patch 2, lr 8e-3, flow "
                                    "matching, logit-normal t", _pooled_mmdit("optimizer.lr=8e-3")),
    # both levers at once: batch 64 and lr 8e-3 (scratch: batch 32 at 4e-3 did no better than at 2e-3)
    "mmdit-p2-pooled-b64-lr8-flow-ln": ("MMDiT (SD3 form) with pooled text in the modulation, patch 2, batch 64, "
                                        "lr 8e-3, flow matching, logit-normal t",
                                        _pooled_mmdit("train.micro_batch_size=64", "optimizer.lr=8e-3")),
    "mmdit-rope-flow-ln": ("MMDiT with 2-D RoPE instead of sin-cos positions (as Flux), patch 1, flow matching, "
                           "logit-normal t", lambda side: [*_transformer("mmdit", 4)(side), "denoiser.mmdit.rope=true",
                                                           "denoiser.mmdit.pos_embed=none"]),
}
TIERS = ("compositional", "shapes")
SHAPE_TASKS = ("color", "shape", "background")
REFERENCE = "unet-flow-ln"
# Every row trains at this batch, whatever the tier's demo config says: the compositional demo runs batch 64 to
# fit its 20 minutes, but the table compares recipes at the compute they were measured at (1,800 steps of 128).
TABLE_BATCH = 128
_QUICK_STAGE1 = ["train.max_steps=10", "autoencoder.latent_stats_batches=1", "data.num_workers=0",
                 "validation.every=5", "validation.sample_every=10", "train.checkpoint_every=10"]
_QUICK_STAGE2 = ["train.max_steps=4", "validation.every=0", "validation.sample_every=0", "data.num_workers=0",
                 "sampling.steps=3", "train.checkpoint_every=4"]
QUICK = {"compositional": dict(train_images=96, val_images=32, holdout_images=16, shard_size=48,
                               overrides_stage1=_QUICK_STAGE1, overrides_stage2=_QUICK_STAGE2),
         "shapes": dict(train_images=96, val_images=32, holdout_images=16, shard_size=48, samples_per_triple=1,
                        holdout_samples_per_triple=1, tier_options={"color_sweep_images": 16},
                        overrides_stage1=_QUICK_STAGE1, overrides_stage2=_QUICK_STAGE2)}
# seconds of one reference step on 2 cores (the ETA of the progress lines): compositional 1,800 steps ~ 970 s
# (batch 128 at ~235 img/s), shapes 1,100 steps ~ 295 s
SECONDS_PER_REF_STEP = {"compositional": 0.54, "shapes": 0.27}


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
    pooled = torch.randn(batch, cfg.denoiser.pooled_dim) if cfg.denoiser.pooled_dim else None
    with FlopCounterMode(display=False) as counter:
        net(x, t, context, mask, pooled=pooled).float().pow(2).mean().backward()
    return counter.get_total_flops() / batch, sum(p.numel() for p in net.parameters())


def _scores(tier: str, judged: dict) -> dict:
    """overall / seen / held-out and per-task accuracies of one row, whichever judge the tier has."""
    if tier == "compositional":
        return {"overall": judged["all"]["overall"], "seen": judged["seen"]["overall"],
                "held_out": judged["held_out"]["overall"],
                "tasks": {t: v["accuracy"] for t, v in judged["all"]["tasks"].items()}}
    return {"overall": judged["accuracy"]["all"], "seen": judged.get("rest", {}).get("accuracy", {}).get("all"),
            "held_out": judged.get("held_out", {}).get("accuracy", {}).get("all"),
            "tasks": {t: judged["accuracy"][t] for t in SHAPE_TASKS}}


def run(demo: Path, rows: list[str], steps: int, seen: int, held_out: int, quick: bool, threads: int,
        tier_name: str = "compositional") -> dict:
    from launch.demo.run import DemoSettings, Phases, _fingerprint, _shards, _train, run_demo, tier_of
    from launch.interop.export import export_run
    from launch.interop.sample import sample_export
    from launch.runtime.config import load_config
    from launch.runtime.exportdir import load_pipeline

    log = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    tier_options = {"seen": seen, "held_out": held_out} if tier_name == "compositional" else {}
    quick_kw = dict(QUICK[tier_name]) if quick else {}
    tier_options = {**quick_kw.pop("tier_options", {}), **tier_options}
    s = DemoSettings.for_tier(tier_name, demo, threads=threads, tier_options=tier_options, **quick_kw)
    # the data, stage one and precompute phases of the tier's demo (reused when done); a demo that never
    # ran trains its own stage two too, which the table does not use
    if not (demo / "data" / "latents").is_dir():
        run_demo(s, log=log)
    tier = tier_of(s)
    config = s.diffusion_config
    side = load_config(config).denoiser.unet.sample_size
    common = [f"data.image_size={s.image_size}", f"train.seed={s.seed}", f"data.urls={_shards(demo / 'data' / 'latents')}",
              "data.kind=precomputed", "latents.source=precomputed", f"latents.autoencoder={demo / 'stage1_export'}",
              "validation.every=0", "validation.sample_every=0", "logging.mfu=false"]
    if quick:
        common += ["sampling.steps=3", "train.log_every=2", "data.num_workers=0"]
    row_overrides = {name: _with_table_batch(common, ROWS[name][1](side)) for name in {*rows, REFERENCE}}
    ref_flops, _ = flops_per_sample(config, row_overrides[REFERENCE])
    counted = {name: flops_per_sample(config, row_overrides[name]) for name in rows}
    batch_of = {name: _batch(config, row_overrides[name]) for name in rows}
    row_steps_of = {name: equal_compute_steps(steps, ref_flops * TABLE_BATCH, fps * batch_of[name])
                    for name, (fps, _) in counted.items()}
    out = demo / "bench_quality"
    estimates = {}
    for name in rows:   # equal FLOPs: each row's training takes about the reference's time
        estimates.update({f"{name}_train": steps * SECONDS_PER_REF_STEP[tier_name], f"{name}_sample": 60.0})
    ph = Phases(out, set(), estimates, log)
    table = []
    for name in rows:
        what = ROWS[name][0]
        (fps, params), row_steps = counted[name], row_steps_of[name]
        run_dir, export, samples = out / name / "run", out / name / "export", out / name / "samples"
        train = [*row_overrides[name], f"train.max_steps={row_steps}", f"train.checkpoint_every={row_steps}"]
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
                      "batch": batch_of[name], "train_gflop": fps * row_steps * batch_of[name] / 1e9,
                      "train_seconds": train_s,
                      "final_step": result.get("step"), **_scores(tier_name, judged)})
    measured_on = host(threads)
    return {"benchmark": "quality", "tier": tier_name, "quick": quick, "reference": REFERENCE,
            "reference_steps": steps, "batch": TABLE_BATCH, "seen_prompts": seen, "held_out_prompts": held_out,
            "rows": [{**r, "host": measured_on} for r in table], "host": measured_on}


SAME_TABLE = ("benchmark", "tier", "quick", "reference", "reference_steps", "batch", "seen_prompts",
              "held_out_prompts")


def merge_rows(saved: dict, new: dict) -> dict:
    """`new`'s rows added to a saved table of the same settings (SAME_TABLE): a row of both takes `new`'s
    figures, the others keep theirs, in ROWS order. Every row carries the host it was measured on (rows of
    a table saved before rows had one take the table's). A table of other settings is replaced whole."""
    for table in (saved, new):
        table.setdefault("batch", TABLE_BATCH)   # tables saved before the key: every row ran at batch 128
        for row in table.get("rows", []):
            row.setdefault("host", table.get("host"))
    if any(saved.get(k) != new.get(k) for k in SAME_TABLE):
        return new
    rows = {r["row"]: r for r in saved.get("rows", [])}
    rows.update({r["row"]: r for r in new["rows"]})
    order = [n for n in ROWS if n in rows] + [n for n in rows if n not in ROWS]
    return {**new, "rows": [rows[n] for n in order]}


def _with_table_batch(common: list[str], row: list[str]) -> list[str]:
    """The overrides a row trains with: the table's batch unless the row sets its own (a key may be given
    once), in the order the rows' saved fingerprints were made with."""
    own = any(o.startswith("train.micro_batch_size=") for o in row)
    return [*common, *([] if own else [f"train.micro_batch_size={TABLE_BATCH}"]), *row]


def equal_compute_steps(reference_steps: int, reference_flops_per_step: float, flops_per_step: float) -> int:
    """Steps of a row whose training FLOPs equal the reference's (FLOPs per step = per sample x batch)."""
    return max(1, round(reference_steps * reference_flops_per_step / flops_per_step))


def _batch(config: Path, overrides: list[str]) -> int:
    from launch.runtime.config import load_config

    cfg = load_config(config, overrides)
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps


def to_markdown(result: dict) -> str:
    from data_pipeline.compositional import TASKS

    tasks = TASKS if result.get("tier", "compositional") == "compositional" else SHAPE_TASKS

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    def measured(r):   # train s depends on the host: say which, and when
        h = r.get("host") or result.get("host") or {}
        return f"{h.get('cpu', '?')}, {str(h.get('time', '?'))[:10]}"
    batch = result.get("batch", TABLE_BATCH)        # rows saved before rows had their own ran at the table's
    rows = [(r["row"], r["what"], f"{r['params'] / 1e6:.2f} M", r["steps"], r.get("batch", batch),
             f"{r['train_gflop'] / 1e3:,.0f}", f"{r['train_seconds']:.0f}", *(pct(r["tasks"][t]) for t in tasks),
             pct(r["seen"]), pct(r["held_out"]), f"**{pct(r['overall'])}**", measured(r)) for r in result["rows"]]
    return markdown_table(["row", "recipe", "params", "steps", "batch", "train TFLOP", "train s", *tasks, "seen",
                           "held-out", "overall", "measured on"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ldm bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", default="compositional", choices=TIERS, help="the demo tier whose data and judge")
    p.add_argument("--demo", default=None, help="the tier's demo folder, run or reused (default: `ldm demo`'s for "
                   "the tier: demo_out_compositional / demo_out)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=None, help="steps of the reference row (default: the config's)")
    p.add_argument("--seen", type=int, default=240, help="compositional: scored captions of training compositions")
    p.add_argument("--held-out", type=int, default=120, help="compositional: scored captions with a held-out item")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="toy sizes (what the test runs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"--rows: unknown {unknown}; allowed: {', '.join(ROWS)}")
    demo = Path(args.demo or ("demo_out_compositional" if args.tier == "compositional" else "demo_out")).resolve()
    from launch.demo.run import DemoSettings
    from launch.runtime.config import load_config

    default_steps = 4 if args.quick else \
        load_config(DemoSettings.for_tier(args.tier, demo).diffusion_config).train.max_steps
    steps = args.steps if args.steps is not None else default_steps
    result = run(demo, rows, steps, args.seen, args.held_out, args.quick, args.threads, args.tier)
    # another reference step count is another table, saved apart: it must not replace the equal-compute one
    name = ("quality" if args.tier == "compositional" else f"quality_{args.tier}") + ("_quick" if args.quick else "")
    if steps != default_steps and not args.quick:
        name = steps_table(name, steps)
    saved = Path(os.environ.get(RESULTS_ENV) or RESULTS) / f"{name}.json"
    if saved.is_file():
        result = merge_rows(json.loads(saved.read_text()), result)
    save(name, result, to_markdown(result))
    print(json.dumps(result, indent=1) if args.json else to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
