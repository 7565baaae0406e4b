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
  Gradient reduction (B = reduce_bucket_size elements, c bytes per element of communication_data_type;
  DeepSpeed 0.19's stage_1_and_2.py and engine.py): ZeRO-1/2 stage gradients in reduce (ipg) buckets,
  g B each (two with overlap_comm, none without contiguous_gradients), allocated at full size by the
  first gradient hook of a backward and freed by the reduction epilogue (_release_ipg_buffers): after
  every backward under ZeRO-2, only at the boundary under ZeRO-1, which keeps them between
  micro-steps. Each collective sends a flat (with c != g also cast) copy of at most one bucket (ZeRO-0:
  the gradients, in all-reduce chunks of 5e8 elements; ZeRO-3's bucket is its `buffers` above).
  When backward returns DeepSpeed has dropped all of these, but the communication backend can still
  hold the tensor of the last collective for a moment, and a view holds its whole bucket (on CPU
  gloo releases it from a worker thread that needs the GIL; tests/plan once measured one bucket,
  2,000,000 B, still alive). So what is alive then lies between at rest and at rest
  + `in_flight` (one bucket, or chunk, at max(g, c) bytes): a bounded transient, not a fixed number.
  `ldm plan`'s peak (planner.py) does not add these transients yet.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .hardware import DS_DEFAULT_REUSE_DISTANCE

ZERO0_ALLREDUCE_CHUNK = 500_000_000   # DeepSpeed engine's MEMORY_OPT_ALLREDUCE_SIZE (elements per flat all-reduce)
COMM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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
    reduce_buckets: int = 0         # ZeRO-1/2 gradient staging buckets, from a backward's first gradient hook on
    reduce_copy: int = 0            # flat (and cast) copy of one collective's gradients while it runs
    in_flight: int = 0              # what the last collective may still hold when backward returns

    @property
    def at_rest(self) -> int:
        """After backward, before the optimizer step, once the collectives have let go of their tensors."""
        return self.params + self.grads + self.optimizer + self.ema + self.buffers

    @property
    def after_backward(self) -> tuple[int, int]:
        """(least, most) bytes alive when the boundary's backward returns: at rest, plus the tensor of the
        last collective while the communication backend still holds it (see the module docstring)."""
        return self.at_rest, self.at_rest + self.in_flight

    def without_grads(self) -> int:
        return self.params + self.optimizer + self.ema + self.buffers

    @property
    def grads_accumulating(self) -> int:
        """Gradient bytes held between micro-steps (ZeRO-1 keeps them full-size; measured on CPU)."""
        return self.full_grads or self.grads

    @property
    def buffers_accumulating(self) -> int:
        """Buffers held between micro-steps: ZeRO-1, which reduces (and so runs the epilogue that frees its
        reduce buckets) only at the boundary, keeps its buckets; ZeRO-2 frees them after every backward."""
        return self.buffers + (self.reduce_buckets if self.full_grads else 0)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["at_rest"] = self.at_rest
        return d


def _reduction(pi: ParamInfo, zero_stage: int, g: int, bucket: int, overlap_comm: bool, contiguous_gradients: bool,
               comm_dtype: Optional[str]) -> dict[str, int]:
    """The gradient-reduction transients of the module docstring: reduce_buckets, reduce_copy, in_flight."""
    c = COMM_BYTES.get(comm_dtype or "", g)
    largest = max((n for group in pi.group_numels for n in group), default=0)
    # elements one collective sends: ZeRO-0 closes an all-reduce chunk once it exceeds 5e8 elements
    chunk = min(pi.trainable, ZERO0_ALLREDUCE_CHUNK + largest if zero_stage == 0 else bucket)
    n_buckets = (2 if overlap_comm else 1) if zero_stage in (1, 2) and contiguous_gradients else 0
    return {"reduce_buckets": n_buckets * g * bucket,
            "reduce_copy": g * chunk + (c * chunk if c != g else 0),
            "in_flight": max(g * bucket if n_buckets else 0, max(g, c) * chunk)}


def zero_model_states(pi: ParamInfo, zero_stage: int, world: int, precision: str = "fp32", ema: bool = True,
                      reduce_bucket_size: int = 50_000_000, reuse_distance: int = DS_DEFAULT_REUSE_DISTANCE,
                      overlap_comm: bool = False, contiguous_gradients: bool = True,
                      comm_dtype: Optional[str] = None) -> ModelStates:
    """Model-state bytes per GPU for ZeRO `zero_stage` at `world` ranks (formulas: module docstring)."""
    P = pi.trainable
    w = 2 if precision == "fp16" else 4
    g = w
    autocast = 2 * P if precision == "bf16" else 0
    reduction = _reduction(pi, zero_stage, g, reduce_bucket_size, overlap_comm, contiguous_gradients, comm_dtype)
    if zero_stage == 0:
        master = 4 * P if precision == "fp16" else 0
        return ModelStates(params=w * P, grads=g * P, optimizer=8 * P + master, ema=4 * P if ema else 0, buffers=0,
                           autocast_copies=autocast, optimizer_step=4 * P, **reduction)
    if zero_stage in (1, 2):
        part, grad_elems = zero12_partition(pi.group_numels, world)
        fp32_grad_part = 4 * part if precision == "fp16" else 0
        return ModelStates(params=w * P, grads=g * grad_elems + fp32_grad_part, optimizer=12 * part,
                           ema=4 * P if ema else 0, buffers=0,
                           full_grads=g * P if zero_stage == 1 else 0,
                           autocast_copies=autocast, optimizer_step=4 * part, **reduction)
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
                           gathered=gathered, autocast_copies=autocast, optimizer_step=4 * part, **reduction)
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
    g = COMM_BYTES.get(comm_dtype or "", w)
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
