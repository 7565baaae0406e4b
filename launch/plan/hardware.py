"""The GPU `ldm plan` plans for and the allowances it states rather than measures: defaults for an
A100-80GB node, the model FLOP utilisation per architecture, CUDA context and fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GIB = 1024 ** 3

# ----------------------------------------------------------------------------- assumptions (stated)

DEFAULT_GPU_NAME = "A100-80GB"
DEFAULT_GPU_MEM_GIB = 80.0
DEFAULT_GPU_TFLOPS = 312.0              # A100 dense bf16/fp16 tensor-core peak
DEFAULT_MFU = {"unet": 0.25, "dit": 0.40, "mmdit": 0.40}   # MMDiT: assumed as the DiT (dense transformer)
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
