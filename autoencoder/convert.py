"""Our KL autoencoder <-> diffusers `AutoencoderKL` and the original LDM / Stable Diffusion layout.

Key maps are generated from the model's own key list (built on the meta device from the
config), so every key is accounted for: a missing or unexpected key is an error that names it.

Layouts (same tensors, different names):
  ours       encoder.levels.{i}.res.{j}.skip   encoder.levels.{i}.down.conv   encoder.mid.res1 / attn / res2
  LDM        encoder.down.{i}.block.{j}.nin_shortcut  encoder.down.{i}.downsample.conv  encoder.mid.block_1 / attn_1 / block_2
  diffusers  encoder.down_blocks.{i}.resnets.{j}.conv_shortcut  ...downsamplers.0.conv  encoder.mid_block.resnets.0 / attentions.0 / resnets.1
The decoder's levels run in the opposite order in diffusers (up_blocks.0 is the lowest
resolution); LDM and we index levels by resolution (0 = full size). Attention q/k/v/proj are
1x1 convs [C, C, 1, 1] in LDM and here, Linear [C, C] in diffusers.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from .config import AutoencoderConfig
from .model import build_autoencoder

LDM_PREFIX = "first_stage_model."
_ATTN_WEIGHT = re.compile(r"(^|\.)attn(\.\d+)?\.(q|k|v|proj)\.weight$")
_OURS_ONLY = ("logvar",)   # a learned NLL log-variance attached for training: not part of the model
_DIFFUSERS_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _require_kl(cfg: AutoencoderConfig) -> None:
    if cfg.regularizer != "kl":
        raise ValueError(f"conversion supports the KL autoencoder only (regularizer = {cfg.regularizer!r})")


def _reference_shapes(cfg: AutoencoderConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_autoencoder(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- key maps

def _ldm_key(key: str) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key                                   # quant_conv / post_quant_conv
    rest = re.sub(r"^levels\.(\d+)\.", (r"down.\1." if side == "encoder" else r"up.\1."), rest)
    rest = re.sub(r"\.res\.(\d+)\.", r".block.\1.", rest)
    rest = rest.replace(".down.conv.", ".downsample.conv.").replace(".up.conv.", ".upsample.conv.")
    rest = re.sub(r"^mid\.res1\.", "mid.block_1.", rest)
    rest = re.sub(r"^mid\.res2\.", "mid.block_2.", rest)
    rest = re.sub(r"^mid\.attn\.", "mid.attn_1.", rest)
    rest = rest.replace(".skip.", ".nin_shortcut.").replace(".proj.", ".proj_out.")
    return f"{side}.{rest}"


def _diffusers_key(key: str, num_levels: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key
    m = re.match(r"levels\.(\d+)\.(.*)$", rest)
    if m:
        i, tail = int(m.group(1)), m.group(2)
        if tail.startswith("attn."):
            raise ValueError(f"{key}: diffusers' AutoencoderKL has no attention inside its up/down blocks "
                             "(attn_resolutions must be empty to convert)")
        block = f"down_blocks.{i}" if side == "encoder" else f"up_blocks.{num_levels - 1 - i}"
        tail = re.sub(r"^res\.(\d+)\.", r"resnets.\1.", tail)
        tail = re.sub(r"^(down|up)\.conv\.", lambda mm: f"{mm.group(1)}samplers.0.conv.", tail)
        rest = f"{block}.{tail}"
    elif rest.startswith("mid."):
        tail = rest[len("mid."):]
        tail = re.sub(r"^res1\.", "resnets.0.", tail)
        tail = re.sub(r"^res2\.", "resnets.1.", tail)
        m = re.match(r"attn\.(norm|q|k|v|proj)\.(.*)$", tail)
        if m:
            name = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out.0"}[m.group(1)]
            tail = f"attentions.0.{name}.{m.group(2)}"
        rest = f"mid_block.{tail}"
    elif rest.startswith("norm_out."):
        rest = "conv_" + rest
    rest = rest.replace(".skip.", ".conv_shortcut.")
    return f"{side}.{rest}"


def _convert(sd: Mapping[str, torch.Tensor], mapping: dict[str, str], target_shapes: dict[str, torch.Size],
             what: str, ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename `sd` by `mapping` (source key -> target key), reshaping attention projections."""
    unexpected = [k for k in sd if k not in mapping and not k.startswith(ignore)]
    missing = [k for k in mapping if k not in sd]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:4]})")
        raise KeyError(f"{what}: state dict does not match the configured architecture: " + "; ".join(parts))
    out = {}
    for src, dst in mapping.items():
        t = sd[src]
        shape = target_shapes[dst]
        if t.shape != shape:
            if t.numel() != shape.numel():
                raise ValueError(f"{what}: {src} has shape {tuple(t.shape)}, expected {tuple(shape)} for {dst}")
            t = t.reshape(shape)   # 1x1 conv <-> linear
        out[dst] = t
    return out


# ----------------------------------------------------------------------------- diffusers

def to_diffusers(sd: Mapping[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers AutoencoderKL state dict."""
    _require_kl(cfg)
    ours = _reference_shapes(cfg)
    n = len(cfg.ch_mult)
    mapping = {k: _diffusers_key(k, n) for k in ours}
    shapes = {mapping[k]: (torch.Size(s[:2]) if _ATTN_WEIGHT.search(k) else s) for k, s in ours.items()}
    return _convert(sd, mapping, shapes, "to_diffusers", ignore=_OURS_ONLY)


def from_diffusers(sd: Mapping[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict (current or legacy attention names) -> ours."""
    _require_kl(cfg)
    sd = {_modernise_diffusers_key(k): v for k, v in sd.items()}
    ours = _reference_shapes(cfg)
    n = len(cfg.ch_mult)
    mapping = {_diffusers_key(k, n): k for k in ours}
    return _convert(sd, mapping, ours, "from_diffusers")


def _modernise_diffusers_key(key: str) -> str:
    m = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(.*)$", key)
    return f"{m.group(1)}{_DIFFUSERS_LEGACY_ATTN[m.group(2)]}.{m.group(3)}" if m else key


def diffusers_config(cfg: AutoencoderConfig, scaling_factor: Optional[float] = None,
                     shift_factor: Optional[float] = None) -> dict[str, Any]:
    """Keyword arguments of diffusers' `AutoencoderKL(**kwargs)` for our config."""
    _require_kl(cfg)
    if cfg.attn_resolutions:
        raise ValueError("diffusers' AutoencoderKL cannot express attn_resolutions; only the mid-block attention")
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError(f"diffusers' AutoencoderKL ties latent and z channels: embed_dim = {cfg.embed_dim} "
                         f"!= z_channels = {cfg.z_channels}")
    n = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.embed_dim,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.resolution,
        "scaling_factor": 1.0 if scaling_factor is None else float(scaling_factor),
        "shift_factor": None if shift_factor is None else float(shift_factor),
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": cfg.mid_attention,
    }


def config_from_diffusers(dcfg: Mapping[str, Any]) -> AutoencoderConfig:
    """diffusers AutoencoderKL config (dict or FrozenDict) -> our AutoencoderConfig."""
    blocks = list(dcfg.get("block_out_channels", (64,)))
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise ValueError(f"block_out_channels = {blocks} are not multiples of the first width")
    for key, want in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True)):
        if dcfg.get(key, want) != want:
            raise ValueError(f"diffusers config {key} = {dcfg.get(key)!r} is not supported (need {want!r})")
    for key in ("down_block_types", "up_block_types"):
        kinds = set(dcfg.get(key, ()))
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ValueError(f"diffusers config {key} = {sorted(kinds)} is not supported")
    latent = int(dcfg.get("latent_channels", 4))
    cfg = AutoencoderConfig(
        in_channels=int(dcfg.get("in_channels", 3)), out_channels=int(dcfg.get("out_channels", 3)),
        resolution=int(dcfg.get("sample_size", 256) or 256), ch=ch, ch_mult=tuple(b // ch for b in blocks),
        num_res_blocks=int(dcfg.get("layers_per_block", 1)), z_channels=latent, embed_dim=latent,
        norm_groups=int(dcfg.get("norm_num_groups", 32)),
        mid_attention=bool(dcfg.get("mid_block_add_attention", True)), regularizer="kl")
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- LDM / Stable Diffusion

def to_ldm(sd: Mapping[str, torch.Tensor], cfg: AutoencoderConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our state dict -> LDM first-stage keys; `prefix="first_stage_model."` for a full SD checkpoint."""
    _require_kl(cfg)
    ours = _reference_shapes(cfg)
    mapping = {k: prefix + _ldm_key(k) for k in ours}
    shapes = {mapping[k]: s for k, s in ours.items()}
    return _convert(sd, mapping, shapes, "to_ldm", ignore=_OURS_ONLY)


def from_ldm(sd: Mapping[str, Any], cfg: Optional[AutoencoderConfig] = None) -> dict[str, torch.Tensor]:
    """LDM / SD checkpoint -> our state dict.

    Accepts a bare first-stage dict, a `{"state_dict": ...}` wrapper, or a full SD checkpoint
    (only `first_stage_model.*` keys are taken). LDM's training-loss keys (`loss.*`: LPIPS,
    discriminator, logvar) are dropped. Without `cfg` the architecture is read off the shapes.
    """
    sd = _first_stage(sd)
    cfg = cfg or config_from_ldm_state_dict(sd)
    _require_kl(cfg)
    ours = _reference_shapes(cfg)
    mapping = {_ldm_key(k): k for k in ours}
    return _convert(sd, mapping, ours, "from_ldm", ignore=("loss.",))


def _first_stage(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    return dict(sd)


def config_from_ldm_state_dict(sd: Mapping[str, Any], resolution: int = 256) -> AutoencoderConfig:
    """Infer the KL architecture from LDM-layout tensor shapes (`resolution` only places attention)."""
    sd = _first_stage(sd)
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
        attn = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
        quant_out = sd["quant_conv.weight"].shape[0]
        embed_dim = sd["post_quant_conv.weight"].shape[1]
        if quant_out != 2 * embed_dim:
            raise ValueError("quant_conv does not output mean and log-variance: not a KL autoencoder")
        cfg = AutoencoderConfig(
            in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
            resolution=resolution, ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks),
            z_channels=sd["decoder.conv_in.weight"].shape[1], embed_dim=embed_dim, attn_resolutions=attn,
            mid_attention="encoder.mid.attn_1.q.weight" in sd, regularizer="kl")
    except KeyError as e:
        raise KeyError(f"not an LDM first-stage state dict: no {e}") from None
    cfg.validate()
    return cfg


def config_from_ldm_yaml(params: Mapping[str, Any]) -> AutoencoderConfig:
    """LDM's `model.params` (embed_dim + ddconfig) -> our AutoencoderConfig."""
    dd = params["ddconfig"]
    cfg = AutoencoderConfig(
        in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3), resolution=dd.get("resolution", 256),
        ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"], z_channels=dd["z_channels"],
        embed_dim=params["embed_dim"], attn_resolutions=tuple(dd.get("attn_resolutions", ())),
        dropout=dd.get("dropout", 0.0), regularizer="kl" if dd.get("double_z", True) else "vq",
        n_embed=params.get("n_embed", 8192))
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- import (init.from)

def source_names(cfg: AutoencoderConfig, layout: str, our_keys) -> dict[str, str]:
    """{our key: its name in `layout`} ("diffusers" or "ldm") for initialising our autoencoder
    (launch/runtime/init.py); attention weights differ in shape only (1x1 conv vs linear)."""
    n = len(cfg.ch_mult)
    out = {}
    for k in our_keys:
        if k.startswith(_OURS_ONLY):
            continue
        try:
            out[k] = _diffusers_key(k, n) if layout == "diffusers" else _ldm_key(k)
        except ValueError:
            continue
    return out


def modernise_diffusers_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_modernise_diffusers_key(k): v for k, v in sd.items()}


def first_stage(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The first-stage part of an LDM / SD checkpoint (or the dict itself)."""
    return _first_stage(sd)
