"""The export directory: its file names, and reading one back into modules (no DeepSpeed, no pickle).

    OUT/model.safetensors   the main module's weights (`WEIGHTS_FILE`), safetensors metadata: step, config hash
    OUT/config.json         what it takes to rebuild and use them (`CONFIG_FILE`; written by
                            launch/interop/export.py's `export_config`)
    OUT/autoencoder/        stage two: a copy of the autoencoder export (or config.json references it)
    OUT/text_encoder/       stage two: the open_clip text tower's weights (`TEXT_WEIGHTS`) and model-config JSON
    OUT/text_encoder{,_2,_3}/  an MMDiT on SD3's three encoders (launch/interop/export_sd3.py): transformers'
                            CLIP towers and T5 (+ its tokenizer), named per encoder by config.json's
                            `text_encoder_folders`; `load_text_encoders` rebuilds our encoders from them

The contract is docs/ARCHITECTURE.md section 5. It lives in the runtime room because the runtime reads
exports too (stage two trains against a frozen autoencoder export; precompute encodes with one); the
writers and converters (launch/interop/) import these names, so no module of either side imports the
other's back. The reading side (`read_export`, `load_autoencoder`, `load_text_encoder`, `load_pipeline`)
rebuilds the modules from those files alone.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .configio import build_dataclass

EXPORT_FORMAT = "ldm-train/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_DIR = "text_encoder"
TEXT_WEIGHTS = f"{TEXT_DIR}/open_clip_text.safetensors"


class ExportError(ValueError):
    """An export that cannot be written as asked (format not expressible, missing input)."""



def write_safetensors(state: dict[str, torch.Tensor], path: Path, dtype: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    target = DTYPES[dtype]
    # clone: safetensors refuses tensors that share storage (tied or viewed weights)
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})


_OWNED = ("model.safetensors", "config.json", "autoencoder", "text_encoder", "text_encoder_2", "text_encoder_3", "vae",
          "unet", "transformer", "onnx", "scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "model_index.json",
          "pytorch_lora_weights.safetensors")


def clear_previous_export(out: Path) -> None:
    """Remove what an earlier export wrote to OUT (only those names), so no stale part mixes in."""
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()



# ----------------------------------------------------------------------------- reading

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



def _in_export(export_dir: Path, rel: str | None) -> str | None:
    """An export-relative path (what the export wrote) made absolute; anything else as given."""
    if rel and not Path(rel).is_absolute() and (export_dir / rel).exists():
        return str((export_dir / rel).resolve())
    return rel


def open_clip_from_clip_text(encoder, folder: str | Path):
    """Overwrite every text-tower tensor of an ldm.text.OpenCLIPTextEncoder from the transformers
    CLIPTextModelWithProjection folder that launch/interop/pipeline_parts.py `clip_text_from_open_clip`
    wrote (the inverse mapping: q, k, v joined back into in_proj, text_projection transposed back). Every
    tensor of the folder is used and every text parameter is set (open_clip's logit_scale / logit_bias aside,
    which text encoding never reads), shapes checked, or ValueError."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != Path(TEXT_WEIGHTS).name]
    if not files or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: expected config.json and model.safetensors of a CLIP text model")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    clip = encoder.clip
    text = getattr(clip, "text", None) or clip
    blocks = text.transformer.resblocks
    width = text.transformer.width
    pre = "text_model."
    pairs = [(text.token_embedding.weight, f"{pre}embeddings.token_embedding.weight"),
             (text.positional_embedding, f"{pre}embeddings.position_embedding.weight"),
             (text.ln_final.weight, f"{pre}final_layer_norm.weight"), (text.ln_final.bias, f"{pre}final_layer_norm.bias")]
    joined = []
    for i, b in enumerate(blocks):
        p = f"{pre}encoder.layers.{i}."
        joined += [(b.attn.in_proj_weight, [f"{p}self_attn.{n}_proj.weight" for n in "qkv"]),
                   (b.attn.in_proj_bias, [f"{p}self_attn.{n}_proj.bias" for n in "qkv"])]
        pairs += [(b.attn.out_proj.weight, f"{p}self_attn.out_proj.weight"),
                  (b.attn.out_proj.bias, f"{p}self_attn.out_proj.bias")]
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")):
            mod = b.get_submodule(ours)
            pairs += [(mod.weight, f"{p}{theirs}.weight"), (mod.bias, f"{p}{theirs}.bias")]
    proj = text.text_projection
    transposed = None
    if isinstance(proj, torch.nn.Linear):
        pairs.append((proj.weight, "text_projection.weight"))
    elif proj is not None:
        transposed = proj
    used, done = set(), set()
    missing = [k for _, k in pairs if k not in state] + [k for _, ks in joined for k in ks if k not in state]
    if transposed is not None and "text_projection.weight" not in state:
        missing.append("text_projection.weight")
    if missing:
        raise ValueError(f"{folder}: the CLIP text model lacks {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} for {len(blocks)} blocks of width {width}")
    with torch.no_grad():
        def put(param, value, names):
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{folder}: {', '.join(names)} has shape {tuple(value.shape)}, the open_clip "
                                 f"tower's tensor {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
            used.update(names)
            done.add(id(param))

        for param, key in pairs:
            put(param, state[key], [key])
        for param, keys in joined:
            put(param, torch.cat([state[k] for k in keys]), keys)
        if transposed is not None:
            put(transposed, state["text_projection.weight"].t(), ["text_projection.weight"])
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"{folder}: tensors with no place in the open_clip tower ({len(blocks)} blocks): "
                         f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    unset = [n for n, p in text.named_parameters() if id(p) not in done and not n.startswith("logit_")]
    if unset:
        raise ValueError(f"{folder}: no tensor for the open_clip text parameters {', '.join(unset[:4])}")
    return encoder.eval()


def load_text_encoders(export_dir: str | Path, config: dict | None = None):
    """The frozen text encoders of an export whose config.json lists `text.encoders` (an MMDiT exported as
    SD3's three, launch/interop/export_sd3.py): ldm.text_encoders.TextEncoders (or the bare tower for one
    open_clip entry), each encoder rebuilt from the folder `text_encoder_folders` names for it: an open_clip
    tower built from its arch and model config (randomly initialised), then every tensor replaced from the
    transformers CLIP folder (`open_clip_from_clip_text`); a T5 from its saved folder (model + tokenizer)."""
    from ldm.config import TextEncoderEntry
    from ldm.text_encoders import TextEncoders, build_one, needs_joining

    export_dir = Path(export_dir)
    config = config if config is not None else json.loads((export_dir / CONFIG_FILE).read_text())
    raw = (config.get("text") or {}).get("encoders") or []
    folders = config.get("text_encoder_folders") or []
    if not raw:
        raise ValueError(f"{export_dir / CONFIG_FILE}: no text.encoders section")
    if len(folders) != len(raw):
        raise FileNotFoundError(f"{export_dir / CONFIG_FILE} lists {len(raw)} text encoders but names the folders "
                                f"of {len(folders)} (text_encoder_folders): this export holds no weights for them; "
                                "re-export the run with --format diffusers")
    entries, encoders = [], []
    for i, (spec, folder) in enumerate(zip(raw, folders)):
        spec = dict(spec)
        where = export_dir / folder
        if not where.is_dir():
            raise FileNotFoundError(f"text encoder {i} folder {where} not found (named by {export_dir / CONFIG_FILE})")
        if spec.get("kind", "open_clip") == "t5":
            spec["path"] = str(where.resolve())
        else:
            spec["model_config"] = _in_export(export_dir, spec.get("model_config"))
            spec["pretrained"] = None          # built randomly, every tensor then replaced from the folder
        entry = build_dataclass(TextEncoderEntry, spec, f"text.encoders[{i}]")
        encoder = build_one(entry, i)
        if entry.kind == "open_clip":
            open_clip_from_clip_text(encoder, where)
        entries.append(entry)
        encoders.append(encoder)
    if not needs_joining(entries):
        return encoders[0]
    return TextEncoders(encoders, [e.kind for e in entries], [e.dropout_prob for e in entries])


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
    te = None
    if text_encoder:
        several = not config.get("text_encoder") and (config.get("text") or {}).get("encoders")
        te = load_text_encoders(path, config) if several else load_text_encoder(path, config)
    den_cfg = build_dataclass(DenoiserConfig, config["denoiser"], "denoiser")
    stage = DiffusionStage(net, build_objective(build_dataclass(ObjectiveConfig, config["objective"], "objective")),
                           text_encoder=te, autoencoder=ae,
                           conditioning=build_dataclass(ConditioningConfig, config["conditioning"], "conditioning"),
                           latents=latents, sampling=build_dataclass(SamplingConfig, config["sampling"], "sampling"),
                           use_pooled=den_cfg.pooled_dim > 0, latent_shape=latent_shape(den_cfg))
    net.to(device)
    stage.setup(torch.device(device))
    return stage, config
