"""ZeRO's model states per rank and the bytes each rank sends per step, from the parameter list alone.

Symbols: P trainable parameters of the denoiser, N data-parallel ranks (= GPUs), w bytes per weight
on the GPU (4 for fp32 and for bf16, which is torch autocast over fp32 weights; 2 for fp16, where
DeepSpeed keeps half weights), g = w bytes per gradient, r = (N - 1) / N.

Model states per GPU (DeepSpeed 0.19 with a client torch AdamW, as launch/runtime/engine.py builds it; the
ZeRO optimizers keep an fp32 master partition even when the weights are fp32 already):

    stage  params             grads (after backward)     optimizer                 buffers
    0      w P                g P                         8 P (+ 4 P master if fp16)  -
    1, 2   w P                g P_part                    (8 + 4) P/N               -
    3      w (P/N + P_pers)   g P/N                       (8 + 4) P/N               g * reduce_bucket_size

  P_part is the parameters whose flat range touches this rank's partition (P/N plus the straddling
  parameters, computed exactly from the parameter list); P_pers the ZeRO-3 parameters with at most
  `stage3_param_persistence_threshold` elements, which every rank keeps whole. ZeRO-1 keeps
  full-size gradients (g P) while it accumulates and until the boundary's reduction; fp16 adds the
  fp32 copy of the gradient partition during the step (4 P/N), as DeepSpeed's own estimator counts.
  EMA (fp32, launch/runtime/ema.py): 4 P, or 4 P/N under ZeRO-3.
  Transients: ZeRO-3 gathers parameters for compute and, with DeepSpeed's default
  stage3_max_reuse_distance R = 1e9, keeps those reused within R elements gathered from forward to
  backward: w * min(P - P_pers, R/2 + largest layer). bf16 autocast caches a bf16 copy of every
  weight during the forward pass, which backward keeps: 2 P. The optimizer step allocates about one
  fp32 tensor of the optimizer's (partition) size (torch AdamW's foreach denominator).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .hardware import DS_DEFAULT_REUSE_DISTANCE


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ParamInfo:
    """What the ZeRO model needs to know about the trainable parameters."""
    trainable: int
    group_numels: tuple[tuple[int, ...], ...]   # per optimizer param group, in order
    persistent: int = 0                         # ZeRO-3 params with numel <= persistence threshold
    largest_layer: int = 0                      # largest module's own parameters (DeepSpeed's estimator)
    count: int = 0                              # number of parameter tensors

    @staticmethod
    def from_numels(numels: list[int], persistence_threshold: int = 100_000) -> "ParamInfo":
        return ParamInfo(sum(numels), (tuple(numels),), sum(n for n in numels if n <= persistence_threshold),
                         max(numels, default=0), len(numels))


def param_info(module, groups: Optional[list[dict]] = None, persistence_threshold: int = 100_000) -> ParamInfo:
    """ParamInfo of a module (meta or real); `groups` as the stage hands them to the optimizer."""
    params = [p for p in module.parameters() if p.requires_grad]
    if groups is None:
        groups = [{"params": params}]
    group_numels = tuple(tuple(p.numel() for p in g["params"]) for g in groups)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return ParamInfo(sum(p.numel() for p in params), group_numels,
                     sum(p.numel() for p in params if p.numel() <= persistence_threshold), largest, len(params))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def zero12_partition(group_numels, world: int) -> tuple[int, int]:
    """(elements of this rank's flat partition, elements of the gradients it keeps), max over ranks.

    DeepSpeed 1/2 flattens each param group, pads it to a multiple of 2 N (NCCL alignment) and cuts
    N equal partitions; a rank keeps the full gradient of every parameter that starts in its
    partition or straddles its start (copy_grads_in_partition)."""
    part_total = 0
    per_rank = [0] * (world + 1)                   # difference array over ranks
    for numels in group_numels:
        size = sum(numels)
        padded = size + (-size) % (2 * world)
        ps = padded // world
        part_total += ps
        start = 0
        for n in numels:
            if n:
                first, last = start // ps, min(world - 1, (start + n - 1) // ps)
                per_rank[first] += n                 # the rank it starts in and every rank whose start it covers
                per_rank[last + 1] -= n
            start += n
    grads_max, running = 0, 0
    for r in range(world):
        running += per_rank[r]
        grads_max = max(grads_max, running)
    return part_total, grads_max


@dataclass
class ModelStates:
    """Bytes per GPU (max over ranks) of one ZeRO stage; see the module docstring."""
    params: int
    grads: int
    optimizer: int
    ema: int
    buffers: int
    # transients
    full_grads: int = 0             # ZeRO-1: full-size gradients held until the boundary's reduction
    gathered: int = 0               # ZeRO-3 parameters gathered from forward to backward
    autocast_copies: int = 0        # bf16 copies of the weights kept for backward
    optimizer_step: int = 0         # temporaries of the optimizer step

    @property
    def at_rest(self) -> int:
        """After backward, before the optimizer step: what tests/plan/ measures on a live engine."""
        return self.params + self.grads + self.optimizer + self.ema + self.buffers

    def without_grads(self) -> int:
        return self.params + self.optimizer + self.ema + self.buffers

    @property
    def grads_accumulating(self) -> int:
        """Gradient bytes held between micro-steps (ZeRO-1 keeps them full-size; measured on CPU)."""
        return self.full_grads or self.grads

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["at_rest"] = self.at_rest
        return d


def zero_model_states(pi: ParamInfo, zero_stage: int, world: int, precision: str = "fp32", ema: bool = True,
                      reduce_bucket_size: int = 50_000_000, reuse_distance: int = DS_DEFAULT_REUSE_DISTANCE
                      ) -> ModelStates:
    """Model-state bytes per GPU for ZeRO `zero_stage` at `world` ranks (formulas: module docstring)."""
    P = pi.trainable
    w = 2 if precision == "fp16" else 4
    g = w
    autocast = 2 * P if precision == "bf16" else 0
    if zero_stage == 0:
        master = 4 * P if precision == "fp16" else 0
        return ModelStates(params=w * P, grads=g * P, optimizer=8 * P + master, ema=4 * P if ema else 0, buffers=0,
                           autocast_copies=autocast, optimizer_step=4 * P)
    if zero_stage in (1, 2):
        part, grad_elems = zero12_partition(pi.group_numels, world)
        fp32_grad_part = 4 * part if precision == "fp16" else 0
        return ModelStates(params=w * P, grads=g * grad_elems + fp32_grad_part, optimizer=12 * part,
                           ema=4 * P if ema else 0, buffers=0,
                           full_grads=g * P if zero_stage == 1 else 0,
                           autocast_copies=autocast, optimizer_step=4 * part)
    if zero_stage == 3:
        numels = [n for group in pi.group_numels for n in group]
        part = sum(_ceil_div(n, world) for n in numels)
        persistent = pi.persistent if world > 1 else 0     # at one rank the partition is the parameter
        non_persistent = P - pi.persistent
        gathered = 0
        if world > 1:
            gathered = w * min(non_persistent, reuse_distance // 2 + pi.largest_layer)
        fp32_grad_part = 4 * part if precision == "fp16" else 0
        return ModelStates(params=w * (part + persistent), grads=g * part + fp32_grad_part, optimizer=12 * part,
                           ema=4 * part if ema else 0, buffers=g * reduce_bucket_size,
                           gathered=gathered, autocast_copies=autocast, optimizer_step=4 * part)
    raise ValueError(f"zero_stage {zero_stage}: expected 0-3")


def deepspeed_estimate(pi: ParamInfo, zero_stage: int, world: int) -> int:
    """DeepSpeed's own GPU estimate for ZeRO-2/3 without offload (16-bit params + fp32 master and
    moments): 2 P + 18 P/N (stage 2), 4 L + 18 P/N (stage 3, L = largest layer)."""
    if zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(pi.trainable, num_gpus_per_node=world, num_nodes=1,
                                                     cpu_offload=False)[1]
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(pi.trainable, pi.largest_layer, num_gpus_per_node=world,
                                                     num_nodes=1, cpu_offload=False, cpu_offload_params=False)[1]
    raise ValueError("DeepSpeed estimates exist for ZeRO-2 and ZeRO-3")


# ----------------------------------------------------------------------------- communication

def comm_bytes(pi: ParamInfo, zero_stage: int, world: int, grad_accum: int, precision: str = "fp32",
               reuse_distance: int = DS_DEFAULT_REUSE_DISTANCE,
               comm_dtype: Optional[str] = None) -> dict[str, float]:
    """Bytes each GPU moves per optimizer step, split into gradient reduction (overlappable with
    backward when overlap_comm), parameter gathers that ZeRO-3 prefetches behind compute, and serial
    traffic (the ZeRO-1/2 all-gather after the step). Gradients travel in `comm_dtype`
    (deepspeed.communication_data_type) when set, else in the weights' dtype."""
    if world <= 1:
        return {"reduce": 0.0, "gather_prefetched": 0.0, "serial": 0.0}
    P = pi.trainable
    w = 2 if precision == "fp16" else 4
    g = {"fp32": 4, "bf16": 2, "fp16": 2}.get(comm_dtype or "", w)
    r = (world - 1) / world
    if zero_stage == 0:
        return {"reduce": 2 * r * g * P, "gather_prefetched": 0.0, "serial": 0.0}
    if zero_stage == 1:
        return {"reduce": r * g * P, "gather_prefetched": 0.0, "serial": r * w * P}
    if zero_stage == 2:
        return {"reduce": grad_accum * r * g * P, "gather_prefetched": 0.0, "serial": r * w * P}
    non_persistent = P - pi.persistent
    regather = max(0, non_persistent - reuse_distance // 2)
    return {"reduce": grad_accum * r * g * P,
            "gather_prefetched": grad_accum * r * w * (non_persistent + regather), "serial": 0.0}
