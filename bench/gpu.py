"""The prepared GPU run behind `bench/gpu.sh`: what a lent GPU (or a cluster node) measures in <= 8 minutes.

Sections, each appended to one JSON result (`bench/results/gpu.json`; the dry run writes `gpu_dry.json`, which
the README never shows):
1. `peak`: the GPU's bf16 and fp32 GEMM GFLOP/s measured in this process (`bench/peak.py`), the MFU denominator.
2. `comparisons`: training steps of ours vs diffusers with the same weights (`bench/train_step.compare`: the
   equality check first, then FLOPs, then alternating A B A B timing) for the SD-UNet (SD 1.5 topology,
   859.5 M parameters) and DiT-XL/2 (PixArt form, 32x32x4 latents) at 256 px, bf16 autocast, torch SDPA (flash
   or memory-efficient kernels where the inputs allow), torch.compile off and on; img/s and MFU.
3. `zero2`: a real DeepSpeed ZeRO-2 engine on one GPU built from a stage-two config as the runtime builds it
   (`launch/runtime/engine.py`, the stage's parameter groups), a few bf16 training steps, the allocator's peak
   (`torch.cuda.max_memory_allocated`) beside `ldm plan`'s prediction for the same config, micro-batch and
   world size (the planner's peak without the frozen text tower and autoencoder, which this job does not load).
A time budget (`--budget-s`, default 420 s) is checked before each measurement: what does not fit is recorded
as skipped, never left out silently.

`--dry-run` runs the same code on the CPU with tiny sizes of the same architectures (torch.compile with the
"eager" backend: graph capture without code generation) so a test proves the script end to end.

    python -m bench.gpu [--dry-run] [--budget-s S] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import torch

from .common import host, markdown_table, save
from .peak import measure as measure_peak
from .train_step import QUICK, compare

# name -> (pair in bench/models.py, sizes at 256 px, micro-batch on the GPU)
MODELS = {
    "sd_unet": ("unet", dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                             attention_levels=(0, 1, 2), num_heads=8, context_dim=768, sample_size=32), 32),
    "dit_xl_2": ("dit", dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                             context_dim=1024), 64),
}
DRY_BATCH = 2
# the stage-two config of the ZeRO-2 section and its 256 px overrides; the dry run shrinks the same config
ZERO_CONFIG = "configs/ldm/unet-sd15.yaml"
ZERO_OVERRIDES = ["denoiser.unet.sample_size=32", "train.micro_batch_size=32", "deepspeed.zero_stage=2",
                  "train.activation_checkpointing=false", "ema.enabled=false",
                  "latents.source=precomputed", "data.kind=precomputed"]    # this job runs no encoder
ZERO_DRY = ["denoiser.unet.model_channels=32", "denoiser.unet.channel_mult=[1,2]",
            "denoiser.unet.attention_levels=[1]", "denoiser.unet.num_heads=4", "denoiser.unet.context_dim=32",
            "denoiser.unet.sample_size=8", "denoiser.unet.num_res_blocks=1", "train.micro_batch_size=2"]
ZERO_STEPS = 3

# README table: header -> key of a comparison object (the test checks every key is in the JSON)
COLUMNS = [("model", "name"), ("params", "params"), ("batch", "batch"), ("compile", "compile"),
           ("ours img/s", "ours_img_per_s"), ("peer", "peer"), ("peer img/s", "peer_img_per_s"),
           ("ratio", "ratio"), ("ours MFU", "ours_mfu"), ("peer MFU", "peer_mfu"),
           ("GFLOP/step", "flops_per_step")]
ZERO_COLUMNS = [("config", "config"), ("micro-batch", "micro_batch"), ("measured peak GiB", "measured_peak_gib"),
                ("plan GiB (no frozen)", "plan_peak_gib"), ("measured / plan", "measured_over_plan"),
                ("memory source", "memory_source")]


class Budget:
    """Seconds left of the run's budget; `fits(cost)` says whether a measurement of about `cost` s still fits."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def fits(self, cost: float) -> bool:
        return self.left() >= cost


def train_comparisons(device: str, dry: bool, budget: Budget, peak: dict, repeats: int) -> list[dict]:
    out = []
    for name, (pair, sizes, batch) in MODELS.items():
        for compiled in (False, True):
            label = f"{name}_bf16" + ("_compile" if compiled else "")
            cost = 10 if dry else (150 if compiled else 45)     # rough seconds: a compile takes minutes on a GPU
            if not budget.fits(cost):
                out.append({"name": label, "skipped": f"time budget ({budget.left():.0f} s left, ~{cost} s needed)"})
                continue
            c = compare(pair, "bf16", repeats=repeats, peak=peak, threads=torch.get_num_threads(), quick=dry,
                        device=device, compile=compiled, channels_last=pair == "unet" and not dry,
                        batch=DRY_BATCH if dry else batch, overrides=QUICK[pair] if dry else sizes,
                        compile_backend="eager" if dry else "inductor")
            c["name"] = label
            out.append(c)
    return out


class PeakMemory:
    """Peak bytes of tensors this job holds. CUDA: the caching allocator's `max_memory_allocated`. CPU (the dry
    run): the tensors alive at the start (weights, optimizer states: `live_tensor_bytes`) plus the high-water of
    what the measured step allocates (`AllocationTracker`), the same accounting the planner's tests use."""

    def __init__(self, device: str):
        from launch.plan.measure import AllocationTracker, live_tensor_bytes

        self.device, self._live, self._tracker_cls = device, live_tensor_bytes, AllocationTracker
        self.source = "cuda.max_memory_allocated" if device == "cuda" else "live tensors + step high-water (CPU)"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.before = set(live_tensor_bytes())

    def measure_step(self, step_fn) -> int:
        if self.device == "cuda":     # the peak since construction: weights, states and this step
            step_fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        held = {k: n for k, n in self._live().items() if k not in self.before}
        with self._tracker_cls(ignore=set(held)) as tracker:
            step_fn()
        return sum(held.values()) + tracker.curve()[0]


def zero2_one_gpu(device: str, dry: bool, budget: Budget) -> dict:
    """A ZeRO-2 engine on one device from `ZERO_CONFIG`: measured peak beside the planner's."""
    from launch.plan.description import describe
    from launch.plan.hardware import Assumptions, Hardware
    from launch.plan.measure import denoiser_inputs
    from launch.plan.planner import frozen_bytes, memory_for
    from launch.runtime import dist as D
    from launch.runtime.config import load_config
    from launch.runtime.engine import build_engine
    from ldm.objectives import build_objective
    from ldm.training import DiffusionStage, build_denoiser, latent_shape

    if not budget.fits(10 if dry else 60):
        return {"skipped": f"time budget ({budget.left():.0f} s left)"}
    merged = dict(o.split("=", 1) for o in ZERO_OVERRIDES + (ZERO_DRY if dry else []))   # the dry run's win
    overrides = [f"{k}={v}" for k, v in merged.items()]
    cfg = load_config(ZERO_CONFIG, overrides)
    micro = cfg.train.micro_batch_size
    desc = describe(cfg)
    planned = memory_for(desc, 2, 1, micro, 1, cfg.train.activation_checkpointing, Hardware(), Assumptions())
    env = D.init_distributed(timeout_s=600)
    try:
        memory = PeakMemory(device)            # before the model: its weights count
        torch.manual_seed(0)
        net = build_denoiser(cfg.denoiser)
        stage = DiffusionStage(net, build_objective(cfg.objective), conditioning=cfg.conditioning,
                               latents=cfg.latents, sampling=cfg.sampling)
        engine = build_engine(net, stage.param_groups("denoiser"), cfg)
        _, h, w = latent_shape(cfg.denoiser)

        def step(seed: int) -> None:
            inputs = {k: v.to(env.device) if torch.is_tensor(v) else v
                      for k, v in denoiser_inputs(cfg.denoiser, micro, (h, w), seed=seed).items()}
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
                loss = engine(**inputs).float().square().mean()
            engine.backward(loss)
            engine.step()

        times = []
        for i in range(ZERO_STEPS - 1):        # optimizer states and buffers exist after the first step
            t0 = time.perf_counter()
            step(i)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        measured = memory.measure_step(lambda: step(ZERO_STEPS - 1))
        times.append(time.perf_counter() - t0)
        source = memory.source
        engine.destroy()
    finally:
        D.destroy()
    plan_no_frozen = planned["peak"] - frozen_bytes(desc.frozen)
    gib = 2 ** 30
    return {"config": ZERO_CONFIG, "overrides": overrides, "zero_stage": 2, "world": 1, "micro_batch": micro,
            "params": desc.params.trainable, "steps": ZERO_STEPS, "step_s": [round(t, 4) for t in times],
            "measured_peak_bytes": measured, "memory_source": source,
            "plan_peak_bytes": int(plan_no_frozen), "plan_peak_with_frozen_bytes": int(planned["peak"]),
            "measured_peak_gib": round(measured / gib, 3), "plan_peak_gib": round(plan_no_frozen / gib, 3),
            "measured_over_plan": round(measured / plan_no_frozen, 3) if plan_no_frozen else None}


def table(result: dict) -> str:
    rows = []
    for c in result["comparisons"]:
        if c.get("skipped"):
            rows.append([c["name"]] + ["skipped: " + c["skipped"]] + [""] * (len(COLUMNS) - 2))
            continue
        rows.append([c["name"], f"{c['params'] / 1e6:.1f} M", c["batch"], c["compile"], c["ours_img_per_s"],
                     c["peer"].split(".")[-1], c["peer_img_per_s"], f"{c['ratio']:.2f}x", f"{c['ours_mfu']:.0%}",
                     f"{c['peer_mfu']:.0%}", f"{c['flops_per_step'] / 1e9:.1f}"])
    text = markdown_table([h for h, _ in COLUMNS], rows)
    z = result.get("zero2") or {}
    if z and not z.get("skipped"):
        text += "\n\nDeepSpeed ZeRO-2 on one GPU, live engine vs `ldm plan`:\n\n" + markdown_table(
            [h for h, _ in ZERO_COLUMNS], [[z[k] for _, k in ZERO_COLUMNS]])
    elif z:
        text += f"\n\nZeRO-2 on one GPU: skipped ({z['skipped']})."
    return text


def run(dry_run: bool = False, budget_s: float = 420.0, repeats: Optional[int] = None,
        save_results: bool = True) -> dict:
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        return {"name": "gpu", "skipped": "no CUDA device (use --dry-run on a CPU)", "comparisons": []}
    if dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    budget = Budget(budget_s)
    t0 = time.monotonic()
    peak = measure_peak(quick=dry_run, device=device)
    comps = train_comparisons(device, dry_run, budget, peak, repeats or (2 if dry_run else 10))
    zero2 = zero2_one_gpu(device, dry_run, budget)
    result = {"name": "gpu", "dry_run": dry_run, "host": host(torch.get_num_threads()), "peak": peak,
              "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                       "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()},
              "comparisons": comps, "zero2": zero2, "budget_s": budget_s,
              "elapsed_s": round(time.monotonic() - t0, 1)}
    if save_results:
        save("gpu_dry" if dry_run else "gpu", result, table(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny sizes (for tests)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for all measurements (default 420)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 10; dry run 2)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = p.parse_args(argv)
    result = run(args.dry_run, args.budget_s, args.repeats)
    print(json.dumps(result) if args.json else result.get("skipped") or table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
