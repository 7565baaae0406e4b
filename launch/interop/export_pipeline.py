"""The rest of a diffusers pipeline for `ldm export --format diffusers`: model_index.json, scheduler/,
text_encoder/ (transformers' CLIPTextModel) and tokenizer/ (CLIPTokenizer), beside the unet/ and vae/ of
launch/interop/export_diffusers.py, so `DiffusionPipeline.from_pretrained(OUT)` loads and samples.

- UNet -> StableDiffusionPipeline. The open_clip text tower (OpenAI / LAION CLIP form: open_clip's own
  text transformer) converts to CLIPTextModel as SD 2 did: `layer: penultimate` keeps all but the last
  block (CLIPTextModel's final layer norm then matches open_clip's normalised intermediate). The tokenizer
  is built offline from the BPE vocabulary open_clip ships (bpe_simple_vocab_16e6.txt.gz), padding with
  "!" (id 0) as open_clip pads with 0.
- Scheduler from the objective and sampling section: eps -> prediction_type epsilon, v -> v_prediction, with
  the beta schedule, spacing and zero-terminal-SNR rescale of the run, as DDIM / DDPM / Euler / Heun /
  DPM-Solver++ (the configured sampler); flow -> FlowMatchEulerDiscreteScheduler with the sampling shift.
- DiT / MMDiT: no pipeline (model_index.json) is written: PixArtAlphaPipeline and StableDiffusion3Pipeline
  expect T5 (and for SD3 two CLIP towers) as text encoders; ours is one open_clip tower. The scheduler is
  still written.
What a pipeline cannot express (a padding mask on cross-attention, a learned null caption, a latent shift,
several text encoders) is listed by `pipeline_notices` before anything is written and kept in config.json.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
               "heun": "HeunDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def pipeline_notices(config: Mapping[str, Any]) -> list[str]:
    """What the diffusers pipeline of this stage-two export will not reproduce, and why."""
    den, cond = config.get("denoiser") or {}, config.get("conditioning") or {}
    notes = []
    if den.get("kind") == "mmdit":
        notes.append("no model_index.json: StableDiffusion3Pipeline needs its three text encoders "
                     "(CLIPTextModelWithProjection x2 + T5EncoderModel), which this export does not write yet; "
                     "transformer/ (SD3Transformer2DModel), vae/ and scheduler/ are written; SD3's transformer "
                     "takes no text mask")
        return notes
    if den.get("kind") != "unet":
        notes.append(f"no model_index.json: diffusers' pipeline for a {den.get('kind')} "
                     f"({'PixArtAlphaPipeline' if den.get('kind') == 'dit' else 'StableDiffusion3Pipeline'}) "
                     "expects T5 text encoders, and this model is conditioned on one open_clip tower; "
                     "transformer/, vae/ and scheduler/ are written")
        return notes
    if cond.get("use_text_mask", True):
        notes.append("conditioning.use_text_mask: the model was trained with padding tokens masked out of "
                     "cross-attention; StableDiffusionPipeline passes no mask, so its images differ from ours")
    if cond.get("null_embedding") == "learned":
        notes.append("the learned null caption has no slot in the pipeline: its negative prompt is the "
                     "encoded empty prompt")
    if config.get("shift_factor"):
        notes.append(f"latent shift_factor {config['shift_factor']}: StableDiffusionPipeline divides by "
                     "scaling_factor only and ignores vae.config.shift_factor")
    sampling = config.get("sampling") or {}
    if sampling.get("guidance_interval"):
        notes.append("sampling.guidance_interval: the pipeline guides at every step")
    te = config.get("text_encoder") or {}
    if not te:
        notes.append("no text encoder spec: text_encoder/ and tokenizer/ are not written")
    return notes


# ----------------------------------------------------------------------------- scheduler

def scheduler_config(objective: Mapping[str, Any], sampling: Mapping[str, Any]) -> dict:
    if objective.get("kind") == "flow":
        shift = sampling.get("flow_shift") or objective.get("shift", 1.0)
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": _diffusers_version(),
                "num_train_timesteps": 1000, "shift": float(shift if shift != "auto" else
                                                            objective.get("shift_base", 1.0))}
    name = _SCHEDULERS.get(sampling.get("sampler", "ddim"), "DDIMScheduler")
    out = {"_class_name": name, "_diffusers_version": _diffusers_version(),
           "num_train_timesteps": int(objective.get("num_timesteps", 1000)),
           "beta_start": float(objective.get("beta_start", 0.00085)),
           "beta_end": float(objective.get("beta_end", 0.012)),
           "beta_schedule": _BETAS[objective.get("schedule", "scaled_linear")],
           "prediction_type": "v_prediction" if objective.get("kind") == "v" else "epsilon",
           "timestep_spacing": sampling.get("spacing", "trailing"),
           # only "leading" spacing reads steps_offset; 1 elsewhere keeps diffusers' deprecation check quiet
           "steps_offset": 0 if sampling.get("spacing", "trailing") == "leading" else 1,
           "rescale_betas_zero_snr": bool(objective.get("zero_terminal_snr", False))}
    if name in ("DDIMScheduler", "DDPMScheduler"):
        clip = sampling.get("clip_x0")
        out.update(clip_sample=clip is not None, clip_sample_range=float(clip or 1.0))
    if name == "DDIMScheduler":
        out.update(set_alpha_to_one=False)
    return out


# ----------------------------------------------------------------------------- text tower

def clip_text_from_open_clip(encoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """ldm.text.OpenCLIPTextEncoder -> (CLIPTextConfig kwargs, CLIPTextModel state dict)."""
    clip = encoder.clip
    text = getattr(clip, "text", None) or clip
    blocks = text.transformer.resblocks
    keep = len(blocks) - (1 if encoder.layer == "penultimate" else 0)
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
    cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
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


# ----------------------------------------------------------------------------- the pipeline

def write_pipeline(out: Path, config: Mapping[str, Any], sub: str, dtype: str = "fp32",
                   text_encoder: Optional[torch.nn.Module] = None) -> dict:
    """scheduler/, and for a UNet text_encoder/ + tokenizer/ + model_index.json. Returns {folder: class}."""
    from launch.runtime.exportdir import load_text_encoder, write_safetensors

    written = {}
    sched = scheduler_config(config["objective"], config.get("sampling") or {})
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    written["scheduler"] = sched["_class_name"]
    if sub != "unet" or not config.get("text_encoder"):
        return written
    encoder = text_encoder if text_encoder is not None else load_text_encoder(out, dict(config))
    te_cfg, te_state = clip_text_from_open_clip(encoder)
    folder = out / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**te_cfg, "transformers_version": _transformers_version()},
                                                   indent=1))
    write_safetensors(te_state, folder / "model.safetensors", dtype, {"format": "pt"})
    write_clip_tokenizer(out / "tokenizer", encoder.context_length)
    written.update(text_encoder="CLIPTextModel", tokenizer="CLIPTokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
             "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", sched["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    written["model_index.json"] = "StableDiffusionPipeline"
    return written


def _version(package: str, fallback: str) -> str:
    try:
        return __import__(package).__version__
    except Exception:  # writing needs neither installed
        return fallback


def _diffusers_version() -> str:
    return _version("diffusers", "0.30.0")


def _transformers_version() -> str:
    return _version("transformers", "4.40.0")
