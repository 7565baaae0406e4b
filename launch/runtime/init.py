"""`init.from`: start a run from weights that already exist (never their optimizer or data position).

Sources, recognised by what the path holds:
    our export             OUT/config.json (format ldm-train/1) + OUT/model.safetensors; a stage-two export's
                           OUT/autoencoder/ when stage one starts from it
    our run directory      RUN_DIR/checkpoints/ (newest complete tag) or RUN_DIR/checkpoints/step_XXXXXXXX;
                           any ZeRO stage and world size (consolidated by launch/runtime/runweights.py)
    a diffusers folder     a pipeline (model_index.json: unet/ or transformer/ for stage two, vae/ for stage
                           one) or one model folder (UNet2DConditionModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel, AutoencoderKL)
    a single file          .safetensors, or .ckpt/.pt/.pth/.bin read with torch.load(weights_only=True): an LDM /
                           SD checkpoint (model.diffusion_model.* through diffusers' own converter,
                           first_stage_model.* or a bare VAE), a diffusers-named or our own state dict
The run's config decides the architecture; the source must fit it. Every key of ours is matched to the
source's name for it (ldm/convert.py, ldm/convert_mmdit.py, autoencoder/convert.py); a diffusers source's
config.json is compared too (head counts, norms, ... that tensor shapes do not show). With `init.strict`
(default) any missing, unexpected or mis-shaped key, or differing config entry, stops the run before
any compute with their names; otherwise they are reported and those tensors keep their fresh init.
A position table of another size (a DiT / MMDiT trained at another resolution) is interpolated when
learned and recomputed when sin-cos. `init.what: weights+ema` also starts the EMA from the source's
EMA (run directories; an SD .ckpt's model_ema); sources with one set of weights start it from those.
A report goes to RUN_DIR/init.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configio import ConfigError

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors", "model.safetensors")
_POS_KEYS = ("pos_embed",)
# diffusers config entries that shapes do not show and our models fix (value ours implies when absent)
_UNET_FIXED = {"class_embed_type": None, "addition_embed_type": None, "time_cond_proj_dim": None,
               "encoder_hid_dim": None, "resnet_time_scale_shift": "default", "only_cross_attention": False,
               "dual_cross_attention": False, "time_embedding_type": "positional", "num_class_embeds": None,
               "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
               "center_input_sample": False}
_CONFIG_SKIP = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout", "scaling_factor",
                "shift_factor", "latents_mean", "latents_std", "force_upcast", "pos_embed_max_size"}


@dataclass
class Source:
    description: str
    layout: str                                   # "ours" | "diffusers" | "ldm_vae"
    state: dict[str, torch.Tensor]
    ema: Optional[dict[str, torch.Tensor]] = None
    diffusers_config: Optional[dict] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class InitReport:
    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    config_differences: list[str]
    kept_fresh: list[str]
    notes: list[str]

    def problems(self) -> list[str]:
        out = []
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape-mismatched", self.mismatched), ("config differs", self.config_differences)):
            if keys:
                more = f", ... and {len(keys) - 40} more (all in the log)" if len(keys) > 40 else ""
                shown = ", ".join(keys[:40]) + more
                out.append(f"{what} ({len(keys)}): {shown}")
        return out


# ----------------------------------------------------------------------------- reading sources

def read_weights(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # never fall back to full unpickling
        raise ConfigError(f"config key 'init.from' = {str(path)!r}: torch.load(weights_only=True) refused it "
                          f"({str(e).splitlines()[0]}); convert it to .safetensors") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConfigError(f"config key 'init.from' = {str(path)!r} does not hold a state dict")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def _diffusers_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        from safetensors.torch import load_file
        state = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / name)))
        return state
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return read_weights(folder / name)
    raise ConfigError(f"config key 'init.from': no weights in diffusers folder {folder} "
                      f"(expected one of {', '.join(DIFFUSERS_WEIGHTS)})")


def _expected_class(cfg) -> str:
    if cfg.stage == "autoencoder":
        return "AutoencoderKL"
    from ldm.convert import diffusers_class
    return diffusers_class(cfg.denoiser)


def _from_diffusers_folder(folder: Path, cfg) -> Source:
    if (folder / "model_index.json").is_file():
        subs = ["vae"] if cfg.stage == "autoencoder" else ["unet", "transformer"]
        found = [s for s in subs if (folder / s / "config.json").is_file()]
        if not found:
            raise ConfigError(f"config key 'init.from' = {str(folder)!r}: the pipeline has no "
                              f"{' or '.join(s + '/' for s in subs)} for the {cfg.stage} stage")
        folder = folder / found[0]
    dcfg = json.loads((folder / "config.json").read_text())
    want = _expected_class(cfg)
    if dcfg.get("_class_name") != want:
        raise ConfigError(f"config key 'init.from' = {str(folder)!r} holds a diffusers {dcfg.get('_class_name')}, "
                          f"but this run's {'autoencoder' if cfg.stage == 'autoencoder' else 'denoiser'} "
                          f"corresponds to {want}")
    state = _diffusers_model_weights(folder)
    if want == "AutoencoderKL":
        from autoencoder.convert import modernise_diffusers_keys
        state = modernise_diffusers_keys(state)
    return Source(f"diffusers {want} {folder}", "diffusers", state, diffusers_config=dcfg)


def _from_single_file(path: Path, cfg, what: str) -> Source:
    sd = read_weights(path)
    notes = []
    if cfg.stage == "autoencoder":
        from autoencoder.convert import first_stage
        if any(k.startswith("first_stage_model.") for k in sd) or any(".down.0.block." in k for k in sd):
            return Source(f"LDM/SD VAE {path}", "ldm_vae", first_stage(sd))
        if any("down_blocks." in k for k in sd):
            from autoencoder.convert import modernise_diffusers_keys
            return Source(f"diffusers-named VAE {path}", "diffusers", modernise_diffusers_keys(sd))
        return Source(f"state dict {path}", "ours", sd)
    kind = cfg.denoiser.kind
    if any(k.startswith("model.diffusion_model.") for k in sd):
        if kind == "unet":
            from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

            from ldm.convert import unet_diffusers_config
            dcfg = unet_diffusers_config(cfg.denoiser.unet)
            state = convert_ldm_unet_checkpoint(sd, dcfg)
            ema = None
            if what == "weights+ema":
                if any(k.startswith("model_ema.") for k in sd):
                    ema = convert_ldm_unet_checkpoint(sd, dcfg, extract_ema=True)
                else:
                    notes.append("the checkpoint holds no model_ema: the EMA starts from the weights")
            return Source(f"LDM/SD UNet {path}", "diffusers", state, ema=ema, notes=notes)
        if kind == "mmdit":
            from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
            inner = {k[len("model.diffusion_model."):]: v for k, v in sd.items()
                     if k.startswith("model.diffusion_model.")}
            return Source(f"SD3 single file {path}", "diffusers",
                          convert_sd3_transformer_checkpoint_to_diffusers(inner))
        raise ConfigError(f"config key 'init.from' = {str(path)!r}: an LDM single file for a DiT is not "
                          f"understood (give a diffusers PixArtTransformer2DModel folder)")
    if any(k.startswith(("down_blocks.", "transformer_blocks.", "adaln_single.")) for k in sd):
        return Source(f"diffusers-named state dict {path}", "diffusers", sd)
    return Source(f"state dict {path}", "ours", sd)


def _from_run(path: Path, cfg, what: str) -> Source:
    from .ema import EMA
    from .runweights import live_weights, open_run

    if path.parent.name == "checkpoints":
        ck = open_run(path.parent.parent, path.name)
    else:
        ck = open_run(path)
    if ck.cfg.stage != cfg.stage:
        raise ConfigError(f"config key 'init.from' = {str(path)!r} is a {ck.cfg.stage} run; this is a {cfg.stage} run")
    notes, ema = [], None
    if what == "weights+ema":
        if (ck.tag_dir / "ema").is_dir():
            ema, _ = EMA.read_full(ck.tag_dir / "ema")
        else:
            notes.append("the run kept no EMA: the EMA starts from the weights")
    return Source(f"run {ck.run_dir} checkpoint {ck.tag} (step {ck.step}, ZeRO-{ck.meta['zero_stage']}, "
                  f"{ck.meta['world_size']} rank(s))", "ours", live_weights(ck), ema=ema, notes=notes)


def _from_export(path: Path, cfg, what: str) -> Source:
    from .exportdir import autoencoder_path, read_export

    config = json.loads((path / "config.json").read_text())
    if cfg.stage == "autoencoder" and config.get("kind") == "diffusion":
        ae = autoencoder_path(path, config)
        if ae is None:
            raise ConfigError(f"config key 'init.from' = {str(path)!r}: this stage-two export has no autoencoder")
        path, config = ae, json.loads((ae / "config.json").read_text())
    if config.get("kind") != cfg.stage:
        raise ConfigError(f"config key 'init.from' = {str(path)!r} is a {config.get('kind')!r} export; this is a "
                          f"{cfg.stage} run")
    _, state = read_export(path)
    notes = ["the export holds one set of weights: the EMA starts from them"] if what == "weights+ema" else []
    return Source(f"export {path} ({config.get('weights')} weights, step {config.get('step')})", "ours",
                  {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, notes=notes)


def read_source(path: str | Path, cfg) -> Source:
    p = Path(path)
    what = cfg.init.what
    if p.is_file():
        return _from_single_file(p, cfg, what)
    if not p.is_dir():
        raise ConfigError(f"config key 'init.from' = {str(path)!r}: no such file or directory")
    if (p / "checkpoints").is_dir() or (p / "meta.json").is_file():
        return _from_run(p, cfg, what)
    if (p / "config.json").is_file() and json.loads((p / "config.json").read_text()).get("format", "") \
            .startswith("ldm-train/"):
        return _from_export(p, cfg, what)
    if (p / "model_index.json").is_file() or (p / "config.json").is_file():
        return _from_diffusers_folder(p, cfg)
    raise ConfigError(f"config key 'init.from' = {str(path)!r} is none of: an export (config.json), a run "
                      f"directory (checkpoints/), a diffusers folder (model_index.json or config.json), a file")


# ----------------------------------------------------------------------------- matching

def _ident(ts):
    return ts[0]


def name_map(cfg, layout: str, our_keys: list[str]) -> tuple[dict[str, tuple[list[str], Callable]], list[str]]:
    """{our key: ([source names], join fn)} and our keys without a counterpart in that layout."""
    if layout == "ours":
        return {k: ([k], _ident) for k in our_keys}, []
    if cfg.stage == "autoencoder":
        from autoencoder.convert import source_names
        names = source_names(cfg.autoencoder, "diffusers" if layout == "diffusers" else "ldm", our_keys)
        return {k: ([v], _ident) for k, v in names.items()}, [k for k in our_keys if k not in names]
    from ldm.convert import diffusers_source_names
    return diffusers_source_names(cfg.denoiser, our_keys)


def _resize_positions(t: torch.Tensor, n: int) -> torch.Tensor:
    """[m*m, D] learned positions -> [n, D] on a square grid (bicubic, as timm resamples ViT positions)."""
    gs, g = round(t.shape[0] ** 0.5), round(n ** 0.5)
    grid = t.float().reshape(1, gs, gs, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(g * g, -1).to(t.dtype)


def match(module: nn.Module, source_state: dict, mapping: dict, notes: list[str]
          ) -> tuple[dict, list[str], list[str], list[str]]:
    """-> (tensors in our naming, missing, unexpected, mismatched)."""
    ours = module.state_dict()
    params = dict(module.named_parameters())
    loaded, missing, mismatched, used = {}, [], [], set()
    for key, (names, join) in mapping.items():
        absent = [n for n in names if n not in source_state]
        if absent:
            missing.append(key if names == [key] else f"{key} (source {', '.join(absent)})")
            continue
        used.update(names)
        t = join([source_state[n] for n in names])
        want = ours[key].shape
        if t.shape != want:
            if key.split(".")[-1] in _POS_KEYS and t.ndim == 2 and t.shape[1] == want[-1]:
                if key in params:
                    notes.append(f"{key}: learned positions interpolated from {t.shape[0]} to {want[0]} tokens")
                    t = _resize_positions(t, want[0])
                else:
                    notes.append(f"{key}: sin-cos positions recomputed for {want[0]} tokens")
                    continue
            elif t.numel() == ours[key].numel() and t.ndim != len(want):
                t = t.reshape(want)          # 1x1 conv <-> linear (autoencoder attention)
            else:
                mismatched.append(f"{key} (source {tuple(t.shape)}, ours {tuple(want)})")
                continue
        loaded[key] = t.to(ours[key].dtype)
    unexpected = [k for k in source_state if k not in used]
    return loaded, missing, unexpected, mismatched


def _norm(value, like=None):
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(like, list) and not isinstance(value, list) and value is not None:
        value = [value] * len(like)
    return value


def config_differences(cfg, source_config: Optional[dict]) -> list[str]:
    """Entries of a diffusers source config that differ from what our configured model corresponds to."""
    if not source_config:
        return []
    if cfg.stage == "autoencoder":
        from autoencoder.convert import diffusers_config
        ours = diffusers_config(cfg.autoencoder)
    else:
        from ldm.convert import diffusers_config_for
        ours = dict(diffusers_config_for(cfg.denoiser))
        if cfg.denoiser.kind == "unet":
            ours = {**_UNET_FIXED, **ours}
    src = dict(source_config)
    if src.get("_class_name") == "PixArtTransformer2DModel":
        size = src.get("sample_size") or 0
        if src.get("interpolation_scale") is None:
            src["interpolation_scale"] = max(size // 64, 1)
        if src.get("use_additional_conditions") is None:
            src["use_additional_conditions"] = size == 128
    out = []
    for k, mine in ours.items():
        if k in _CONFIG_SKIP or k not in src:
            continue
        theirs, mine = _norm(src[k], _norm(mine)), _norm(mine, _norm(src[k]))
        if theirs != mine:
            out.append(f"{k} (source {theirs!r}, this config {mine!r})")
    return out


# ----------------------------------------------------------------------------- applying

class _PlainState(nn.Module):
    """A LoRA-adapted module seen under the names of the model without adapters (ldm/lora.py); its
    state_dict() tensors are the adapted module's own, so copying into them fills the base."""

    def __init__(self, module: nn.Module):
        super().__init__()
        from ldm.lora import is_lora_key, plain_name
        object.__setattr__(self, "_inner", module)
        self._state = {plain_name(k): v for k, v in module.state_dict(keep_vars=False).items()
                       if not is_lora_key(k)}
        self._params = {plain_name(k): p for k, p in module.named_parameters() if not is_lora_key(k)}

    def state_dict(self, *args, **kwargs):
        return dict(self._state)

    def named_parameters(self, *args, **kwargs):
        return iter(self._params.items())


def _lora_plain_view(module: nn.Module):
    from ldm.lora import has_lora
    if not has_lora(module):
        return None
    return _PlainState(module)


def initialise(cfg, stage, log: Callable[[str], None] = print, is_main: bool = True
               ) -> Optional[dict[str, torch.Tensor]]:
    """Load `cfg.init.from` into the stage's main module (before engines exist). Returns the EMA start in
    our naming (init.what weights+ema with a source EMA), else None. Raises ConfigError under strict."""
    if not cfg.init.from_:
        return None
    module = stage.trainable_modules()[stage.main_module]
    adapted = _lora_plain_view(module)
    if adapted is not None:          # LoRA: the source fills the frozen base under its plain names
        module = adapted
    src = read_source(cfg.init.from_, cfg)
    our_keys = list(module.state_dict())
    mapping, none = name_map(cfg, src.layout, our_keys)
    notes = list(src.notes)
    loaded, missing, unexpected, mismatched = match(module, src.state, mapping, notes)
    report = InitReport(src.description, sorted(loaded), missing, unexpected, mismatched,
                        config_differences(cfg, src.diffusers_config), none, notes)
    problems = report.problems()
    if problems and cfg.init.strict:
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if len(keys) > 40:
                log(f"init: all {what}: {', '.join(keys)}")
        raise ConfigError(f"config key 'init.from' = {cfg.init.from_!r} ({src.description}) does not fit this "
                          f"run's {stage.main_module}; nothing was run. " + "; ".join(problems)
                          + ". Fix the config to match the source, or set init.strict=false to keep those "
                            "tensors at their fresh init.")
    with torch.no_grad():
        ours = module.state_dict()
        for k, t in loaded.items():
            ours[k].copy_(t)
    ema = None
    if cfg.init.what == "weights+ema" and src.ema is not None and adapted is None:
        ema_loaded, *_ = match(module, src.ema, mapping, [])
        params = {n for n, p in module.named_parameters() if p.requires_grad}
        ema = {k: (ema_loaded.get(k, loaded.get(k, ours[k]))).float().clone() for k in params}
    log(f"init: {len(loaded)}/{len(our_keys)} tensors of '{stage.main_module}' from {src.description}"
        + (f"; EMA from the source's EMA" if ema is not None else ""))
    for line in problems + notes + ([f"no counterpart in the source format, fresh init: {', '.join(none)}"]
                                    if none else []):
        log(f"init: {line}")
    if is_main and cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "init.json").write_text(json.dumps({**report.__dict__, "from": cfg.init.from_,
                                                       "what": cfg.init.what, "strict": cfg.init.strict,
                                                       "ema_from_source": ema is not None}, indent=1))
    return ema


def start_ema(ema, full: dict[str, torch.Tensor], rank: int, world_size: int) -> None:
    """Overwrite a fresh EMA's shadow with full weights (cut into this rank's piece under ZeRO-3)."""
    with torch.no_grad():
        for n, p in ema.params:
            if n not in full:
                continue
            src = full[n].reshape(-1).float()
            if ema.partitioned:
                size = ema.shadow[n].numel()
                flat = torch.zeros(size * world_size)
                flat[: src.numel()] = src
                ema.shadow[n].copy_(flat[rank * size:(rank + 1) * size].view_as(ema.shadow[n]))
            else:
                ema.shadow[n].copy_(src.view_as(ema.shadow[n]))
