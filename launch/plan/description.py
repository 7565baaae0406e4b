"""A stage-two config reduced to the numbers `ldm plan` needs (`describe`): the denoiser's parameter list
(built on the meta device), its per-sample forward counts (launch/plan/denoisers.py) and the frozen
models beside it.

Frozen models (never partitioned): every text encoder of the config (`text.encoders`, or the single
`text_encoder`; resident: ldm.training builds them even for precomputed data, to encode the empty prompt;
open_clip towers fp32, T5 in its `dtype`) and, when latents are encoded online
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

from .denoisers import dit_forward, mmdit_forward, unet_forward
from .frozen import TextTower, autoencoder_forward, autoencoder_params, t5_tower, text_tower
from .tape import ForwardCount
from .zero import ParamInfo, param_info


# ----------------------------------------------------------------------------- the model of a config

@dataclass
class Frozen:
    text_params: int                 # every text encoder together
    text_flops: int                  # per caption
    text_online: bool
    ae_params: int
    ae_encoder_flops: int            # per image
    ae_largest_map: int              # bytes of the encoder's largest feature map, per sample
    image_bytes: int                 # the raw image batch, per sample
    ae_online: bool
    ae_assumed: Optional[str] = None
    text_bytes: Optional[int] = None     # resident bytes of the text encoders (null: 4 per parameter)
    text_encoders: list = field(default_factory=list)   # per encoder: kind, params, bytes


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
    # EDM2 post-hoc EMA snapshots (launch/plan/storage.py): ema.posthoc.sigma_rels (empty: off, as when EMA
    # is off), ema.posthoc.snapshot_every and train.checkpoint_every (its stand-in when 0)
    posthoc_sigma_rels: tuple = ()
    posthoc_every: int = 0
    checkpoint_every: int = 0


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
    if cfg.denoiser.kind not in ("unet", "dit", "mmdit"):
        raise ConfigError(f"ldm plan walks denoiser.kind unet, dit and mmdit; {cfg.denoiser.kind!r} has no forward "
                          "count in launch/plan/denoisers.py yet (ldm info counts its parameters)")
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
    arch = {"unet": d.unet, "dit": d.dit, "mmdit": d.mmdit}[d.kind]
    ckpt = bool(cfg.train.activation_checkpointing or arch.activation_checkpointing)

    towers, ctx_len = _text_towers(cfg, notes)
    if d.kind == "unet":
        latent = (d.unet.in_channels, d.unet.sample_size, d.unet.sample_size)
    else:
        latent = (arch.in_channels, arch.input_size, arch.input_size)
    precision = cfg.train.precision
    fwd = {}
    for ac in (False, True):
        if d.kind == "unet":
            fwd[ac] = unet_forward(d.unet, latent[1:], ctx_len, precision, ac, d.pooled_dim, policy)
        elif d.kind == "mmdit":
            fwd[ac] = mmdit_forward(d.mmdit, latent[1:], ctx_len, precision, ac, d.pooled_dim,
                                    cfg.conditioning.null_embedding == "learned" and d.learned_null_tokens > 0,
                                    policy)
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
    frozen = Frozen(text_params=sum(t["params"] for t in towers), text_flops=sum(t["flops"] for t in towers),
                    text_bytes=sum(t["bytes"] for t in towers), text_encoders=towers, text_online=online,
                    ae_params=autoencoder_params(ae_cfg) if online else 0, ae_encoder_flops=ae_flops,
                    ae_largest_map=ae_map, image_bytes=3 * image * image * 4 if online else 0, ae_online=online,
                    ae_assumed=assumed if online else None)
    return Description(kind=d.kind, params=pi, latent=latent, image_size=image, precision=precision,
                       checkpointing=ckpt, forward=fwd, frozen=frozen, zero_stage=cfg.deepspeed.zero_stage,
                       ema=cfg.ema.enabled, ds_zero=zero, micro_batch=cfg.train.micro_batch_size,
                       grad_accum=cfg.train.grad_accum_steps, max_steps=cfg.train.max_steps, notes=notes,
                       comm_dtype=cfg.deepspeed.communication_data_type,
                       posthoc_sigma_rels=tuple(cfg.ema.posthoc.sigma_rels) if cfg.ema.enabled else (),
                       posthoc_every=cfg.ema.posthoc.snapshot_every, checkpoint_every=cfg.train.checkpoint_every)


def _text_towers(cfg, notes: list[str]) -> tuple[list[dict], int]:
    """Every text encoder as {kind, name, params, bytes, flops}, and the joined token count the denoiser
    sees (ldm/text_encoders.py: the longest open_clip length plus every T5's)."""
    from ldm.text_encoders import text_encoder_entries

    towers, clip_len, t5_len = [], 0, 0
    for entry in text_encoder_entries(cfg):
        if entry.kind == "t5":
            try:
                tower = t5_tower(entry)
            except FileNotFoundError as e:
                tower = t5_tower(dataclasses.replace(entry, path="t5-v1_1-xxl"))
                notes.append(f"T5 text encoder not found ({e}); assumed T5 v1.1 XXL")
            t5_len += tower.context_length
            towers.append({"kind": "t5", "name": entry.path, "params": tower.params,
                           "bytes": tower.params * tower.bytes_per_param, "flops": tower.forward_flops()})
            continue
        try:
            tower = text_tower(entry)
        except Exception as e:  # noqa: BLE001 - an unknown arch should not stop a memory plan
            tower = TextTower(width=768, layers=12, heads=12)
            notes.append(f"text encoder {entry.arch!r} not resolved ({e}); assumed a ViT-L/14 text tower")
        clip_len = max(clip_len, tower.context_length)
        towers.append({"kind": "open_clip", "name": entry.arch, "params": tower.params, "bytes": 4 * tower.params,
                       "flops": tower.forward_flops()})
    return towers, clip_len + t5_len


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
