"""From a run directory to an export directory that needs no DeepSpeed and holds no pickle.

    OUT/model.safetensors   the main module's weights (EMA by default), metadata: step, config hash
    OUT/config.json         what it takes to rebuild and use them (see `export_config`)

Weights come from the newest complete checkpoint: the EMA files (re-assembled from their ZeRO-3
partitions when needed) or DeepSpeed's consolidation of the sharded fp32 weights for `--no-ema`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import COMPLETE, check_complete, step_of
from .config import Config
from .configio import build_dataclass, to_plain

EXPORT_FORMAT = "ldm-train/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    if tag is None:
        tags = sorted((p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal")
                       and (p / COMPLETE).is_file()), key=step_of, reverse=True)
        usable = [t for t in tags if check_complete(root / t) is None]
        if not usable:
            raise FileNotFoundError(f"no complete checkpoint under {root}")
        tag = usable[0]
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
        # DeepSpeed's own file (pickle); never part of an export.
        state = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ck.tag_dir), tag=name))


def ema_weights(ck: RunCheckpoint) -> dict[str, torch.Tensor]:
    """EMA parameters (full, fp32) plus the live buffers (EMA tracks parameters only)."""
    from .ema import EMA

    ema, _ = EMA.read_full(ck.tag_dir / "ema")
    live = live_weights(ck)
    return {**{k: v for k, v in live.items() if k not in ema}, **ema}


def export_config(ck: RunCheckpoint, weights: str) -> dict[str, Any]:
    cfg = ck.cfg
    common = {"format": EXPORT_FORMAT, "kind": cfg.stage, "step": ck.step, "config_hash": ck.meta["config_hash"],
              "weights": weights}
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
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)


def export_run(run_dir: str | Path, out: str | Path, *, use_ema: bool = True, dtype: str = "fp32",
               tag: str | None = None, autoencoder: str | Path | None = None, copy_autoencoder: bool = True) -> Path:
    """Write OUT/model.safetensors + OUT/config.json for the main module of a run.

    For stage two the autoencoder (an export directory: `latents.autoencoder` of the config unless
    given) is copied to OUT/autoencoder/ so the export is self-contained, or referenced by path."""
    ck = open_run(run_dir, tag)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_ema = use_ema and bool(ck.meta.get("ema"))
    state = ema_weights(ck) if use_ema else live_weights(ck)
    config = export_config(ck, "ema" if use_ema else "live")
    if ck.cfg.stage == "diffusion":
        ae = autoencoder or ck.cfg.latents.autoencoder
        if ae is not None:
            ae = Path(ae)
            ae_config = json.loads((ae / "config.json").read_text())
            config["scaling_factor"] = ae_config.get("scaling_factor")
            config["shift_factor"] = ae_config.get("shift_factor")
            if copy_autoencoder:
                if (out / "autoencoder").exists():
                    shutil.rmtree(out / "autoencoder")
                shutil.copytree(ae, out / "autoencoder", ignore=shutil.ignore_patterns("autoencoder"))
                config["autoencoder"] = "autoencoder"
            else:
                config["autoencoder"] = str(ae.resolve())
        # the run's config may override the autoencoder's own statistics
        if ck.cfg.latents.scaling_factor is not None:
            config["scaling_factor"] = ck.cfg.latents.scaling_factor
        if ck.cfg.latents.shift_factor is not None:
            config["shift_factor"] = ck.cfg.latents.shift_factor
    write_safetensors(state, out / "model.safetensors", dtype,
                      {"format": EXPORT_FORMAT, "step": str(ck.step), "config_hash": ck.meta["config_hash"],
                       "weights": config["weights"], "dtype": dtype, "kind": ck.cfg.stage})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def read_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, weights) of an export directory."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected an export directory written by `ldm export`")
    return json.loads(cfg_file.read_text()), load_file(str(weights_file))


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    """(module in eval mode, config.json) of an autoencoder export."""
    from autoencoder.config import AutoencoderConfig
    from autoencoder.model import build_autoencoder

    config, weights = read_export(path)
    if config.get("kind") != "autoencoder":
        raise ValueError(f"{path} holds a {config.get('kind')!r} export, not an autoencoder")
    model = build_autoencoder(build_dataclass(AutoencoderConfig, config["autoencoder"], "autoencoder"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return model.to(device).eval(), config
