"""`ldm bench NAME [--quick] [--json] ...`: the benchmarks in `bench/`, each writing bench/results/NAME.json + .md."""
from __future__ import annotations

import argparse
import importlib

NAME = "bench"
HELP = "benchmarks against peers (train, loader, precomputed, sampler, zero, peak) and the README table"
# name -> module in bench/ (each has main(argv) -> int and takes --quick / --json)
BENCHMARKS = {
    "train": "bench.train_step",        # ours vs diffusers: img/s, FLOPs, MFU, fp32 and bf16
    "loader": "bench.loader",           # shard loader vs the decode bound
    "precomputed": "bench.precomputed",  # stage two from precomputed latents vs online encoding
    "sampler": "bench.sampler_cost",    # model evaluations and wall time per image at equal quality
    "zero": "bench.zero_memory",        # per-rank bytes for ZeRO 0-3 vs DeepSpeed's estimator
    "peak": "bench.peak",               # measured matmul peak (the MFU denominator)
    "profile": "bench.profile_step",    # torch.profiler tables of one training step, ours and the peer
    "quality": "bench.quality",         # recipe table on the compositional tier, equal FLOPs per row (slow)
    "report": "bench.report",           # README "Performance" block from bench/results/*.json
}
DESCRIPTION = HELP + """

Measure nothing while something else runs on the machine: the peers run in the same process,
alternating A B A B, so ratios survive some noise, but absolute img/s do not.

  ldm bench train --json            # the list of comparison objects
  ldm bench train --quick           # tiny models, seconds (what the tests run)
  ldm bench train --cuda            # bf16, flash SDPA, torch.compile, channels_last (needs a GPU)
  bench/gpu.sh [--dry-run]          # the prepared GPU run (<= 8 min): SD-UNet + DiT-XL/2, ZeRO-2 vs ldm plan
  ldm bench quality                 # the recipe table (UNet / DiT / MMDiT, eps / v / flow), tens of minutes
  ldm bench report                  # rewrite the README Performance block from bench/results
  ldm bench all                     # every benchmark, then the report
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for that benchmark (see its --help)")


def run(args) -> int:
    names = [n for n in BENCHMARKS if n not in ("peak", "profile", "quality", "report")] + ["report"] if args.name == "all" else [args.name]
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        # `all` forwards its arguments (--json, --quick) to the measurements; the report reads their files
        rest = [] if args.name == "all" and name == "report" else list(args.rest)
        rc = int(module.main(rest) or 0)
        if rc:
            return rc
    return 0
