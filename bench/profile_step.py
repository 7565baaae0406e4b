"""Where a training step's time goes: torch.profiler tables (self CPU time per op) of one model pair's
training step, ours and the diffusers peer, the same step `ldm bench train` times. For reading why a ratio
is what it is (e.g. convolution kernels shared by both sides bound the autoencoder's bf16 gain).

    python -m bench.profile_step autoencoder unet dit mmdit [--dtype bf16] [--rows 10] [--threads 2] [--quick]
    ldm bench profile unet                # the same
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from . import models as M
from .common import set_threads
from .train_step import _dtype, build_pair


def profile_pair(model: str, dtype: str, rows: int, steps: int = 2, quick: bool = False) -> str:
    pair = build_pair(model, quick)
    out = []
    for side in ("ours", "peer"):
        step = M.trainer(pair, side, _dtype(dtype))
        for _ in range(2):                       # warm-up: oneDNN primitive caches, allocator
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        name = "ours" if side == "ours" else f"diffusers.{pair.peer}"
        out.append(f"== {model} {dtype} {name}: {steps} steps\n"
                   + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                               max_name_column_width=44))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", choices=("autoencoder", "unet", "dit", "mmdit"))
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="the tiny models of `ldm bench train --quick`")
    args = p.parse_args(argv)
    set_threads(args.threads)
    for model in args.models:
        print(profile_pair(model, args.dtype, args.rows, quick=args.quick), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
