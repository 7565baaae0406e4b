"""From a run directory to an export directory that needs no DeepSpeed and holds no pickle.

    OUT/model.safetensors   the main module's weights (EMA by default), metadata: step, config hash
    OUT/config.json         what it takes to rebuild and use them (see `export_config`)
    OUT/autoencoder/        stage two: a copy of the autoencoder export (or config.json references it)
    OUT/text_encoder/       stage two: the open_clip text tower's weights (safetensors) when they cannot be
                            fetched by name (random init or a local file), and its model-config JSON
    OUT/vae/, OUT/unet/ or OUT/transformer/      with --format diffusers (launch/interop/export_diffusers.py)
    OUT/text_encoder{,_2,_3}/, OUT/tokenizer{,_2,_3}/   with --format diffusers of an MMDiT on SD3's three text
                            encoders (launch/interop/export_sd3.py); config.json's `text` section then names
                            them (`text_encoder_folders`), and `text_encoder` is null
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
from pathlib import Path
from typing import Any

import torch

from launch.runtime.configio import to_plain
from launch.runtime.runweights import RunCheckpoint, ema_weights, live_weights, open_run  # noqa: F401 (re-exported)
from launch.runtime.exportdir import (CONFIG_FILE, DTYPES, EXPORT_FORMAT, TEXT_DIR, TEXT_WEIGHTS,
                                     WEIGHTS_FILE, ExportError, clear_previous_export, write_safetensors)

FORMATS = ("safetensors", "diffusers", "onnx")


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
            "conditioning": to_plain(cfg.conditioning),
            "text_encoder": None if several_encoders(cfg) else to_plain(single_text_encoder(cfg)),
            "text": to_plain(getattr(cfg, "text", None)),
            "sampling": to_plain(cfg.sampling), "latents": to_plain(cfg.latents)}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None



# ----------------------------------------------------------------------------- text encoder

def _is_open_clip_tag(arch: str, pretrained: str | None) -> bool:
    if not pretrained:
        return False
    import open_clip

    return bool(open_clip.get_pretrained_cfg(arch, pretrained))


def several_encoders(cfg) -> bool:
    from ldm.text_encoders import text_encoder_entries

    entries = text_encoder_entries(cfg)
    return not (len(entries) == 1 and entries[0].kind == "open_clip")


def single_text_encoder(cfg):
    """The one open_clip tower of a run as a TextEncoderConfig: `text_encoder:`, or the single entry of
    `text.encoders` (then `text_encoder:` is the unset default, not the run's tower). Its train-time
    dropout_prob has no place in the export: sampling never drops."""
    import dataclasses

    from ldm.config import TextEncoderConfig
    from ldm.text_encoders import text_encoder_entries

    entry = text_encoder_entries(cfg)[0]
    return TextEncoderConfig(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(TextEncoderConfig)})


def text_encoder_problems(cfg, fmt: str = "safetensors") -> list[str]:
    """Why the export cannot hold this run's text encoders (empty: it can). The native layout writes one
    open_clip tower; a `text.encoders` list of several entries or a T5 would be exported as a single, wrong
    encoder. `--format diffusers` of an MMDiT whose encoders StableDiffusion3Pipeline reproduces writes them
    all (text_encoder{,_2,_3}/, launch/interop/export_sd3.py) and no native text_encoder spec."""
    from ldm.text_encoders import text_encoder_entries

    if not several_encoders(cfg):
        return []
    entries = text_encoder_entries(cfg)
    kinds = ", ".join(e.kind for e in entries)
    why = ""
    if fmt == "diffusers" and cfg.denoiser.kind == "mmdit":
        from .export_sd3 import sd3_problems

        problems = sd3_problems({"text": to_plain(cfg.text), "conditioning": to_plain(cfg.conditioning)})
        if not problems:
            return []
        why = f" (--format diffusers writes them as SD3's text encoders only when StableDiffusion3Pipeline " \
              f"reproduces them: {'; '.join(problems)})"
    return [f"text.encoders has {len(entries)} entries ({kinds}): the export writes one open_clip text tower "
            f"only, so these encoders are not exported yet" + why]


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
               fmt: str = "safetensors", text_encoder: str = "auto", onnx_check: bool = True,
               merge_lora: bool = False) -> Path:
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
    if ck.cfg.stage == "diffusion":   # refuse before writing anything
        problems = text_encoder_problems(ck.cfg, fmt)
        if problems:
            raise ExportError("cannot export: " + "; ".join(problems))
    if fmt == "diffusers":   # refuse before writing anything
        from .export_diffusers import diffusers_problems

        ae_cfg_plain = config["autoencoder"] if ck.cfg.stage == "autoencoder" else \
            (json.loads((ae / CONFIG_FILE).read_text())["autoencoder"] if ae is not None else None)
        problems = diffusers_problems(ck.cfg.stage, config.get("denoiser"), ae_cfg_plain)
        if problems:
            raise ExportError("cannot write the diffusers layout: " + "; ".join(problems))
        if ck.cfg.stage == "diffusion":    # what the pipeline will not reproduce, said before writing
            from .export_pipeline import pipeline_notices

            config["diffusers_notices"] = pipeline_notices({**config, "shift_factor": config.get("shift_factor")})
            for note in config["diffusers_notices"]:
                warnings.warn(f"diffusers pipeline: {note}", stacklevel=2)
    if fmt == "onnx":
        from .export_onnx import onnx_problems

        problems = onnx_problems()
        if problems:
            raise ExportError("cannot write ONNX: " + "; ".join(problems))

    lora = getattr(ck.cfg, "lora", None)
    lora = lora if lora is not None and lora.rank > 0 else None
    if lora is not None and not merge_lora and ck.cfg.denoiser.kind != "unet":
        raise ExportError(f"the LoRA adapter export (diffusers layout) supports denoiser.kind 'unet', not "
                          f"{ck.cfg.denoiser.kind!r}: export merged weights with --merge-lora")
    state = ema_weights(ck) if use_ema else live_weights(ck)
    adapter = None
    if lora is not None:      # launch/interop/export_lora.py: base (+ adapter file) or merged weights
        from .export_lora import split_state

        state, adapter = split_state(state, lora, merge_lora)
        config["lora"] = {"rank": lora.rank, "merged": bool(merge_lora)}
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
        if several_encoders(ck.cfg):     # SD3's three, written by write_diffusers (text_encoder_problems)
            config["text_encoder"], config["text_encoder_weights"] = None, None
        else:
            config["text_encoder"], config["text_encoder_weights"] = write_text_encoder(single_text_encoder(ck.cfg),
                                                                                         out, text_encoder)
    config["dtype"] = dtype
    write_safetensors(state, out / WEIGHTS_FILE, dtype,
                      {"format": EXPORT_FORMAT, "step": ck.step, "config_hash": ck.meta["config_hash"],
                       "weights": config["weights"], "dtype": dtype, "kind": ck.cfg.stage, "tag": ck.tag})
    if adapter is not None:
        from .export_lora import write_adapter

        config["lora"].update(write_adapter(out, adapter, lora, ck.cfg.denoiser.kind, dtype,
                                            {"step": ck.step, "weights": config["weights"]}))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if fmt == "diffusers":
        from .export_diffusers import write_diffusers

        config["diffusers"] = write_diffusers(out, config, state, dtype)
        if ck.cfg.stage == "diffusion" and several_encoders(ck.cfg) and "text_encoder_3" in config["diffusers"]:
            from .export_sd3 import native_text     # our sampler rebuilds the three from those folders

            config.update(native_text(out, config))
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    elif fmt == "onnx":
        from .export_onnx import export_onnx

        config["onnx"] = export_onnx(out, check=onnx_check)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out

