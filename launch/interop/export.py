"""From a run directory to an export directory that needs no DeepSpeed and holds no pickle.

    OUT/model.safetensors   the main module's weights (EMA by default), metadata: step, config hash
    OUT/config.json         what it takes to rebuild and use them (see `export_config`)
    OUT/autoencoder/        stage two: a copy of the autoencoder export (or config.json references it)
    OUT/text_encoder/       stage two: the open_clip text tower's weights (safetensors) when they cannot be
                            fetched by name (random init or a local file), and its model-config JSON
    OUT/vae/, OUT/unet/ or OUT/transformer/      with --format diffusers (launch/interop/export_diffusers.py)
    OUT/onnx/               with --format onnx (launch/interop/export_onnx.py)

Weights come from the newest complete checkpoint: the EMA files (re-assembled from their ZeRO-3
partitions when needed) or DeepSpeed's consolidation of the sharded fp32 weights for `--no-ema`.
Every file an export holds is JSON or safetensors: nothing in it is unpickled when it is used.
The file names and the reading side (`read_export`, `load_autoencoder`, `load_pipeline`, ...) are in
launch/runtime/exportdir.py.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.runtime.checkpoint import check_complete, step_of
from launch.runtime.config import Config
from launch.runtime.configio import build_dataclass, to_plain
from launch.runtime.exportdir import (CONFIG_FILE, DTYPES, EXPORT_FORMAT, TEXT_DIR, TEXT_WEIGHTS,
                                     WEIGHTS_FILE, ExportError, clear_previous_export, write_safetensors)

FORMATS = ("safetensors", "diffusers", "onnx")


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


# ----------------------------------------------------------------------------- writing

def _copy_autoencoder(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"autoencoder export {src} lacks {name}")
        shutil.copy2(src / name, dst / name)



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

