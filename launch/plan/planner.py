"""`ldm plan`: does a stage-two config fit on N GPUs, at which micro-batch, and how fast does it run?

Everything here is a pure function of numbers (`describe`, in launch/plan/description.py, is the one place
that builds models, on the meta device, and reads configs). The per-sample FLOPs and activation bytes come from
launch/plan/denoisers.py and frozen.py; tests/plan/ checks the pieces against a live DeepSpeed engine, the CPU
allocator and torch.utils.flop_counter. docs/scaling.md has the formulas with a worked example.

Rooms of the planner: launch/plan/hardware.py (the GPU and stated allowances), zero.py (model states and
communication per ZeRO stage), tape.py + denoisers.py + frozen.py (FLOPs and activations per sample),
description.py (a config as numbers), this file (peak memory, batch split, step time, the report),
measure.py (what the tests measure the model against).

Peak per GPU = max(start of backward, optimizer step):
    start of backward = states without gradients (with them when grad_accum > 1) + frozen
                        + ZeRO-3 gathered + autocast copies + b * activations(b = micro-batch)
    optimizer step    = states with gradients (+ ZeRO-1's full ones) + frozen + optimizer temporaries
Fits when peak <= GPU memory * (1 - FRAGMENTATION) - CONTEXT_GIB (CUDA context, cuBLAS/NCCL
workspaces, allocator fragmentation: a stated allowance, not a measurement).

Time per optimizer step on one GPU:
    compute  = micro * accum * FLOPs_per_sample / (MFU * peak FLOP/s)
               FLOPs_per_sample = 3 F (forward + backward = 2 x forward) + F if checkpointing
                                  + frozen forward passes (text tower, encoder) when online
    comm     = bytes each GPU sends through its slowest link / bandwidth (ring collectives, factor r):
               stage 0: all-reduce of gradients          2 r g P               once per step
               stage 1: reduce-scatter + all-gather       r (g + w) P           once per step
               stage 2: reduce-scatter every micro-step  accum r g P + r w P
               stage 3: per micro-step all-gather forward r w P_np, re-gather in backward of what
                        was released r w max(0, P_np - R/2), reduce-scatter r g P
    bandwidth: intra-node (one node) or inter-node per GPU (more than one node)
    overlap: gradient reduction hides behind backward only with deepspeed.overlap_comm (the
             default config has it off: serial); ZeRO-3 prefetches its all-gathers behind
             compute; the ZeRO-1/2 parameter all-gather after the step is serial.
    step     = compute + exposed comm;  img/s = global batch / step;  days = max_steps * step / 86400

Disk (launch/plan/storage.py): the post-hoc EMA snapshots of a run, bytes per snapshot (profiles x fp32
trainable parameters) x snapshots per run (max_steps / ema.posthoc.snapshot_every, 0: train.checkpoint_every).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .description import Description
from .hardware import DEFAULT_MFU, DS_DEFAULT_REUSE_DISTANCE, GIB, Assumptions, Hardware
from .storage import format_line as posthoc_line
from .storage import posthoc_storage
from .zero import comm_bytes, zero_model_states


# ----------------------------------------------------------------------------- time

def step_time(compute_s: float, comm: dict[str, float], bandwidth_gbs: float, overlap_comm: bool,
              backward_share: float) -> dict[str, float]:
    """Seconds per optimizer step: compute plus the communication not hidden behind it."""
    bw = bandwidth_gbs * 1e9
    t_reduce, t_gather, t_serial = comm["reduce"] / bw, comm["gather_prefetched"] / bw, comm["serial"] / bw
    exposed = max(0.0, t_reduce - (backward_share * compute_s if overlap_comm else 0.0))
    exposed += max(0.0, t_gather - compute_s) + t_serial
    return {"compute_s": compute_s, "comm_s": t_reduce + t_gather + t_serial, "exposed_comm_s": exposed,
            "step_s": compute_s + exposed}


# ----------------------------------------------------------------------------- the plan

def frozen_bytes(fz) -> int:
    """Resident bytes of the frozen models: every text encoder in its dtype, the autoencoder in fp32."""
    text = fz.text_bytes if fz.text_bytes is not None else 4 * fz.text_params
    return text + 4 * fz.ae_params


def memory_for(desc: Description, zero_stage: int, world: int, micro: int, grad_accum: int, checkpointing: bool,
               hw: Hardware, a: Assumptions) -> dict:
    """Peak bytes per GPU for one stage and micro-batch, with its parts."""
    z = desc.ds_zero
    states = zero_model_states(desc.params, zero_stage, world, desc.precision, desc.ema,
                               int(z.get("reduce_bucket_size", 50_000_000)),
                               int(z.get("stage3_max_reuse_distance", DS_DEFAULT_REUSE_DISTANCE)),
                               bool(z.get("overlap_comm", False)), bool(z.get("contiguous_gradients", True)),
                               desc.comm_dtype)
    fz = desc.frozen
    frozen = frozen_bytes(fz)
    act_sample = desc.forward[checkpointing].peak_bytes
    encoder_ws = int(a.encoder_working_set * fz.ae_largest_map)
    activations = micro * max(act_sample, encoder_ws) + micro * fz.image_bytes
    grads_now = states.grads_accumulating if grad_accum > 1 else 0
    start_bwd = (states.without_grads() + grads_now + frozen + states.gathered + states.autocast_copies
                 + activations)
    # at the step: ZeRO-1's full gradients are still there while the boundary reduction fills the partition
    opt_step = states.at_rest + states.full_grads + frozen + states.optimizer_step
    return {"states": states.as_dict(), "frozen": frozen, "activations": activations,
            "activations_per_sample": act_sample, "start_of_backward": start_bwd, "optimizer_step": opt_step,
            "peak": max(start_bwd, opt_step)}


def usable_bytes(hw: Hardware, a: Assumptions) -> int:
    return int(hw.gpu_mem_gib * GIB * (1 - a.fragmentation) - a.context_gib * GIB)


def max_micro_batch(desc: Description, zero_stage: int, world: int, grad_accum: int, checkpointing: bool,
                    hw: Hardware, a: Assumptions) -> int:
    """Largest micro-batch whose peak fits in the usable memory (0: not even one sample)."""
    base = memory_for(desc, zero_stage, world, 0, grad_accum, checkpointing, hw, a)
    one = memory_for(desc, zero_stage, world, 1, grad_accum, checkpointing, hw, a)
    room = usable_bytes(hw, a)
    per = one["start_of_backward"] - base["start_of_backward"]
    if base["optimizer_step"] > room or base["start_of_backward"] + per > room:
        return 0
    return int((room - base["start_of_backward"]) // per)


def batch_split(global_batch: int, world: int, max_micro: int) -> dict:
    """micro x accum x world = global batch, with the fewest accumulation steps whose micro-batch fits."""
    per_gpu = global_batch / world
    if per_gpu != int(per_gpu) or per_gpu < 1:
        per_gpu_i = max(1, math.ceil(per_gpu))
        note = f"global batch {global_batch} is not a multiple of {world} GPUs: using {per_gpu_i * world}"
    else:
        per_gpu_i, note = int(per_gpu), None
    if max_micro < 1:
        return {"micro_batch": 0, "grad_accum": 0, "global_batch": global_batch, "fits": False, "note": note}
    accum = math.ceil(per_gpu_i / max_micro)
    while per_gpu_i % accum:
        accum += 1
    return {"micro_batch": per_gpu_i // accum, "grad_accum": accum, "global_batch": per_gpu_i * world,
            "fits": True, "note": note}


def flops_per_sample(desc: Description, checkpointing: bool) -> dict[str, int]:
    f = desc.forward[False].flops
    train = 3 * f + (f if checkpointing else 0)
    fz = desc.frozen
    frozen = (fz.text_flops if fz.text_online else 0) + (fz.ae_encoder_flops if fz.ae_online else 0)
    return {"forward": f, "train": train, "frozen": frozen, "total": train + frozen}


def plan(desc: Description, gpus: int, hw: Hardware = Hardware(), a: Assumptions = Assumptions(),
         global_batch: Optional[int] = None, nodes: Optional[int] = None, overlap_comm: Optional[bool] = None
         ) -> dict:
    """The full report for `gpus` GPUs (JSON-able dict)."""
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    per_node = hw.gpus_per_node if nodes is None else max(1, math.ceil(gpus / nodes))
    nodes = math.ceil(gpus / per_node)
    hw = dataclasses.replace(hw, gpus_per_node=per_node)
    mfu = a.mfu if a.mfu is not None else DEFAULT_MFU[desc.kind]
    global_batch = global_batch or desc.micro_batch * desc.grad_accum * gpus
    ckpt = desc.checkpointing
    room = usable_bytes(hw, a)

    stages = {}
    for z in range(4):
        row = {}
        for ac in (False, True):
            mm = max_micro_batch(desc, z, gpus, desc.grad_accum, ac, hw, a)
            row["ckpt" if ac else "no_ckpt"] = mm
        at_cfg = memory_for(desc, z, gpus, desc.micro_batch, desc.grad_accum, ckpt, hw, a)
        states = at_cfg["states"]
        stages[str(z)] = {"params": states["params"], "grads": states["grads"], "optimizer": states["optimizer"],
                          "ema": states["ema"], "buffers": states["buffers"], "model_states": states["at_rest"],
                          "gathered": states["gathered"], "autocast_copies": states["autocast_copies"],
                          "peak_at_config_micro_batch": at_cfg["peak"],
                          "fits_config_micro_batch": at_cfg["peak"] <= room,
                          "max_micro_batch": row}
    z = desc.zero_stage
    max_micro = stages[str(z)]["max_micro_batch"]["ckpt" if ckpt else "no_ckpt"]
    split = batch_split(global_batch, gpus, max_micro)
    if split["fits"] and split["grad_accum"] > 1 and desc.grad_accum == 1:
        # accumulating keeps gradients across micro-steps: re-check the micro-batch with them held
        max_micro = max_micro_batch(desc, z, gpus, split["grad_accum"], ckpt, hw, a)
        split = batch_split(global_batch, gpus, max_micro)
    notes = list(desc.notes)
    if split["note"]:
        notes.append(split["note"])
    if not split["fits"]:
        alt = [s for s in range(4) if stages[str(s)]["max_micro_batch"]["ckpt" if ckpt else "no_ckpt"] > 0]
        hint = f"; ZeRO stage(s) {alt} would" if alt else ""
        if not ckpt and stages[str(z)]["max_micro_batch"]["ckpt"] > 0:
            hint += "; activation checkpointing would"
        notes.append(f"does not fit at ZeRO-{z} with one sample per GPU{hint}")
    flops = flops_per_sample(desc, ckpt)
    result = {"flops_per_sample": flops, "mfu": mfu}
    if split["fits"]:
        micro, accum = split["micro_batch"], split["grad_accum"]
        compute = micro * accum * flops["total"] / (mfu * hw.gpu_tflops * 1e12)
        zcfg = desc.ds_zero
        comm = comm_bytes(desc.params, z, gpus, accum, desc.precision,
                          int(zcfg.get("stage3_max_reuse_distance", DS_DEFAULT_REUSE_DISTANCE)),
                          desc.comm_dtype)
        bw = hw.intra_node_gbs if nodes == 1 else hw.inter_node_gbs
        ov = bool(zcfg.get("overlap_comm", False)) if overlap_comm is None else overlap_comm
        share = (3 / 4) if ckpt else (2 / 3)
        t = step_time(compute, comm, bw, ov, share)
        img_s = split["global_batch"] / t["step_s"]
        result.update({"comm_bytes": comm, "bandwidth_gbs": bw, "overlap_comm": ov, **t,
                       "img_per_s": img_s, "img_per_s_per_gpu": img_s / gpus,
                       "days_to_max_steps": desc.max_steps * t["step_s"] / 86400,
                       "gpu_hours": desc.max_steps * t["step_s"] * gpus / 3600})
    mem_chosen = memory_for(desc, z, gpus, max(split["micro_batch"], 1), max(split["grad_accum"], 1), ckpt, hw, a)
    return {
        "model": {"kind": desc.kind, "params": desc.params.trainable, "latent": list(desc.latent),
                  "image_size": desc.image_size, "precision": desc.precision,
                  "activation_checkpointing": ckpt, "zero_stage": z, "ema": desc.ema,
                  "text_encoder_params": desc.frozen.text_params, "autoencoder_params": desc.frozen.ae_params,
                  "latents": "online" if desc.frozen.ae_online else "precomputed"},
        "hardware": dataclasses.asdict(hw) | {"gpus": gpus, "nodes": nodes},
        "assumptions": {"mfu": mfu, "context_gib": a.context_gib, "fragmentation": a.fragmentation,
                        "usable_bytes_per_gpu": room, "encoder_working_set": a.encoder_working_set,
                        "flops": "2 per multiply-add of matmuls/convs/attention; train = 3 x forward "
                                 "(+1 forward with activation checkpointing)"},
        "memory": {"zero_stages": stages,
                   "frozen_bytes": frozen_bytes(desc.frozen),
                   "text_encoders": desc.frozen.text_encoders,
                   "activations_per_sample": {"no_ckpt": desc.forward[False].peak_bytes,
                                              "ckpt": desc.forward[True].peak_bytes},
                   "encoder_working_set_per_sample": int(a.encoder_working_set * desc.frozen.ae_largest_map),
                   "chosen": mem_chosen},
        "batch": {"global_batch": split["global_batch"], "micro_batch": split["micro_batch"],
                  "grad_accum": split["grad_accum"], "fits": split["fits"],
                  "config": {"micro_batch": desc.micro_batch, "grad_accum": desc.grad_accum}},
        "throughput": result,
        "max_steps": desc.max_steps,
        "posthoc_ema": posthoc_storage(desc.params, desc.posthoc_sigma_rels, desc.posthoc_every,
                                       desc.checkpoint_every or desc.max_steps, desc.max_steps, z, gpus),
        "notes": notes,
    }


# ----------------------------------------------------------------------------- text

def _gib(b: float) -> str:
    return f"{b / GIB:7.2f}"


def format_table(report: dict, title: str = "") -> str:
    m, hw, mem, th, b = report["model"], report["hardware"], report["memory"], report["throughput"], report["batch"]
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{m['kind']} {m['params']:,d} trainable parameters, latent {'x'.join(map(str, m['latent']))} "
                 f"({m['image_size']} px), {m['precision']}, activation checkpointing "
                 f"{'on' if m['activation_checkpointing'] else 'off'}, EMA {'on' if m['ema'] else 'off'}, "
                 f"latents {m['latents']}")
    lines.append(f"{hw['gpus']} x {hw['gpu_name']} ({hw['gpu_mem_gib']:g} GiB, {hw['gpu_tflops']:g} TFLOP/s) on "
                 f"{hw['nodes']} node(s); usable per GPU {report['assumptions']['usable_bytes_per_gpu'] / GIB:.1f} GiB "
                 f"(minus {report['assumptions']['context_gib']:g} GiB context and "
                 f"{report['assumptions']['fragmentation']:.0%} fragmentation)")
    lines.append("")
    lines.append("per GPU, GiB     params    grads    optim      EMA  buffers   states  gathered  bf16copy"
                 "   max micro (no ckpt / ckpt)")
    for z, row in mem["zero_stages"].items():
        mark = "*" if int(z) == m["zero_stage"] else " "
        lines.append(f"ZeRO-{z}{mark}         {_gib(row['params'])}  {_gib(row['grads'])}  {_gib(row['optimizer'])}  "
                     f"{_gib(row['ema'])}  {_gib(row['buffers'])}  {_gib(row['model_states'])}  "
                     f"{_gib(row['gathered'])}   {_gib(row['autocast_copies'])}"
                     f"   {row['max_micro_batch']['no_ckpt']:>6d} / {row['max_micro_batch']['ckpt']:<6d}")
    lines.append(f"frozen models (text encoder{' + autoencoder' if m['latents'] == 'online' else ''}): "
                 f"{mem['frozen_bytes'] / GIB:.2f} GiB;  activations per sample: "
                 f"{mem['activations_per_sample']['no_ckpt'] / 2 ** 20:.1f} MiB without, "
                 f"{mem['activations_per_sample']['ckpt'] / 2 ** 20:.1f} MiB with checkpointing"
                 + (f"; encoder pass {mem['encoder_working_set_per_sample'] / 2 ** 20:.1f} MiB"
                    if m["latents"] == "online" else ""))
    lines.append("")
    if b["fits"]:
        lines.append(f"ZeRO-{m['zero_stage']}: global batch {b['global_batch']} = micro {b['micro_batch']} x accum "
                     f"{b['grad_accum']} x {hw['gpus']} GPUs; peak {mem['chosen']['peak'] / GIB:.1f} GiB per GPU")
        f = th["flops_per_sample"]
        lines.append(f"FLOPs per sample: forward {f['forward'] / 1e9:.1f} G, train {f['train'] / 1e9:.1f} G, "
                     f"frozen {f['frozen'] / 1e9:.1f} G;  MFU {th['mfu']:.0%}")
        lines.append(f"step {th['step_s'] * 1e3:.0f} ms = compute {th['compute_s'] * 1e3:.0f} ms + exposed comm "
                     f"{th['exposed_comm_s'] * 1e3:.0f} ms (comm {th['comm_s'] * 1e3:.0f} ms at "
                     f"{th['bandwidth_gbs']:g} GB/s, overlap {'on' if th['overlap_comm'] else 'off'})")
        lines.append(f"throughput {th['img_per_s']:,.0f} img/s ({th['img_per_s_per_gpu']:.1f} per GPU); "
                     f"{report['max_steps']:,d} steps in {th['days_to_max_steps']:.2f} days "
                     f"({th['gpu_hours']:,.0f} GPU-hours)")
    else:
        lines.append(f"ZeRO-{m['zero_stage']}: does NOT fit one sample per GPU")
    if "posthoc_ema" in report:
        lines.append(posthoc_line(report["posthoc_ema"]))
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
