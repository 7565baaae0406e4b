"""Turn an existing Stable Diffusion / LDM VAE (or a diffusers AutoencoderKL folder) into our autoencoder export.

    ldm export --from-ldm-vae FILE.{safetensors,ckpt,pt} OUT [--ldm-config MODEL.yaml] [--scaling-factor S]
    ldm export --from-diffusers-vae DIR OUT

The result is an ordinary autoencoder export (OUT/model.safetensors + OUT/config.json), so stage two can
train on it (`latents.autoencoder=OUT`) and `--format diffusers|onnx` re-exports it. The architecture comes
from the LDM yaml when given (`model.params` of a first-stage config, or the `first_stage_config` of a full
SD config), else it is read off the tensor shapes; weight files are read with safetensors or
`torch.load(weights_only=True)` (a pickled checkpoint holding more than tensors is refused: convert it to
safetensors first). Latent scaling: `--scaling-factor/--shift-factor`, else what the source says (the
diffusers config, the SD yaml's `scale_factor`, a `scale_factor` tensor in the checkpoint), else measured on
shards with `--stats-urls`, else left unset (stage two then needs latents.scaling_factor).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from launch.runtime.configio import to_plain
from launch.runtime.exportdir import (CONFIG_FILE, DTYPES, EXPORT_FORMAT, WEIGHTS_FILE, ExportError,
                                      clear_previous_export, write_safetensors)


def read_weights(path: str | Path) -> dict[str, Any]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: refuse, never fall back to full unpickling
        raise ExportError(f"{path} could not be read with torch.load(weights_only=True): it holds objects other "
                          f"than tensors. Nothing else is unpickled here; convert it to .safetensors first. "
                          f"Cause: {str(e).splitlines()[0]}") from None


def _ldm_yaml_params(path: str | Path) -> tuple[dict, Optional[float]]:
    """(first-stage params with ddconfig, scale_factor of a full SD config or None) of an LDM yaml."""
    import yaml

    tree = yaml.safe_load(Path(path).read_text())
    params = (tree.get("model") or {}).get("params") or {}
    scale = params.get("scale_factor")
    if "first_stage_config" in params:
        params = params["first_stage_config"].get("params") or {}
    if "ddconfig" not in params:
        raise ExportError(f"{path}: no model.params.ddconfig (nor model.params.first_stage_config.params.ddconfig)")
    return params, (float(scale) if scale is not None else None)


def _tensor_scalar(sd: Mapping[str, Any], key: str) -> Optional[float]:
    v = sd.get(key)
    if torch.is_tensor(v) and v.numel() == 1:
        return float(v)
    return None


def measure_latent_stats(model, urls: Sequence[str], image_size: int, batches: int = 32, batch_size: int = 16
                         ) -> dict:
    from autoencoder.training import latent_statistics
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_eval_loader

    cfg = DataConfig(urls=list(urls), image_size=image_size, num_workers=0)
    loader = build_eval_loader(cfg, list(urls), rank=0, world_size=1, batch_size=batch_size)
    return latent_statistics(model, iter(loader), num_batches=batches).as_dict()


def write_autoencoder_export(out: str | Path, ae_cfg, state: Mapping[str, torch.Tensor], *,
                             scaling_factor: Optional[float], shift_factor: Optional[float], source: dict,
                             dtype: str = "fp32", fmt: str = "safetensors", latent_stats: Optional[dict] = None,
                             onnx_check: bool = True) -> Path:
    """Our autoencoder export from a config and a state dict in our layout (checked by a strict load)."""
    from autoencoder.model import build_autoencoder

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model = build_autoencoder(ae_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    out = Path(out)
    plain = to_plain(ae_cfg)
    digest = hashlib.sha256(json.dumps({"autoencoder": plain, "source": source}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    config = {"format": EXPORT_FORMAT, "kind": "autoencoder", "step": 0, "config_hash": digest,
              "weights": "imported", "tag": None, "autoencoder": plain, "scaling_factor": scaling_factor,
              "shift_factor": shift_factor, "latent_stats": latent_stats or {}, "source": source, "dtype": dtype}
    if fmt == "diffusers":
        from .export_diffusers import diffusers_problems

        problems = diffusers_problems("autoencoder", None, plain)
        if problems:
            raise ExportError("cannot write the diffusers layout: " + "; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_export(out)
    write_safetensors(model.state_dict(), out / WEIGHTS_FILE, dtype,
                      {"format": EXPORT_FORMAT, "step": 0, "config_hash": digest, "weights": "imported",
                       "dtype": dtype, "kind": "autoencoder", "source": source.get("kind", "")})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if fmt == "diffusers":
        from .export_diffusers import write_diffusers

        config["diffusers"] = write_diffusers(out, config, model.state_dict(), dtype)
    elif fmt == "onnx":
        from .export_onnx import export_onnx

        config["onnx"] = export_onnx(out, check=onnx_check)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


def _finish(out, cfg, state, source, scaling_factor, shift_factor, stats_urls, stats_batches, **kw) -> Path:
    stats = None
    if scaling_factor is None and stats_urls:
        from autoencoder.model import build_autoencoder

        model = build_autoencoder(cfg)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        stats = measure_latent_stats(model, stats_urls, cfg.resolution, stats_batches)
        scaling_factor, shift_factor = stats["scaling_factor"], stats["shift_factor"]
    if scaling_factor is None:
        warnings.warn("no latent scaling_factor for the imported VAE (give --scaling-factor, or --stats-urls to "
                      "measure it): stage two will need latents.scaling_factor", stacklevel=3)
    return write_autoencoder_export(out, cfg, state, scaling_factor=scaling_factor, shift_factor=shift_factor,
                                    source=source, latent_stats=stats, **kw)


def import_ldm_vae(src: str | Path, out: str | Path, *, ldm_config: Optional[str | Path] = None,
                   resolution: int = 256, scaling_factor: Optional[float] = None,
                   shift_factor: Optional[float] = None, stats_urls: Sequence[str] = (), stats_batches: int = 32,
                   **kw) -> Path:
    """An LDM first-stage checkpoint, an SD VAE file (e.g. vae-ft-mse-840000-ema-pruned) or a full SD
    checkpoint (its `first_stage_model.*`) -> our autoencoder export."""
    from autoencoder.convert import config_from_ldm_state_dict, config_from_ldm_yaml, from_ldm

    sd = read_weights(src)
    if not isinstance(sd, Mapping):
        raise ExportError(f"{src} does not hold a state dict")
    inner = sd["state_dict"] if isinstance(sd.get("state_dict"), Mapping) else sd
    yaml_scale = None
    if ldm_config is not None:
        params, yaml_scale = _ldm_yaml_params(ldm_config)
        cfg = config_from_ldm_yaml(params)
    else:
        cfg = config_from_ldm_state_dict(inner, resolution=resolution)
    state = from_ldm(inner, cfg)
    if scaling_factor is None:
        scaling_factor = yaml_scale if yaml_scale is not None else _tensor_scalar(inner, "scale_factor")
    source = {"kind": "ldm", "path": str(Path(src).resolve()),
              "ldm_config": str(Path(ldm_config).resolve()) if ldm_config else None}
    return _finish(out, cfg, state, source, scaling_factor, shift_factor, stats_urls, stats_batches, **kw)


def _diffusers_vae_files(src: Path) -> tuple[Path, Path]:
    folder = src / "vae" if (src / "vae" / "config.json").is_file() else src
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: expected a diffusers AutoencoderKL folder (or a pipeline "
                                f"folder with vae/)")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        if (folder / name).is_file():
            return cfg, folder / name
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors (or .bin) in {folder}")


def import_diffusers_vae(src: str | Path, out: str | Path, *, scaling_factor: Optional[float] = None,
                         shift_factor: Optional[float] = None, stats_urls: Sequence[str] = (),
                         stats_batches: int = 32, **kw) -> Path:
    """A diffusers AutoencoderKL folder (or a pipeline folder with vae/) -> our autoencoder export."""
    from autoencoder.convert import config_from_diffusers, from_diffusers

    cfg_file, weights = _diffusers_vae_files(Path(src))
    dcfg = json.loads(cfg_file.read_text())
    if dcfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ExportError(f"{cfg_file}: _class_name {dcfg.get('_class_name')!r} is not AutoencoderKL")
    cfg = config_from_diffusers(dcfg)
    state = from_diffusers(read_weights(weights), cfg)
    if scaling_factor is None and dcfg.get("scaling_factor") is not None:
        scaling_factor = float(dcfg["scaling_factor"])
        if shift_factor is None and dcfg.get("shift_factor") is not None:
            shift_factor = float(dcfg["shift_factor"])
    source = {"kind": "diffusers", "path": str(Path(src).resolve())}
    return _finish(out, cfg, state, source, scaling_factor, shift_factor, stats_urls, stats_batches, **kw)
