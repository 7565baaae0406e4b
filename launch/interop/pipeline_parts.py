"""Pieces both pipeline writers use (launch/interop/export_pipeline.py for StableDiffusionPipeline,
launch/interop/export_sd3.py for StableDiffusion3Pipeline): an open_clip text tower as transformers'
CLIPTextModel or CLIPTextModelWithProjection, the CLIPTokenizer built offline from open_clip's BPE file, the
flow time shift at the model's own latent size, and the version strings the configs carry."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import torch


def flow_shift_at(objective: Mapping[str, Any], sampling: Mapping[str, Any],
                  denoiser: Optional[Mapping[str, Any]] = None) -> tuple[float, Optional[tuple[int, int]]]:
    """The flow time shift our sampler uses at the denoiser's own latent size: (shift, (h, w) or None).
    `shift: auto` is SD3's rule shift_base * sqrt(h w) / shift_base_latent (ldm/objectives.py)."""
    shift = sampling.get("flow_shift") or objective.get("shift", 1.0)
    if shift != "auto":
        return float(shift), None
    hw = (int(objective.get("shift_base_latent", 32)),) * 2
    if denoiser:
        from ldm.config import DenoiserConfig
        from ldm.training import latent_shape

        from launch.runtime.configio import build_dataclass

        hw = tuple(latent_shape(build_dataclass(DenoiserConfig, dict(denoiser), "denoiser"))[1:])
    base, base_latent = float(objective.get("shift_base", 1.0)), int(objective.get("shift_base_latent", 32))
    return base * math.sqrt(hw[0] * hw[1]) / base_latent, hw


# ----------------------------------------------------------------------------- text tower

def clip_text_from_open_clip(encoder, with_projection: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """ldm.text.OpenCLIPTextEncoder -> (CLIPTextConfig kwargs, CLIPTextModel state dict); with_projection:
    CLIPTextModelWithProjection (every block, text_projection = open_clip's, as SD3's text encoders)."""
    clip = encoder.clip
    text = getattr(clip, "text", None) or clip
    blocks = text.transformer.resblocks
    keep = len(blocks) - (1 if encoder.layer == "penultimate" and not with_projection else 0)
    b0 = blocks[0]
    if getattr(text, "attn_mask", None) is None:
        raise ValueError("the open_clip text tower has no causal mask; CLIPTextModel always has one")
    if not isinstance(getattr(b0, "ls_1", None), (torch.nn.Identity, type(None))):
        raise ValueError("the open_clip text tower uses layer scale, which CLIPTextModel has no slot for")
    quick = type(b0.mlp.gelu).__name__ == "QuickGELU"
    width = text.transformer.width
    pre = "text_model."
    sd = {f"{pre}embeddings.token_embedding.weight": text.token_embedding.weight,
          f"{pre}embeddings.position_embedding.weight": text.positional_embedding,
          f"{pre}final_layer_norm.weight": text.ln_final.weight, f"{pre}final_layer_norm.bias": text.ln_final.bias}
    for i in range(keep):
        b, p = blocks[i], f"{pre}encoder.layers.{i}."
        for j, n in enumerate("qkv"):
            sd[f"{p}self_attn.{n}_proj.weight"] = b.attn.in_proj_weight[j * width:(j + 1) * width]
            sd[f"{p}self_attn.{n}_proj.bias"] = b.attn.in_proj_bias[j * width:(j + 1) * width]
        sd[f"{p}self_attn.out_proj.weight"] = b.attn.out_proj.weight
        sd[f"{p}self_attn.out_proj.bias"] = b.attn.out_proj.bias
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")):
            mod = b.get_submodule(ours)
            sd[f"{p}{theirs}.weight"], sd[f"{p}{theirs}.bias"] = mod.weight, mod.bias
    if with_projection:
        proj = text.text_projection
        if isinstance(proj, torch.nn.Linear):
            if proj.bias is not None:
                raise ValueError("open_clip's text_projection has a bias; CLIPTextModelWithProjection's has none")
            sd["text_projection.weight"] = proj.weight
        else:
            sd["text_projection.weight"] = proj.t() if proj is not None else torch.eye(width)
    cfg = {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
           "model_type": "clip_text_model",
           "vocab_size": int(text.token_embedding.weight.shape[0]), "hidden_size": int(width),
           "intermediate_size": int(b0.mlp.c_fc.weight.shape[0]), "num_hidden_layers": keep,
           "num_attention_heads": int(b0.attn.num_heads), "max_position_embeddings": int(encoder.context_length),
           "hidden_act": "quick_gelu" if quick else "gelu", "layer_norm_eps": float(text.ln_final.eps),
           "projection_dim": int(encoder.pooled_dim), "bos_token_id": 49406, "eos_token_id": 49407,
           "pad_token_id": 0, "torch_dtype": "float32"}
    return cfg, {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path, context_length: int = 77) -> Path:
    """vocab.json + merges.txt from open_clip's own BPE file (exactly the vocabulary its SimpleTokenizer
    builds), then CLIPTokenizer saves its files. No network."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "_bpe"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), pad_token="!",
                        model_max_length=context_length)
    tok.save_pretrained(str(folder))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return folder


def _version(package: str, fallback: str) -> str:
    try:
        return __import__(package).__version__
    except Exception:  # writing needs neither installed
        return fallback


def _diffusers_version() -> str:
    return _version("diffusers", "0.30.0")


def _transformers_version() -> str:
    return _version("transformers", "4.40.0")
