"""The resolved configuration of a run: one typed tree, loaded from YAML plus `key=value` overrides.

Sections that configure models or data are defined beside that code; this file owns the
runtime sections (train, runtime, optimizer, deepspeed, ema, logging, validation) and the root.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig
from data_pipeline.config import DataConfig
from ldm.config import (ConditioningConfig, DenoiserConfig, LatentConfig, LoRAConfig, ObjectiveConfig,
                        SamplingConfig, TextConfig, TextEncoderConfig)

from .configio import ConfigError, apply_overrides, build_dataclass, read_yaml_tree

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    max_steps: int = field(default=1000, metadata={"ge": 1})
    seed: int = field(default=0, metadata={"ge": 0})
    micro_batch_size: int = field(default=8, metadata={"ge": 1})     # per rank, per micro-step
    grad_accum_steps: int = field(default=1, metadata={"ge": 1})
    log_every: int = field(default=10, metadata={"ge": 1})
    checkpoint_every: int = field(default=1000, metadata={"ge": 1})
    keep_checkpoints: int = field(default=3, metadata={"ge": 1})
    precision: Precision = "fp32"
    grad_clip: float = field(default=1.0, metadata={"ge": 0})        # 0 disables clipping
    activation_checkpointing: bool = False
    compile: bool = False
    max_consecutive_nonfinite: int = field(default=20, metadata={"ge": 1})
    nonfinite_check: bool = True   # all-reduce a finiteness flag of the loss every micro-step


@dataclass
class RuntimeConfig:
    # Fault handling (docs/ARCHITECTURE.md §4, README "Exit statuses"). A collective that has waited this long for
    # a peer fails (the process-group timeout, gloo and NCCL), and a rank whose training step has not advanced for
    # this long exits (launch/runtime/watchdog.py): either way with EXIT_PEER_LOST = 6. It must exceed the longest
    # time one rank can legitimately run ahead of another: a save's or validation's imbalance, a data stall.
    collective_timeout_s: float = field(default=600.0, metadata={"ge": 10, "le": 86400})
    # torchrun restarts of the whole job from the last complete checkpoint after a rank died (launch/local.sh,
    # launch/slurm.sh read it; the environment variable LDM_MAX_RESTARTS overrides it). 0: no restart.
    max_restarts: int = field(default=3, metadata={"ge": 0, "le": 1000})


@dataclass
class OptimizerConfig:
    lr: float = field(default=1e-4, metadata={"gt": 0})
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    warmup_steps: int = field(default=0, metadata={"ge": 0})
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = field(default=0.0, metadata={"ge": 0, "le": 1})

    def validate(self) -> None:
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError(f"betas = {list(self.betas)}: each must be in [0, 1)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = field(default=0, metadata={"ge": 0, "le": 3})
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = field(default=50_000_000, metadata={"ge": 1})
    allgather_bucket_size: int = field(default=50_000_000, metadata={"ge": 1})
    stage3_prefetch_bucket_size: int = field(default=50_000_000, metadata={"ge": 0})
    stage3_param_persistence_threshold: int = field(default=100_000, metadata={"ge": 0})
    # ZeRO-3 re-releases a gathered parameter unless it is used again within this many elements;
    # DeepSpeed's default (1e9) keeps models under ~0.5 B parameters gathered from forward to backward.
    stage3_max_reuse_distance: int = field(default=1_000_000_000, metadata={"ge": 0})
    stage3_max_live_parameters: int = field(default=1_000_000_000, metadata={"ge": 0})
    # dtype of gradient reduction; null: DeepSpeed's default (the parameters' dtype, fp32 here).
    # "bf16" halves the traffic of a bf16-autocast run (see docs/scaling.md).
    communication_data_type: Optional[Literal["fp32", "bf16", "fp16"]] = None
    # Anything else DeepSpeed accepts, merged last into the generated DeepSpeed config.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PosthocEMAConfig:
    # EDM2 post-hoc EMA (launch/runtime/posthoc.py): power-function EMAs of these relative stds kept beside
    # the main one (each 4 bytes/param/world size under ZeRO-3), their snapshots written every
    # `snapshot_every` optimizer steps (0: train.checkpoint_every) and at the end to RUN_DIR/phema/;
    # `ldm ema RUN_DIR --sigma-rel ...` reconstructs an EMA of any length from them. Empty list: off.
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    snapshot_every: int = field(default=0, metadata={"ge": 0})

    def validate(self) -> None:
        for s in self.sigma_rels:
            if not 0 < s < 0.28:
                raise ValueError(f"sigma_rels = {list(self.sigma_rels)}: each must lie in (0, 0.28)")


@dataclass
class EMAConfig:
    enabled: bool = True
    # "power": EDM2's power-function EMA, parameterised by its relative std (sigma_rel);
    # "constant": fixed decay, warmed up as min(decay, (1 + n) / (10 + n)) when warmup is on.
    kind: Literal["power", "constant"] = "power"
    sigma_rel: float = field(default=0.05, metadata={"gt": 0, "lt": 0.28})
    decay: float = field(default=0.9999, metadata={"ge": 0, "le": 1})
    warmup: bool = True
    start_step: int = field(default=0, metadata={"ge": 0})
    posthoc: PosthocEMAConfig = field(default_factory=PosthocEMAConfig)


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "ldm"
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    progress: bool = True
    # MFU per logging window (launch/runtime/throughput.py): FLOPs of one real micro-step over the measured
    # matmul peak of this device, or over peak_tflops (a data-sheet figure, per device) when given
    mfu: bool = True
    peak_tflops: Optional[float] = field(default=None, metadata={"gt": 0})


@dataclass
class ValidationConfig:
    # fixed-t validation loss (launch/runtime/validation.py) every this many steps; null: every
    # train.checkpoint_every steps whenever held-out data is configured (data.val_urls); 0: off
    every: Optional[int] = field(default=None, metadata={"ge": 0})
    batches: int = field(default=2, metadata={"ge": 1})
    sample_every: int = field(default=0, metadata={"ge": 0})   # 0: no sample / reconstruction grids
    num_images: int = field(default=8, metadata={"ge": 1})
    # Stage two: fixed prompts for the sample grids (else the captions of the first held-out batch).
    prompts: list[str] = field(default_factory=list)


@dataclass
class InitConfig:
    # Start from existing weights (launch/runtime/init.py): an export, a run directory (or one of its
    # checkpoints/step_* tags), a diffusers folder (pipeline, unet/, transformer/, vae/), an LDM/SD single
    # file (.safetensors, .ckpt). Weights only: never the optimizer or data position; a run directory
    # that already holds a checkpoint resumes from it instead.
    from_: Optional[str] = field(default=None, metadata={"key": "from"})
    strict: bool = True          # missing / unexpected / mis-shaped keys stop the run; false: reported, fresh init
    what: Literal["weights", "weights+ema"] = "weights"


@dataclass
class Config:
    stage: Literal["autoencoder", "diffusion"]
    run_dir: str
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # stage one
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    # stage two
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)     # several encoders; empty: text_encoder alone
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)           # rank 0: off (ldm/lora.py)

    def validate(self) -> None:
        if self.train.precision == "fp16" and self.stage == "autoencoder" and self.loss.disc_weight > 0:
            pass  # allowed; DeepSpeed's loss scaler handles both engines
        if not self.run_dir:
            raise ValueError("run_dir must not be empty")
        if self.text.encoders and self.text_encoder != TextEncoderConfig():
            raise ValueError("text_encoder and text.encoders are both set: give one encoder as text_encoder or a "
                             "list as text.encoders (put this one in the list)")


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """YAML file (+ `inherit:` chain) + dotted overrides -> validated Config, before any compute."""
    tree = read_yaml_tree(path) if path is not None else dict(base or {})
    tree = apply_overrides(tree, list(overrides or []))
    return build_dataclass(Config, tree)


__all__ = ["Config", "ConfigError", "load_config", "TrainConfig", "RuntimeConfig", "OptimizerConfig", "DeepSpeedConfig",
           "EMAConfig", "PosthocEMAConfig", "InitConfig", "LoggingConfig", "ValidationConfig"]
