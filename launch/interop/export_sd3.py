"""The text side of a StableDiffusion3Pipeline for `ldm export --format diffusers` of an MMDiT run:
text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/ (transformers' CLIPTextModelWithProjection +
CLIPTokenizer, converted from our two open_clip towers), text_encoder_3/ + tokenizer_3/ (the T5 folder our
`text.encoders` entry names: T5EncoderModel + its tokenizer, saved again), and model_index.json, beside the
transformer/, vae/ and scheduler/ of launch/interop/export_diffusers.py and export_pipeline.py.
Our own sampler (`ldm sample`, launch/runtime/exportdir.py `load_text_encoders`) reads the same folders:
config.json's `text` section is rewritten to export-relative paths (`native_text`: the towers' open_clip
model-config JSON copied to text_encoder{,_2}/open_clip/, T5's tokenizer also saved in text_encoder_3/) and
`text_encoder_folders` names each encoder's folder; each tower is rebuilt from its arch and every tensor
taken back from the CLIPTextModelWithProjection weights (the conversion is lossless), so no second copy of
the towers is written.

What diffusers' StableDiffusion3Pipeline computes (`encode_prompt`), and what of ours must match it:

    CLIP i:  hidden_states[-2] of CLIPTextModelWithProjection (the penultimate block's output, no final
             LayerNorm), ids padded to tokenizer 1's model_max_length with "!" (id 0); pooled = text_embeds
             (final LayerNorm at the end-of-text token, projected by open_clip's text_projection)
    T5:      last_hidden_state, no attention mask, ids padded / truncated to the call's max_sequence_length
    join:    CLIP 1 ++ CLIP 2 on channels, zero-padded to T5's width, then ++ T5 on the sequence; pooled
             CLIP 1 ++ CLIP 2 -- which is ldm/text_encoders.py `join_text` for [open_clip, open_clip, t5]

A full pipeline (model_index.json and the six text folders) is written when the pipeline computes exactly
our condition (`sd3_problems` is empty):
- `text.encoders` is [open_clip, open_clip, t5], in that order;
- both towers take `layer: penultimate_raw` (our `penultimate` gets ln_final as SD2 did, `last` is the last
  block: the pipeline has neither) and have the same context length (the pipeline pads both to tokenizer 1's
  length); a tower has open_clip's own causal text transformer without layer scale;
- T5's width is at least the two towers' joined width (the pipeline pads CLIP to T5's width; ours pads to
  the wider, so a narrower T5 would be cropped there);
- `conditioning.use_text_mask: false` (SD3Transformer2DModel takes no mask) and `null_embedding: empty`
  (the pipeline's negative prompt is "" through all three encoders, our unconditional).
Otherwise transformer/, vae/ and scheduler/ are written and no text folder nor model_index.json; the reasons
are said before anything is written (`pipeline_notices`). What a caller sets and the pipeline cannot hold
(`sd3_notices`: max_sequence_length, our step spacing as `sigmas`, steps and guidance, shift auto at another
resolution) is said too, with the call that reproduces our sampler. Per-encoder dropout is train-time only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

SD3_KINDS = ["open_clip", "open_clip", "t5"]
SD3_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
_T5_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def text_entries(config: Mapping[str, Any]) -> list[dict]:
    """The export config's text encoders as plain dicts: `text.encoders`, else the single text_encoder."""
    encoders = (config.get("text") or {}).get("encoders") or []
    if encoders:
        return [dict(e) for e in encoders]
    te = config.get("text_encoder")
    return [{"kind": "open_clip", **dict(te)}] if te else []


def _open_clip_text_cfg(entry: Mapping[str, Any]) -> dict:
    import open_clip

    from ldm.text import resolve_model_config

    if entry.get("model_config"):
        open_clip.add_model_config(resolve_model_config(entry["model_config"]))
    cfg = open_clip.get_model_config(entry.get("arch", "ViT-L-14")) or {}
    text = dict(cfg.get("text_cfg") or {})
    text.setdefault("context_length", 77)
    text.setdefault("width", 512)
    if entry.get("context_length"):
        text["context_length"] = int(entry["context_length"])
    return text


def _t5_width(entry: Mapping[str, Any]) -> int:
    from ldm.t5 import resolve_t5_folder

    folder = resolve_t5_folder(entry.get("path") or "", "text.encoders[2].path")
    return int(json.loads((folder / "config.json").read_text())["d_model"])


def sd3_problems(config: Mapping[str, Any]) -> list[str]:
    """Why StableDiffusion3Pipeline would compute another condition than ours (empty: it computes ours)."""
    entries = text_entries(config)
    kinds = [e.get("kind", "open_clip") for e in entries]
    cond = config.get("conditioning") or {}
    problems = []
    if kinds != SD3_KINDS:
        problems.append(f"text encoders [{', '.join(kinds)}]: StableDiffusion3Pipeline joins exactly two CLIP "
                        "towers and one T5, in that order")
    else:
        try:
            texts = [_open_clip_text_cfg(e) for e in entries[:2]]
            t5_width = _t5_width(entries[2])
        except (FileNotFoundError, KeyError, ValueError) as e:
            problems.append(f"cannot read the text encoders' configs: {e}")
            texts, t5_width = [], None
        for i, e in enumerate(entries[:2]):
            if e.get("layer", "last") != "penultimate_raw":
                problems.append(f"text.encoders[{i}].layer {e.get('layer', 'last')!r}: the pipeline takes the "
                                "penultimate block's states without the final LayerNorm (hidden_states[-2]), "
                                "our 'penultimate_raw'")
        if texts:
            lengths = [t["context_length"] for t in texts]
            if lengths[0] != lengths[1]:
                problems.append(f"CLIP context lengths {lengths[0]} and {lengths[1]}: the pipeline pads both "
                                "towers' ids to tokenizer 1's length")
            clip_width = sum(int(t["width"]) for t in texts)
            if t5_width is not None and t5_width < clip_width:
                problems.append(f"T5 width {t5_width} < the CLIP towers' joined width {clip_width}: the pipeline "
                                "pads CLIP to T5's width (it would crop), ours pads T5")
    if cond.get("use_text_mask", True):
        problems.append("conditioning.use_text_mask: the model masks text padding out of attention; "
                        "SD3Transformer2DModel takes no mask")
    if cond.get("null_embedding", "empty") == "learned":
        problems.append("a learned null caption: the pipeline's negative is the encoded empty prompt")
    return problems


def sd3_notices(config: Mapping[str, Any]) -> list[str]:
    """What a caller of the exported pipeline must set to reproduce our sampler (the pipeline keeps none of it)."""
    from .pipeline_parts import flow_shift_at

    entries = text_entries(config)
    sampling, objective = config.get("sampling") or {}, config.get("objective") or {}
    steps, scale = int(sampling.get("steps", 50)), float(sampling.get("cfg_scale", 5.0))
    t5 = [e for e in entries if e.get("kind") == "t5"]
    length = int(t5[0].get("max_length", 256)) if t5 else 256
    call = (f"pipe(prompt, num_inference_steps={steps}, sigmas=[1 - i / {steps} for i in range({steps})], "
            f"guidance_scale={scale:g}" + (f", max_sequence_length={length}" if length != 256 else "") + ")")
    notes = [f"our sampler is reproduced by {call}: FlowMatchEulerDiscreteScheduler's own spacing ends at its "
             "sigma_min, ours takes equal steps in unshifted time to 0; the pipeline's defaults are 28 steps, "
             "guidance 7, T5 length 256"]
    if sampling.get("sampler", "ddim") != "euler":
        notes.append(f"sampling.sampler {sampling.get('sampler')!r}: the pipeline's scheduler is Euler")
    if objective.get("shift") == "auto" and not sampling.get("flow_shift"):
        shift, hw = flow_shift_at(objective, sampling, config.get("denoiser") or {})
        notes.append(f"objective.shift auto: the scheduler's shift {shift:g} is ours at {hw[0]}x{hw[1]} latents "
                     "(the model's size); at another size set pipe.scheduler's shift to shift_base * "
                     "sqrt(h w) / shift_base_latent")
    if sampling.get("guidance_interval") or sampling.get("guidance_rescale"):
        notes.append("sampling.guidance_interval / guidance_rescale: the pipeline guides at every step, unrescaled")
    if any(e.get("dropout_prob") for e in entries):
        notes.append("per-encoder dropout is train-time only: nothing to carry (the pipeline's negative prompt \"\" "
                     "through all three encoders is our unconditional)")
    return notes


# ----------------------------------------------------------------------------- writing

def write_sd3_text(out: Path, config: Mapping[str, Any], dtype: str = "fp32") -> dict:
    """text_encoder{,_2,_3}/ + tokenizer{,_2,_3}/ and model_index.json. Returns {folder: class}."""
    from transformers import AutoTokenizer, T5EncoderModel

    from ldm.config import TextEncoderEntry
    from ldm.t5 import resolve_t5_folder
    from ldm.text_encoders import build_one

    from launch.runtime.configio import build_dataclass
    from launch.runtime.exportdir import write_safetensors

    from .pipeline_parts import (_diffusers_version, _transformers_version, clip_text_from_open_clip,
                                 write_clip_tokenizer)

    for name in SD3_FOLDERS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    entries = text_entries(config)
    written = {}
    for i, entry in enumerate(entries[:2]):
        suffix = "" if i == 0 else "_2"
        encoder = build_one(build_dataclass(TextEncoderEntry, dict(entry), f"text.encoders[{i}]"), i)
        te_cfg, te_state = clip_text_from_open_clip(encoder, with_projection=True)
        folder = out / f"text_encoder{suffix}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({**te_cfg, "transformers_version": _transformers_version()},
                                                       indent=1))
        write_safetensors(te_state, folder / "model.safetensors", dtype, {"format": "pt"})
        write_clip_tokenizer(out / f"tokenizer{suffix}", encoder.context_length)
        written[f"text_encoder{suffix}"], written[f"tokenizer{suffix}"] = "CLIPTextModelWithProjection", "CLIPTokenizer"
    t5 = entries[2]
    folder = resolve_t5_folder(t5["path"], "text.encoders[2].path")
    model = T5EncoderModel.from_pretrained(str(folder), dtype=_T5_DTYPES[t5.get("dtype", "float32")])
    model.save_pretrained(str(out / "text_encoder_3"), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(out / "tokenizer_3"))
    tokenizer.save_pretrained(str(out / "text_encoder_3"))   # beside the model too: our T5 loader reads one folder
    written.update(text_encoder_3="T5EncoderModel", tokenizer_3="T5TokenizerFast")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": _diffusers_version(),
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", sched],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    written["model_index.json"] = "StableDiffusion3Pipeline"
    return written


def native_text(out: Path, config: Mapping[str, Any]) -> dict:
    """What our own sampler needs to rebuild the three encoders from the folders `write_sd3_text` wrote
    (launch/runtime/exportdir.py `load_text_encoders`): config.json's `text` section with export-relative
    paths (an open_clip model-config JSON copied to text_encoder{,_2}/open_clip/, the T5 entry's path
    text_encoder_3, which holds its tokenizer too) and `text_encoder_folders`, one folder per encoder."""
    from ldm.text import resolve_model_config

    entries = text_entries(config)
    folders = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    for entry, folder in zip(entries, folders):
        if entry.get("kind", "open_clip") == "t5":
            entry["path"] = folder
        elif entry.get("model_config"):
            src = resolve_model_config(entry["model_config"])
            dst = out / folder / "open_clip"
            if dst.exists():
                shutil.rmtree(dst)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.[!j]*"))
                entry["model_config"] = f"{folder}/open_clip"
            else:
                dst.mkdir(parents=True)
                shutil.copy2(src, dst / src.name)
                entry["model_config"] = f"{folder}/open_clip/{src.name}"
    return {"text": {**dict(config.get("text") or {}), "encoders": entries}, "text_encoder_folders": folders}
