"""From a run directory to an export directory that needs no DeepSpeed and holds no pickle.

    OUT/model.safetensors   the main module's weights (EMA by default), metadata: step, config hash
    OUT/config.json         what it takes to rebuild and use them (see `export_config`)
    OUT/autoencoder/        stage two: a copy of the autoencoder export (or config.json references it)
    OUT/text_encoder/       stage two: the open_clip text tower's weights (safetensors) when they cannot be
                            fetched by name (random init or a local file), and its model-config JSON
    OUT/vae/, OUT/unet/ or OUT/transformer/      with --format diffusers (launch/export_diffusers.py)
    OUT/onnx/               with --format onnx (launch/export_onnx.py)

Weights come from the newest complete checkpoint: the EMA files (re-assembled from their ZeRO-3
partitions when needed) or DeepSpeed's consolidation of the sharded fp32 weights for `--no-ema`.
Every file an export holds is JSON or safetensors: nothing in it is unpickled when it is used.
The reading side (`read_export`, `load_autoencoder`, `load_text_encoder`, `load_pipeline`) rebuilds the
modules from those files alone.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from launch.runtime.checkpoint import check_complete, step_of
from launch.runtime.config import Config
from launch.runtime.configio import build_dataclass, to_plain

EXPORT_FORMAT = "ldm-train/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("safetensors", "diffusers", "onnx")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_DIR = "text_encoder"
TEXT_WEIGHTS = f"{TEXT_DIR}/open_clip_text.safetensors"


class ExportError(ValueError):
    """An export that cannot be written as asked (format not expressible, missing input)."""


@dataclass
class RunCheckpoint:
    run_dir: Path
    tag: str
    tag_dir: Path
    meta: dict
    cfg: Config

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def open_run(run_dir: str | Path, tag: str | None = None) -> RunCheckpoint:
    """The newest complete checkpoint of a run (or the named one), with its resolved config."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no {root} (expected RUN_DIR/checkpoints/"
                                f"step_XXXXXXXX/ written by `ldm train`)")
    if tag is None:
        tags = sorted((p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal")),
                      key=step_of, reverse=True)
        problems = {t: check_complete(root / t) for t in tags}
        usable = [t for t in tags if problems[t] is None]
        if not usable:
            detail = "; ".join(f"{t}: {p}" for t, p in problems.items()) or "no step_* folders"
            raise FileNotFoundError(f"no complete checkpoint under {root} ({detail})")
        tag = usable[0]
        skipped = [t for t in tags if step_of(t) > step_of(tag)]
        for t in skipped:
            warnings.warn(f"skipping checkpoint {t}: {problems[t]}; exporting {tag}", stacklevel=2)
    elif (problem := check_complete(root / tag)) is not None:
        raise FileNotFoundError(f"checkpoint {root / tag} is not usable: {problem}")
    meta = json.loads((root / tag / "meta.json").read_text())
    cfg = build_dataclass(Config, meta["config"])
    return RunCheckpoint(run_dir, tag, root / tag, meta, cfg)


def live_weights(ck: RunCheckpoint) -> dict[str, torch.Tensor]:
    """Full fp32 weights and buffers of the main module, consolidated from DeepSpeed's shards."""
    name = ck.meta["main_module"]
    engine_dir = ck.tag_dir / name
    if int(ck.meta["zero_stage"]) == 0:
        path = engine_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found (DeepSpeed's ZeRO-0 model states of "
                                    f"engine '{name}')")
        # DeepSpeed's own file (pickle); never part of an export.
        state = torch.load(path, map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    world, stage = int(ck.meta["world_size"]), int(ck.meta["zero_stage"])
    # ZeRO-3 partitions the model states too; ZeRO-1/2 keep one model-states file (optimizer states per rank;
    # a bf16 engine may prefix those with "bf16_")
    expected = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3 else \
        ["mp_rank_00_model_states.pt"]
    optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    missing = [f for f in expected if not (engine_dir / f).is_file()]
    missing += [f for f in optim if not (engine_dir / f).is_file() and not (engine_dir / f"bf16_{f}").is_file()]
    if missing:
        raise FileNotFoundError(f"weights files missing in {engine_dir}: {', '.join(missing)} (DeepSpeed ZeRO-{stage} "
                                f"shards of {world} ranks)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.contiguous() for k, v in
            get_fp32_state_dict_from_zero_checkpoint(str(ck.tag_dir), tag=name).items()}


def _main_module_keys(ck: RunCheckpoint) -> set[str] | None:
    """State-dict keys of the main module, from a build on the meta device (None if that fails)."""
    try:
        from launch.runtime.stages import build_models_on_meta

        return set(build_models_on_meta(ck.cfg)[ck.meta["main_module"]].state_dict())
    except Exception:  # an unusual stage: fall back to reading the live weights
        return None


def ema_weights(ck: RunCheckpoint) -> dict[str, torch.Tensor]:
    """EMA parameters (full, fp32) plus what the EMA does not track (buffers, frozen parameters), which
    come from the live weights. When the EMA covers the whole state dict, the (for ZeRO 1-3 costly)
    consolidation of the live weights is skipped."""
    from launch.runtime.ema import EMA

    ema_dir = ck.tag_dir / "ema"
    if not ema_dir.is_dir() or not any(ema_dir.glob("rank_*.safetensors")):
        raise FileNotFoundError(f"EMA weights not found: no {ema_dir}/rank_*.safetensors (export the live weights "
                                f"with --no-ema)")
    ema, _ = EMA.read_full(ema_dir)
    keys = _main_module_keys(ck)
    if keys is not None and keys <= set(ema):
        return ema
    live = live_weights(ck)
    return {**{k: v for k, v in live.items() if k not in ema}, **ema}


def export_config(ck: RunCheckpoint, weights: str) -> dict[str, Any]:
    cfg = ck.cfg
    common = {"format": EXPORT_FORMAT, "kind": cfg.stage, "step": ck.step, "config_hash": ck.meta["config_hash"],
              "weights": weights, "tag": ck.tag}
    if cfg.stage == "autoencoder":
        stats = ck.meta.get("latent_stats") or _read_json(ck.tag_dir / "latent_stats.json") or {}
        return {**common, "autoencoder": to_plain(cfg.autoencoder),
                "scaling_factor": stats.get("scaling_factor"), "shift_factor": stats.get("shift_factor"),
                "latent_stats": stats}
    return {**common, "denoiser": to_plain(cfg.denoiser), "objective": to_plain(cfg.objective),
            "conditioning": to_plain(cfg.conditioning), "text_encoder": to_plain(cfg.text_encoder),
            "sampling": to_plain(cfg.sampling), "latents": to_plain(cfg.latents)}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_safetensors(state: dict[str, torch.Tensor], path: Path, dtype: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    target = DTYPES[dtype]
    # clone: safetensors refuses tensors that share storage (tied or viewed weights)
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})


# ----------------------------------------------------------------------------- text encoder

def _is_open_clip_tag(arch: str, pretrained: str | None) -> bool:
    if not pretrained:
        return False
    import open_clip

    return bool(open_clip.get_pretrained_cfg(arch, pretrained))


def write_text_encoder(te_cfg, out: Path, mode: str = "auto") -> tuple[dict, str | None]:
    """Make the text encoder of an export independent of the machine that trained it.

    mode "auto": write the text tower's weights (open_clip state dict, image tower dropped, safetensors)
    unless `pretrained` names an open_clip tag (those load by name from open_clip's cache); "copy": always;
    "reference": never. A model-config JSON the arch needs is copied too. Returns (text_encoder section
    for config.json, relative weights path or None)."""
    from ldm.text import build_text_encoder, resolve_model_config

    if mode not in ("auto", "copy", "reference"):
        raise ExportError(f"text encoder mode {mode!r}: expected auto, copy or reference")
    spec = to_plain(te_cfg)
    text_dir = out / TEXT_DIR
    if text_dir.exists():
        shutil.rmtree(text_dir)
    if te_cfg.model_config:
        src = resolve_model_config(te_cfg.model_config)
        text_dir.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, text_dir / "model_configs", ignore=shutil.ignore_patterns("*.[!j]*"))
            spec["model_config"] = f"{TEXT_DIR}/model_configs"
        else:
            shutil.copy2(src, text_dir / src.name)
            spec["model_config"] = f"{TEXT_DIR}/{src.name}"
    copy = mode == "copy" or (mode == "auto" and not _is_open_clip_tag(te_cfg.arch, te_cfg.pretrained))
    if not copy:
        return spec, None
    encoder = build_text_encoder(te_cfg)
    text_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(encoder.clip.state_dict(), out / TEXT_WEIGHTS, "fp32",
                      {"format": EXPORT_FORMAT, "arch": te_cfg.arch, "source": str(te_cfg.pretrained or
                                                                                      f"random(init_seed={te_cfg.init_seed})")})
    return spec, TEXT_WEIGHTS


def load_text_encoder(export_dir: str | Path, config: dict | None = None):
    """The frozen open_clip text encoder of a stage-two export: the weights the export holds
    (loaded by open_clip's `load_checkpoint`, every tensor overwritten, strict), or the named tag."""
    import open_clip

    from ldm.config import TextEncoderConfig
    from ldm.text import OpenCLIPTextEncoder

    export_dir = Path(export_dir)
    config = config if config is not None else json.loads((export_dir / CONFIG_FILE).read_text())
    spec = dict(config["text_encoder"])
    if spec.get("model_config") and not Path(spec["model_config"]).is_absolute() \
            and (export_dir / spec["model_config"]).exists():
        spec["model_config"] = str((export_dir / spec["model_config"]).resolve())
    te_cfg = build_dataclass(TextEncoderConfig, spec, "text_encoder")
    weights = config.get("text_encoder_weights")
    if not weights:
        return OpenCLIPTextEncoder(te_cfg.arch, te_cfg.pretrained, te_cfg.layer, te_cfg.cache_dir,
                                   te_cfg.model_config, te_cfg.context_length, te_cfg.init_seed)
    path = export_dir / weights
    if not path.is_file():
        raise FileNotFoundError(f"text encoder weights {path} not found (named by {export_dir / CONFIG_FILE})")
    # the tower is built (randomly initialised, image tower dropped), then every tensor is replaced
    encoder = OpenCLIPTextEncoder(te_cfg.arch, None, te_cfg.layer, te_cfg.cache_dir, te_cfg.model_config,
                                  te_cfg.context_length, te_cfg.init_seed)
    open_clip.load_checkpoint(encoder.clip, str(path), strict=True)
    return encoder.eval()


# ----------------------------------------------------------------------------- writing

def _copy_autoencoder(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"autoencoder export {src} lacks {name}")
        shutil.copy2(src / name, dst / name)


_OWNED = ("model.safetensors", "config.json", "autoencoder", "text_encoder", "vae", "unet", "transformer", "onnx")


def clear_previous_export(out: Path) -> None:
    """Remove what an earlier export wrote to OUT (only those names), so no stale part mixes in."""
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def export_run(run_dir: str | Path, out: str | Path, *, use_ema: bool = True, dtype: str = "fp32",
               tag: str | None = None, autoencoder: str | Path | None = None, copy_autoencoder: bool = True,
               fmt: str = "safetensors", text_encoder: str = "auto", onnx_check: bool = True) -> Path:
    """Write OUT/model.safetensors + OUT/config.json for the main module of a run, plus the diffusers
    or ONNX layout for `fmt` "diffusers" / "onnx".

    For stage two the autoencoder (an export directory: `latents.autoencoder` of the config unless
    given) is copied to OUT/autoencoder/ so the export is self-contained, or referenced by path; the
    text tower's weights go to OUT/text_encoder/ (see `write_text_encoder`)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ck = open_run(run_dir, tag)
    out = Path(out)
    has_ema = bool(ck.meta.get("ema"))
    if use_ema and not has_ema:
        warnings.warn(f"run {run_dir} trained without EMA: exporting the live weights", stacklevel=2)
    use_ema = use_ema and has_ema
    config = export_config(ck, "ema" if use_ema else "live")
    ae = None
    if ck.cfg.stage == "diffusion":
        ae = autoencoder or ck.cfg.latents.autoencoder
        if ae is not None:
            ae = Path(ae)
            if not (ae / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"autoencoder export {ae} not found (expected {ae / CONFIG_FILE}); give "
                                        f"its directory with --autoencoder")
            if copy_autoencoder and ae.resolve() == (out / "autoencoder").resolve():
                raise ExportError(f"the autoencoder to pack ({ae}) is OUT/autoencoder itself: export to another folder")
            ae_config = json.loads((ae / CONFIG_FILE).read_text())
            config["scaling_factor"] = ae_config.get("scaling_factor")
            config["shift_factor"] = ae_config.get("shift_factor")
        # the run's config may override the autoencoder's own statistics
        if ck.cfg.latents.scaling_factor is not None:
            config["scaling_factor"] = ck.cfg.latents.scaling_factor
        if ck.cfg.latents.shift_factor is not None:
            config["shift_factor"] = ck.cfg.latents.shift_factor
    if fmt == "diffusers":   # refuse before writing anything
        from .export_diffusers import diffusers_problems

        ae_cfg_plain = config["autoencoder"] if ck.cfg.stage == "autoencoder" else \
            (json.loads((ae / CONFIG_FILE).read_text())["autoencoder"] if ae is not None else None)
        problems = diffusers_problems(ck.cfg.stage, config.get("denoiser"), ae_cfg_plain)
        if problems:
            raise ExportError("cannot write the diffusers layout: " + "; ".join(problems))
    if fmt == "onnx":
        from .export_onnx import onnx_problems

        problems = onnx_problems()
        if problems:
            raise ExportError("cannot write ONNX: " + "; ".join(problems))

    state = ema_weights(ck) if use_ema else live_weights(ck)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_export(out)
    if ck.cfg.stage == "diffusion":
        config["autoencoder"] = None
        if ae is not None:
            if copy_autoencoder:
                _copy_autoencoder(ae, out / "autoencoder")
                config["autoencoder"] = "autoencoder"
            else:
                config["autoencoder"] = str(ae.resolve())
        config["text_encoder"], config["text_encoder_weights"] = write_text_encoder(ck.cfg.text_encoder, out,
                                                                                     text_encoder)
    config["dtype"] = dtype
    write_safetensors(state, out / WEIGHTS_FILE, dtype,
                      {"format": EXPORT_FORMAT, "step": ck.step, "config_hash": ck.meta["config_hash"],
                       "weights": config["weights"], "dtype": dtype, "kind": ck.cfg.stage, "tag": ck.tag})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if fmt == "diffusers":
        from .export_diffusers import write_diffusers

        config["diffusers"] = write_diffusers(out, config, state, dtype)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    elif fmt == "onnx":
        from .export_onnx import export_onnx

        config["onnx"] = export_onnx(out, check=onnx_check)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


# ----------------------------------------------------------------------------- reading

def read_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, weights) of an export directory."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected an export directory written by `ldm export`")
    return json.loads(cfg_file.read_text()), load_file(str(weights_file))


def export_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of OUT/model.safetensors (step, config_hash, dtype, ...)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS_FILE), "pt") as f:
        return dict(f.metadata() or {})


def _float(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    """(module in eval mode, config.json) of an autoencoder export."""
    from autoencoder.config import AutoencoderConfig
    from autoencoder.model import build_autoencoder

    config, weights = read_export(path)
    if config.get("kind") != "autoencoder":
        raise ValueError(f"{path} holds a {config.get('kind')!r} export, not an autoencoder")
    model = build_autoencoder(build_dataclass(AutoencoderConfig, config["autoencoder"], "autoencoder"))
    model.load_state_dict(_float(weights))
    return model.to(device).eval(), config


def autoencoder_path(export_dir: str | Path, config: dict) -> Path | None:
    """Where a stage-two export's autoencoder is (its copy, or the referenced directory)."""
    ref = config.get("autoencoder")
    if not ref:
        return None
    p = Path(ref)
    return p if p.is_absolute() else Path(export_dir) / p


def load_denoiser(path: str | Path, device: str | torch.device = "cpu"):
    """(denoiser module in eval mode, fp32, config.json) of a stage-two export."""
    from ldm.config import DenoiserConfig
    from ldm.training import build_denoiser

    config, weights = read_export(path)
    if config.get("kind") != "diffusion":
        raise ValueError(f"{path} holds a {config.get('kind')!r} export, not a stage-two (diffusion) model")
    net = build_denoiser(build_dataclass(DenoiserConfig, config["denoiser"], "denoiser"))
    net.load_state_dict(_float(weights))
    return net.to(device).eval(), config


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", *, text_encoder: bool = True):
    """A ready-to-sample `ldm.training.DiffusionStage` built from a stage-two export alone:
    denoiser (fp32, eval), autoencoder, text encoder, objective, conditioning, latent scaling and
    sampling defaults. Returns (stage, config.json)."""
    from ldm.config import ConditioningConfig, DenoiserConfig, LatentConfig, ObjectiveConfig, SamplingConfig
    from ldm.objectives import build_objective
    from ldm.training import DiffusionStage, latent_shape

    path = Path(path)
    net, config = load_denoiser(path)
    ae = None
    ae_dir = autoencoder_path(path, config)
    if ae_dir is not None:
        ae, _ = load_autoencoder(ae_dir)
    else:
        warnings.warn(f"{path}: the export has no autoencoder; images show the raw latents", stacklevel=2)
    latents = build_dataclass(LatentConfig, config["latents"], "latents")
    scale, shift = config.get("scaling_factor"), config.get("shift_factor")
    latents = replace(latents, scaling_factor=float(scale if scale is not None else 1.0),
                      shift_factor=float(shift if shift is not None else 0.0))
    te = load_text_encoder(path, config) if text_encoder else None
    den_cfg = build_dataclass(DenoiserConfig, config["denoiser"], "denoiser")
    stage = DiffusionStage(net, build_objective(build_dataclass(ObjectiveConfig, config["objective"], "objective")),
                           text_encoder=te, autoencoder=ae,
                           conditioning=build_dataclass(ConditioningConfig, config["conditioning"], "conditioning"),
                           latents=latents, sampling=build_dataclass(SamplingConfig, config["sampling"], "sampling"),
                           use_pooled=den_cfg.pooled_dim > 0, latent_shape=latent_shape(den_cfg))
    net.to(device)
    stage.setup(torch.device(device))
    return stage, config
