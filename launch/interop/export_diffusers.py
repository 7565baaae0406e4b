"""`ldm export --format diffusers`: the denoiser and the KL autoencoder in diffusers' folder layout.

    OUT/vae/config.json + diffusion_pytorch_model.safetensors            AutoencoderKL (scaling_factor,
                                                                          shift_factor, latent statistics)
    OUT/unet/...          UNet2DConditionModel          (denoiser.kind unet)
    OUT/transformer/...   PixArtTransformer2DModel      (denoiser.kind dit, PixArt form only)
    OUT/transformer/...   SD3Transformer2DModel         (denoiser.kind mmdit, ldm/convert_mmdit.py)

`UNet2DConditionModel.from_pretrained(OUT, subfolder="unet")` and `AutoencoderKL.from_pretrained(OUT,
subfolder="vae")` load them with no conversion. Writing needs no diffusers install: the configs are the
keyword arguments of those classes (`ldm.convert`, `autoencoder.convert`) plus `_class_name`.

What does not carry over (diffusers has no slot for it): a learned null caption (`null_context`; diffusers
pipelines use the empty prompt as the negative), pooled-text conditioning, QK-norm, adaLN-Zero, learned
positions, class labels, attention inside the autoencoder's up/down levels. Such models are refused with
the reason before anything is written. The timestep a diffusers model is called with is our *network* time
(`objective.net_time`): the discrete index for eps / v, 1000 t for flow matching.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _diffusers_version() -> str:
    try:
        import diffusers
        return diffusers.__version__
    except Exception:  # writing needs no diffusers install
        return "0.30.0"


def diffusers_problems(kind: str, denoiser: Optional[Mapping[str, Any]],
                       autoencoder: Optional[Mapping[str, Any]]) -> list[str]:
    """Reasons the diffusers layout cannot express this export (empty list: it can)."""
    from autoencoder.config import AutoencoderConfig
    from autoencoder.convert import diffusers_config
    from ldm.config import DenoiserConfig
    from ldm.convert import pixart_incompatibilities

    from launch.runtime.configio import build_dataclass

    problems = []
    if autoencoder is None:
        if kind == "autoencoder":
            problems.append("no autoencoder config")
        else:
            problems.append("the run has no autoencoder (latents.autoencoder is null): no vae/ to write")
    else:
        try:
            diffusers_config(build_dataclass(AutoencoderConfig, dict(autoencoder), "autoencoder"))
        except ValueError as e:
            problems.append(f"autoencoder: {e}")
    if kind == "diffusion":
        cfg = build_dataclass(DenoiserConfig, dict(denoiser), "denoiser")
        if cfg.kind == "unet":
            if cfg.unet.qk_norm != "none":
                problems.append("UNet with qk_norm: diffusers' UNet2DConditionModel has no QK-norm")
            if cfg.pooled_dim:
                problems.append("UNet with pooled text conditioning (pooled_dim > 0): no such input in "
                                "UNet2DConditionModel here")
        elif cfg.kind == "mmdit":
            from ldm.convert_mmdit import sd3_incompatibilities
            reasons = sd3_incompatibilities(cfg.mmdit, cfg.pooled_dim)
            if reasons:
                problems.append("MMDiT does not match diffusers' SD3Transformer2DModel: " + "; ".join(reasons))
        else:
            reasons = pixart_incompatibilities(cfg.dit, cfg.pooled_dim)
            if reasons:
                problems.append("DiT does not match diffusers' PixArtTransformer2DModel: " + "; ".join(reasons))
    return problems


def _write_model(folder: Path, class_name: str, kwargs: dict, state: Mapping[str, torch.Tensor], dtype: str,
                 metadata: dict) -> Path:
    from launch.runtime.exportdir import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": _diffusers_version(), **kwargs}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_safetensors(dict(state), folder / WEIGHTS_NAME, dtype, {"format": "pt", **metadata})
    return folder


def write_vae(folder: Path, ae_cfg_plain: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
              scaling_factor: Optional[float], shift_factor: Optional[float], dtype: str = "fp32",
              metadata: Optional[dict] = None) -> Path:
    """Our KL autoencoder weights -> an AutoencoderKL folder."""
    from autoencoder.config import AutoencoderConfig
    from autoencoder.convert import diffusers_config, to_diffusers

    from launch.runtime.configio import build_dataclass

    cfg = build_dataclass(AutoencoderConfig, dict(ae_cfg_plain), "autoencoder")
    kwargs = diffusers_config(cfg, scaling_factor, shift_factor)
    return _write_model(folder, "AutoencoderKL", kwargs, to_diffusers(state, cfg), dtype, metadata or {})


def write_denoiser(out: Path, denoiser_plain: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                   dtype: str = "fp32", metadata: Optional[dict] = None) -> str:
    """Our denoiser -> OUT/unet/ (UNet2DConditionModel) or OUT/transformer/ (PixArtTransformer2DModel for
    a DiT, SD3Transformer2DModel for an MMDiT). Returns (subfolder name, class name)."""
    from ldm.config import DenoiserConfig
    from ldm.convert import to_diffusers

    from launch.runtime.configio import build_dataclass

    cfg = build_dataclass(DenoiserConfig, dict(denoiser_plain), "denoiser")
    class_name, kwargs, converted = to_diffusers(state, cfg)
    sub = "unet" if cfg.kind == "unet" else "transformer"
    _write_model(out / sub, class_name, kwargs, converted, dtype, metadata or {})
    return sub, class_name


def write_diffusers(out: Path, config: dict, state: Mapping[str, torch.Tensor], dtype: str) -> dict:
    """Write the diffusers folders for an export whose native files are already in OUT. Returns a
    summary for config.json: {subfolder: class name}."""
    from launch.runtime.exportdir import autoencoder_path, read_export

    meta = {"ldm_step": str(config.get("step")), "ldm_config_hash": str(config.get("config_hash")),
            "ldm_weights": str(config.get("weights"))}
    written = {}
    if config["kind"] == "autoencoder":
        write_vae(out / "vae", config["autoencoder"], state, scaling_factor=config.get("scaling_factor"),
                  shift_factor=config.get("shift_factor"), dtype=dtype, metadata=meta)
        return {"vae": "AutoencoderKL"}
    sub, class_name = write_denoiser(out, config["denoiser"], state, dtype=dtype, metadata=meta)
    written[sub] = class_name
    ae_dir = autoencoder_path(out, config)
    ae_config, ae_state = read_export(ae_dir)
    ae_meta = {"ldm_step": str(ae_config.get("step")), "ldm_config_hash": str(ae_config.get("config_hash"))}
    # the denoiser's latent scaling (the run may override the autoencoder's measured one)
    write_vae(out / "vae", ae_config["autoencoder"], {k: v.float() if v.is_floating_point() else v for k, v in ae_state.items()},
              scaling_factor=config.get("scaling_factor"), shift_factor=config.get("shift_factor"),
              dtype=dtype, metadata=ae_meta)
    written["vae"] = "AutoencoderKL"
    from .export_pipeline import write_pipeline

    written.update(write_pipeline(out, config, sub, dtype))   # scheduler/, text_encoder/, tokenizer/, model_index
    return written
