"""ZeRO memory per rank: parameter, gradient and optimizer-state bytes for stages 0-3 at 2 ranks.

A real 2-rank job (`torchrun --nproc_per_node=2`, gloo, DS_ACCELERATOR=cpu) builds the engines through
`launch/runtime/engine.py` and measures what each rank holds after one training step (`bench/zero_worker.py`).
Beside it, DeepSpeed's own estimator for the same model and 2 devices
(`estimate_zero2_model_states_mem_needs_all_live` / `estimate_zero3_model_states_mem_needs_all_live`, their
printed tables kept verbatim, and their per-device numbers without offload). Read the estimator with its
assumptions: it models fp16 mixed precision (2-byte parameters and gradients plus fp32 master, gradient
and Adam copies: 2 + 18/N bytes per parameter), while our runtime keeps fp32 weights and runs bf16 as
autocast, so its 16-bit terms are 32-bit here. Target: ZeRO-2 optimizer bytes per rank <= 0.55 x ZeRO-0.

    python -m bench.zero_memory [--quick] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .common import host, markdown_table, save

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.55
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unet_kw(quick: bool) -> dict:
    from .models import UNET_KW

    if quick:
        return dict(UNET_KW, model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_heads=4,
                    context_dim=32, sample_size=8, num_res_blocks=1)
    return dict(UNET_KW)


def deepspeed_estimates(unet_kw: dict) -> dict:
    """DeepSpeed's estimator on our model: per-device bytes (no offload) and its printed tables."""
    import torch
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_live,
                                               model_to_params as z3_params)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_live)

    from ldm.config import UNetConfig
    from ldm.unet import UNet

    model = UNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in unet_kw.items()}))
    total, largest = z3_params(model)
    out = {"total_params": total, "largest_layer_params": largest}
    for name, fn in (("zero2_table", estimate_zero2_model_states_mem_needs_all_live),
                     ("zero3_table", estimate_zero3_model_states_mem_needs_all_live)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            fn(model, num_gpus_per_node=WORLD, num_nodes=1)
        out[name] = buf.getvalue().strip().splitlines()
    out["zero2_per_device_bytes"] = estimate_zero2_model_states_mem_needs(total, WORLD, 1, cpu_offload=False)[1]
    out["zero3_per_device_bytes"] = estimate_zero3_model_states_mem_needs(total, largest, WORLD, 1,
                                                                          cpu_offload=False)[1]
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def run(quick: bool = False, save_results: bool = True, timeout: float = 600) -> dict:
    unet = _unet_kw(quick)
    spec = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()},
            "batch": 2, "stages": [0, 1, 2, 3]}
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(REPO / ".cache" / "torch_extensions")))
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as out:
        cmd = [str(torchrun), f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "bench.zero_worker", "--out", out, "--config", json.dumps(spec)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ZeRO benchmark job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    stages = []
    for i, stage in enumerate(spec["stages"]):
        per_rank = [ranks[r][i] for r in range(WORLD)]
        keys = ("param_bytes", "master_bytes", "grad_bytes", "optimizer_bytes", "total_bytes")
        stages.append({"stage": stage, "params": per_rank[0]["params"],
                       **{k: max(p[k] for p in per_rank) for k in keys},    # the larger rank
                       "per_rank": per_rank})
    base_opt = stages[0]["optimizer_bytes"]
    for s in stages:
        s["optimizer_vs_zero0"] = round(s["optimizer_bytes"] / base_opt, 4)
        s["total_vs_zero0"] = round(s["total_bytes"] / stages[0]["total_bytes"], 4)
    est = deepspeed_estimates(spec["unet"])
    ratio2 = stages[2]["optimizer_vs_zero0"]
    result = {"name": "zero", "quick": quick, "world_size": WORLD, "model": "UNet", "unet": spec["unet"],
              "host": host(1), "stages": stages, "deepspeed_estimator": est,
              "zero2_optimizer_vs_zero0": ratio2, "target": TARGET, "meets_target": ratio2 <= TARGET}
    if save_results:
        save("zero" + ("_quick" if quick else ""), result, table(result))
    return result


def _mb(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 2 ** 20:.1f}"


def table(result: dict) -> str:
    est = result["deepspeed_estimator"]
    estimates = {2: est["zero2_per_device_bytes"], 3: est["zero3_per_device_bytes"]}
    rows = [(s["stage"], _mb(s["param_bytes"]), _mb(s["master_bytes"]), _mb(s["grad_bytes"]),
             _mb(s["optimizer_bytes"]), _mb(s["total_bytes"]), f"{s['optimizer_vs_zero0']:.2f}",
             _mb(estimates.get(s["stage"]))) for s in result["stages"]]
    return markdown_table(["ZeRO stage", "params MiB", "fp32 master MiB", "grads MiB", "optimizer MiB",
                           "total MiB", "optimizer / ZeRO-0", "DeepSpeed estimate MiB (fp16 model)"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.quick)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
