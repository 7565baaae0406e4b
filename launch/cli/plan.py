"""`ldm plan CONFIG [key=value ...] --gpus N`: will it fit, at which micro-batch, how fast (launch/plan/)."""
from __future__ import annotations

import argparse
import json

NAME = "plan"
HELP = "memory per GPU by ZeRO stage, largest micro-batch, grad accumulation and img/s for a config on N GPUs"
DESCRIPTION = """Model a stage-two config on N GPUs without running it: per-GPU memory by ZeRO stage
(parameters, gradients, optimizer states, EMA, frozen text encoder / autoencoder, activations per
sample with and without activation checkpointing), the largest micro-batch that fits, the gradient
accumulation for the global batch, img/s and days to train.max_steps from the model's FLOPs and
an assumed MFU, and the disk of the run's post-hoc EMA snapshots (RUN_DIR/phema/: bytes per snapshot,
snapshots per run, total). Formulas and assumptions: docs/scaling.md and launch/plan/."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from launch.plan import hardware as H
    from launch.plan import planner as P
    from launch.plan.description import describe

    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel ranks)")
    p.add_argument("--gpu-mem", type=float, default=H.DEFAULT_GPU_MEM_GIB, metavar="GiB",
                   help=f"memory per GPU (default {H.DEFAULT_GPU_MEM_GIB:g}, {H.DEFAULT_GPU_NAME})")
    p.add_argument("--gpu-tflops", type=float, default=H.DEFAULT_GPU_TFLOPS, metavar="T",
                   help=f"peak dense bf16/fp16 TFLOP/s per GPU (default {H.DEFAULT_GPU_TFLOPS:g})")
    p.add_argument("--gpu-name", default=None, help="label for the GPU in the output")
    p.add_argument("--nodes", type=int, default=None, metavar="K",
                   help=f"nodes the GPUs are spread over (default: {H.DEFAULT_GPUS_PER_NODE} GPUs per node)")
    p.add_argument("--mfu", type=float, default=None, metavar="M",
                   help="model FLOPs utilisation (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in H.DEFAULT_MFU.items()) + ")")
    p.add_argument("--global-batch", type=int, default=None, metavar="B",
                   help="global batch (default: the config's micro_batch_size x grad_accum_steps x GPUs)")
    p.add_argument("--intra-node-gbs", type=float, default=H.DEFAULT_INTRA_NODE_GBS, metavar="GB/s",
                   help=f"collective bandwidth per GPU inside a node (default {H.DEFAULT_INTRA_NODE_GBS:g})")
    p.add_argument("--inter-node-gbs", type=float, default=H.DEFAULT_INTER_NODE_GBS, metavar="GB/s",
                   help=f"collective bandwidth per GPU across nodes (default {H.DEFAULT_INTER_NODE_GBS:g})")
    p.add_argument("--overlap-comm", choices=("config", "on", "off"), default="config",
                   help="overlap gradient reduction with backward (default: deepspeed.overlap_comm)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from launch.plan import hardware as H
    from launch.plan import planner as P
    from launch.plan.description import describe
    from launch.runtime.config import load_config
    from launch.runtime.configio import ConfigError

    for name in ("gpus", "nodes", "global_batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {v}: must be >= 1")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu = {args.mfu}: must be in (0, 1]")
    cfg = load_config(args.config, args.overrides)
    desc = describe(cfg)
    hw = H.Hardware(gpu_name=args.gpu_name or (H.DEFAULT_GPU_NAME if args.gpu_mem == H.DEFAULT_GPU_MEM_GIB
                                                and args.gpu_tflops == H.DEFAULT_GPU_TFLOPS else "GPU"),
                    gpu_mem_gib=args.gpu_mem, gpu_tflops=args.gpu_tflops,
                    intra_node_gbs=args.intra_node_gbs, inter_node_gbs=args.inter_node_gbs)
    overlap = None if args.overlap_comm == "config" else args.overlap_comm == "on"
    report = P.plan(desc, args.gpus, hw, H.Assumptions(mfu=args.mfu), global_batch=args.global_batch,
                    nodes=args.nodes, overlap_comm=overlap)
    report = {"config": args.config, "overrides": list(args.overrides), **report}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(P.format_table(report, f"{args.config} {' '.join(args.overrides)}".strip()))
    return 0
