"""A stage-two config reduced to the numbers `ldm plan` needs (`describe`): the denoiser's parameter list
(built on the meta device), its per-sample forward counts (launch/plan/denoisers.py) and the frozen
models beside it.

Frozen models (fp32, never partitioned): the open_clip text tower (resident: ldm.training builds it
even for precomputed data, to encode the empty prompt) and, when latents are encoded online
(data.kind: raw), the whole autoencoder, whose no-grad encoder pass needs about
`ENCODER_WORKING_SET` feature maps of the largest size per sample.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .denoisers import dit_forward, unet_forward
from .frozen import TextTower, autoencoder_forward, autoencoder_params, text_tower
from .tape import ForwardCount
from .zero import ParamInfo, param_info


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
