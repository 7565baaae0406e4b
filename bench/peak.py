"""The machine's measured matmul peak: fp32 and bf16 GEMM GFLOP/s at the benchmark's thread count.

MFU elsewhere in `bench/` divides by these numbers, measured in the same process run as the model
timings, not by a datasheet figure. A large square GEMM (n = 2048; 1024 in quick mode) is timed several
times and the best rate kept (the peak is what the hardware can do; a slow repeat is the host's noise).
On CUDA (`device="cuda"`) the same is done on the GPU with n = 8192.

    python -m bench.peak [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` (2 n^3 FLOPs per product)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def measure(quick: bool = False, device: str = "cpu") -> dict:
    n = (8192 if not quick else 4096) if device == "cuda" else (1024 if quick else 2048)
    repeats = 3 if quick else 6
    out = {"device": device, "n": n, "bf16_gflops": round(gemm_gflops(torch.bfloat16, n, repeats, device), 1),
           "fp32_gflops": round(gemm_gflops(torch.float32, n, repeats, device), 1)}
    out["bf16_over_fp32"] = round(out["bf16_gflops"] / out["fp32_gflops"], 2)
    return out


def best_of(*peaks: dict) -> dict:
    """One peak from several measurements of the same machine (before and after a benchmark): the best
    rate per dtype. A slow measurement is the host's noise, not the hardware's limit: on a shared 2-core
    host one bf16 measurement came out at 204 GFLOP/s and the next at 374 (411-434 when idle), which put
    the MFU of models whose GEMMs reached 250 GFLOP/s above 100 %."""
    best = dict(peaks[0])
    for key in ("bf16_gflops", "fp32_gflops"):
        best[key] = max(p[key] for p in peaks)
    best["bf16_over_fp32"] = round(best["bf16_gflops"] / best["fp32_gflops"], 2)
    return best


def peak_for(peak: dict, dtype: str) -> float:
    """GFLOP/s to divide by for a run in `dtype` ("fp32" or "bf16")."""
    return peak["bf16_gflops" if dtype == "bf16" else "fp32_gflops"]


def main(argv=None) -> int:
    from .common import host, set_threads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    result = {"name": "peak", **measure(args.quick), "host": host(threads)}
    print(json.dumps(result) if args.json else
          f"fp32 {result['fp32_gflops']} GFLOP/s, bf16 {result['bf16_gflops']} GFLOP/s ({threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
