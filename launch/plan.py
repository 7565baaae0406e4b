"""`ldm plan`: does a stage-two config fit on N GPUs, at which micro-batch, and how fast does it run?

Everything here is a pure function of numbers (`describe` is the one place that builds models, on
the meta device, and reads configs). The per-sample FLOPs and activation bytes come from
launch/plan_arch.py; tests/plan/ checks the pieces against a live DeepSpeed engine, the CPU
allocator and torch.utils.flop_counter. docs/scaling.md has the formulas with a worked example.

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

Frozen models (fp32, never partitioned): the open_clip text tower (resident: ldm.training builds it
even for precomputed data, to encode the empty prompt) and, when latents are encoded online
(data.kind: raw), the whole autoencoder, whose no-grad encoder pass needs about
`ENCODER_WORKING_SET` feature maps of the largest size per sample.

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
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .plan_arch import ForwardCount, TextTower, autoencoder_forward, autoencoder_params, dit_forward, unet_forward

GIB = 1024 ** 3

# ----------------------------------------------------------------------------- assumptions (stated)

DEFAULT_GPU_NAME = "A100-80GB"
DEFAULT_GPU_MEM_GIB = 80.0
DEFAULT_GPU_TFLOPS = 312.0              # A100 dense bf16/fp16 tensor-core peak
DEFAULT_MFU = {"unet": 0.25, "dit": 0.40}
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_INTRA_NODE_GBS = 150.0          # GB/s per GPU, NCCL ring bus bandwidth over NVLink (A100 SXM)
DEFAULT_INTER_NODE_GBS = 20.0           # GB/s per GPU across nodes (one 200 Gb/s HDR NIC per GPU, ~80 %)
CONTEXT_GIB = 1.5                       # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 0.08                    # share of GPU memory lost to the caching allocator's fragmentation
ENCODER_WORKING_SET = 5                 # largest fp32 feature maps alive per sample in a no-grad encoder pass (measured: tests/plan)
DS_DEFAULT_REUSE_DISTANCE = 1_000_000_000


@dataclass(frozen=True)
class Hardware:
    gpu_name: str = DEFAULT_GPU_NAME
    gpu_mem_gib: float = DEFAULT_GPU_MEM_GIB
    gpu_tflops: float = DEFAULT_GPU_TFLOPS
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    intra_node_gbs: float = DEFAULT_INTRA_NODE_GBS
    inter_node_gbs: float = DEFAULT_INTER_NODE_GBS


@dataclass(frozen=True)
class Assumptions:
    mfu: Optional[float] = None             # None: DEFAULT_MFU of the architecture
    context_gib: float = CONTEXT_GIB
    fragmentation: float = FRAGMENTATION
    encoder_working_set: float = ENCODER_WORKING_SET


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


def step_time(compute_s: float, comm: dict[str, float], bandwidth_gbs: float, overlap_comm: bool,
              backward_share: float) -> dict[str, float]:
    """Seconds per optimizer step: compute plus the communication not hidden behind it."""
    bw = bandwidth_gbs * 1e9
    t_reduce, t_gather, t_serial = comm["reduce"] / bw, comm["gather_prefetched"] / bw, comm["serial"] / bw
    exposed = max(0.0, t_reduce - (backward_share * compute_s if overlap_comm else 0.0))
    exposed += max(0.0, t_gather - compute_s) + t_serial
    return {"compute_s": compute_s, "comm_s": t_reduce + t_gather + t_serial, "exposed_comm_s": exposed,
            "step_s": compute_s + exposed}


# ----------------------------------------------------------------------------- the model of a config

@dataclass
class Frozen:
    text_params: int
    text_flops: int                  # per caption
    text_online: bool
    ae_params: int
    ae_encoder_flops: int            # per image
    ae_largest_map: int              # bytes of the encoder's largest feature map, per sample
    image_bytes: int                 # the raw image batch, per sample
    ae_online: bool
    ae_assumed: Optional[str] = None


@dataclass
class Description:
    """A config reduced to numbers: everything `plan` needs, nothing it has to build."""
    kind: str                        # unet | dit
    params: ParamInfo
    latent: tuple[int, int, int]
    image_size: int
    precision: str
    checkpointing: bool
    forward: dict[bool, ForwardCount]   # checkpointing off / on -> per-sample counts
    frozen: Frozen
    zero_stage: int
    ema: bool
    ds_zero: dict
    micro_batch: int
    grad_accum: int
    max_steps: int
    notes: list[str] = field(default_factory=list)
    comm_dtype: Optional[str] = None     # deepspeed.communication_data_type


def describe(cfg, policy: str = "cuda") -> Description:
    """Config -> Description: builds the denoiser on the meta device for its parameter list and walks
    the architectures analytically (launch/plan_arch.py)."""
    from ldm.objectives import build_objective
    from ldm.training import DiffusionStage

    from launch.runtime import stages
    from launch.runtime.configio import ConfigError
    from launch.runtime.engine import deepspeed_config

    if cfg.stage != "diffusion":
        raise ConfigError("ldm plan models stage-two (diffusion) configs; this one is stage: "
                          f"{cfg.stage!r}")
    notes: list[str] = []
    den = stages.build_models_on_meta(cfg)["denoiser"]
    # the DeepSpeed config as launch/runtime/engine.py writes it, read at stage 3 so that every ZeRO key is present
    ds = deepspeed_config(dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=3)))
    zero = dict(ds.get("zero_optimization", {}))
    zero["overlap_comm"] = bool(deepspeed_config(cfg).get("zero_optimization", {}).get("overlap_comm", False))
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    stage = DiffusionStage(den, build_objective(cfg.objective), conditioning=cfg.conditioning, latents=cfg.latents,
                           sampling=cfg.sampling)
    pi = param_info(den, stage.param_groups("denoiser"), threshold)
    d = cfg.denoiser
    arch = d.unet if d.kind == "unet" else d.dit
    ckpt = bool(cfg.train.activation_checkpointing or arch.activation_checkpointing)
    from .plan_arch import text_tower

    try:
        tower = text_tower(cfg.text_encoder)
    except Exception as e:  # noqa: BLE001 - an unknown arch should not stop a memory plan
        tower = TextTower(width=768, layers=12, heads=12)
        notes.append(f"text encoder {cfg.text_encoder.arch!r} not resolved ({e}); assumed a ViT-L/14 text tower")
    ctx_len = tower.context_length
    if d.kind == "unet":
        latent = (d.unet.in_channels, d.unet.sample_size, d.unet.sample_size)
    else:
        latent = (d.dit.in_channels, d.dit.input_size, d.dit.input_size)
    precision = cfg.train.precision
    fwd = {}
    for ac in (False, True):
        if d.kind == "unet":
            fwd[ac] = unet_forward(d.unet, latent[1:], ctx_len, precision, ac, d.pooled_dim, policy)
        else:
            fwd[ac] = dit_forward(d.dit, latent[1:], ctx_len, precision, ac, d.pooled_dim,
                                  cfg.conditioning.null_embedding == "learned" and d.learned_null_tokens > 0, policy)
    online = cfg.data.kind == "raw"
    ae_cfg, assumed = _autoencoder_config(cfg, latent)
    if online and assumed:
        notes.append(assumed)
    image = cfg.data.image_size
    if online:
        enc = autoencoder_forward(ae_cfg, (image, image), encoder=True, decoder=False)
        ae_flops, ae_map = enc.flops, enc.largest_tensor_bytes
    else:
        ae_flops = ae_map = 0
    frozen = Frozen(text_params=tower.params, text_flops=tower.forward_flops(), text_online=online,
                    ae_params=autoencoder_params(ae_cfg) if online else 0, ae_encoder_flops=ae_flops,
                    ae_largest_map=ae_map, image_bytes=3 * image * image * 4 if online else 0, ae_online=online,
                    ae_assumed=assumed if online else None)
    return Description(kind=d.kind, params=pi, latent=latent, image_size=image, precision=precision,
                       checkpointing=ckpt, forward=fwd, frozen=frozen, zero_stage=cfg.deepspeed.zero_stage,
                       ema=cfg.ema.enabled, ds_zero=zero, micro_batch=cfg.train.micro_batch_size,
                       grad_accum=cfg.train.grad_accum_steps, max_steps=cfg.train.max_steps, notes=notes,
                       comm_dtype=cfg.deepspeed.communication_data_type)


def _autoencoder_config(cfg, latent):
    """The first stage's architecture: from the export's config.json when it is there, else LDM kl-f8."""
    from autoencoder.config import AutoencoderConfig

    from launch.runtime.configio import build_dataclass

    path = cfg.latents.autoencoder
    if path and (Path(path) / "config.json").is_file():
        data = json.loads((Path(path) / "config.json").read_text())
        if "autoencoder" in data:
            return build_dataclass(AutoencoderConfig, data["autoencoder"], "autoencoder"), None
    f = max(1, cfg.data.image_size // max(1, latent[1]))
    levels = max(1, int(round(math.log2(f)))) + 1
    mult = (1, 2, 4, 4, 4, 4)[:levels]
    ae = AutoencoderConfig(resolution=cfg.data.image_size, ch_mult=tuple(mult), z_channels=latent[0],
                           embed_dim=latent[0])
    return ae, (f"latents.autoencoder has no export to read: assumed an LDM kl-f{f} first stage "
                f"({autoencoder_params(ae):,d} parameters) for online encoding")


# ----------------------------------------------------------------------------- the plan

def memory_for(desc: Description, zero_stage: int, world: int, micro: int, grad_accum: int, checkpointing: bool,
               hw: Hardware, a: Assumptions) -> dict:
    """Peak bytes per GPU for one stage and micro-batch, with its parts."""
    z = desc.ds_zero
    states = zero_model_states(desc.params, zero_stage, world, desc.precision, desc.ema,
                               int(z.get("reduce_bucket_size", 50_000_000)),
                               int(z.get("stage3_max_reuse_distance", DS_DEFAULT_REUSE_DISTANCE)))
    fz = desc.frozen
    frozen = 4 * (fz.text_params + fz.ae_params)
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
                   "frozen_bytes": 4 * (desc.frozen.text_params + desc.frozen.ae_params),
                   "activations_per_sample": {"no_ckpt": desc.forward[False].peak_bytes,
                                              "ckpt": desc.forward[True].peak_bytes},
                   "encoder_working_set_per_sample": int(a.encoder_working_set * desc.frozen.ae_largest_map),
                   "chosen": mem_chosen},
        "batch": {"global_batch": split["global_batch"], "micro_batch": split["micro_batch"],
                  "grad_accum": split["grad_accum"], "fits": split["fits"],
                  "config": {"micro_batch": desc.micro_batch, "grad_accum": desc.grad_accum}},
        "throughput": result,
        "max_steps": desc.max_steps,
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
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
