"""The rest of a diffusers pipeline for `ldm export --format diffusers`: model_index.json, scheduler/,
text_encoder/ (transformers' CLIPTextModel) and tokenizer/ (CLIPTokenizer), beside the unet/ and vae/ of
launch/interop/export_diffusers.py, so `DiffusionPipeline.from_pretrained(OUT)` loads and samples.

Which runs export to a full pipeline (model_index.json):
- UNet + one open_clip tower (`layer` last or penultimate) -> StableDiffusionPipeline (below);
- MMDiT + `text.encoders` [open_clip, open_clip, t5], both towers `layer: penultimate_raw` with one context
  length, T5 at least as wide as the towers together, no text mask, empty-prompt null ->
  StableDiffusion3Pipeline (launch/interop/export_sd3.py, which lists the conditions).
Which do not (transformer/ or unet/, vae/ and scheduler/ only, the reason said before writing): a DiT
(PixArtAlphaPipeline wants T5, ours is one open_clip tower), an MMDiT with other text encoders, order,
layer or mask (SD3's pipeline would compute another condition), a UNet tower with `layer: penultimate_raw`
(CLIPTextModel always applies its final LayerNorm), a UNet with several text encoders.

- UNet -> StableDiffusionPipeline. The open_clip text tower (OpenAI / LAION CLIP form: open_clip's own
  text transformer) converts to CLIPTextModel as SD 2 did: `layer: penultimate` keeps all but the last
  block (CLIPTextModel's final layer norm then matches open_clip's normalised intermediate). The tokenizer
  is built offline from the BPE vocabulary open_clip ships (bpe_simple_vocab_16e6.txt.gz), padding with
  "!" (id 0) as open_clip pads with 0.
- Scheduler from the objective and sampling section: eps -> prediction_type epsilon, v -> v_prediction, with
  the beta schedule, spacing and zero-terminal-SNR rescale of the run, as DDIM / DDPM / Euler / Heun /
  DPM-Solver++ (the configured sampler); flow -> FlowMatchEulerDiscreteScheduler with the sampling shift for
  transformers, and for a UNet DPM-Solver++ on flow sigmas (StableDiffusionPipeline cannot drive the former).
- MMDiT: text_encoder/, text_encoder_2/ (CLIPTextModelWithProjection: all blocks, open_clip's
  text_projection as the projection), text_encoder_3/ (T5EncoderModel) and their tokenizers, when
  `sd3_problems` finds nothing; a fixed shift for the scheduler (shift auto: ours at the model's latent size).
- DiT: no pipeline (model_index.json) is written. The scheduler is still written.
What a pipeline cannot express (a padding mask on cross-attention, a learned null caption, a latent shift,
several text encoders) is listed by `pipeline_notices` before anything is written and kept in config.json.
The tower conversion, the tokenizer and the flow shift are in launch/interop/pipeline_parts.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .pipeline_parts import (_diffusers_version, _transformers_version, clip_text_from_open_clip,  # noqa: F401
                             flow_shift_at, write_clip_tokenizer)

_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
               "heun": "HeunDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def pipeline_notices(config: Mapping[str, Any]) -> list[str]:
    """What the diffusers pipeline of this stage-two export will not reproduce, and why."""
    den, cond = config.get("denoiser") or {}, config.get("conditioning") or {}
    notes = []
    if den.get("kind") == "mmdit":
        from .export_sd3 import sd3_notices, sd3_problems

        problems = sd3_problems(config)
        if problems:
            return [f"no model_index.json nor text encoders: StableDiffusion3Pipeline would compute another "
                    f"condition than ours ({'; '.join(problems)}); transformer/ (SD3Transformer2DModel), vae/ and "
                    "scheduler/ are written"]
        return sd3_notices(config)
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
    if (config.get("objective") or {}).get("kind") == "flow":
        notes.append(f"flow matching: the pipeline's scheduler is DPM-Solver++ on flow sigmas (what "
                     f"StableDiffusionPipeline can drive), not our {sampling.get('sampler', 'euler')} sampler")
    if sampling.get("guidance_interval"):
        notes.append("sampling.guidance_interval: the pipeline guides at every step")
    te = config.get("text_encoder") or {}
    if not te:
        notes.append("no text encoder spec: text_encoder/ and tokenizer/ are not written")
    elif te.get("layer") == "penultimate_raw":
        notes.append("no model_index.json nor text_encoder/: text_encoder.layer penultimate_raw (no final "
                     "LayerNorm) has no CLIPTextModel form (its last_hidden_state is always normalised)")
    return notes


# ----------------------------------------------------------------------------- scheduler

def scheduler_config(objective: Mapping[str, Any], sampling: Mapping[str, Any],
                     denoiser: Optional[Mapping[str, Any]] = None) -> dict:
    if objective.get("kind") == "flow" and (denoiser or {}).get("kind") == "unet":
        # StableDiffusionPipeline cannot drive FlowMatchEulerDiscreteScheduler (it scales the initial noise by
        # scheduler.init_noise_sigma, which that scheduler lacks); DPM-Solver++ on flow sigmas is the flow
        # scheduler it can: x0 = x_t - sigma * velocity, timesteps = 1000 sigma as ours
        shift = flow_shift_at(objective, sampling, denoiser)[0]
        return {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": _diffusers_version(),
                "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                "flow_shift": shift, "algorithm_type": "dpmsolver++", "solver_order": 2,
                "final_sigmas_type": "zero", "steps_offset": 1}
    if objective.get("kind") == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": _diffusers_version(),
                "num_train_timesteps": 1000, "shift": flow_shift_at(objective, sampling, denoiser)[0]}
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


# ----------------------------------------------------------------------------- the pipeline

def write_pipeline(out: Path, config: Mapping[str, Any], sub: str, dtype: str = "fp32",
                   text_encoder: Optional[torch.nn.Module] = None) -> dict:
    """scheduler/, and for a UNet text_encoder/ + tokenizer/ + model_index.json. Returns {folder: class}."""
    from launch.runtime.exportdir import load_text_encoder, write_safetensors

    written = {}
    sched = scheduler_config(config["objective"], config.get("sampling") or {}, config.get("denoiser"))
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    written["scheduler"] = sched["_class_name"]
    if (config.get("denoiser") or {}).get("kind") == "mmdit":
        from .export_sd3 import sd3_problems, write_sd3_text

        if not sd3_problems(config):
            written.update(write_sd3_text(out, config, dtype))
        return written
    if sub != "unet" or not config.get("text_encoder") or config["text_encoder"].get("layer") == "penultimate_raw":
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
