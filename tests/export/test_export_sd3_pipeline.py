"""`ldm export --format diffusers` of an MMDiT run conditioned on two open_clip towers and a T5 (SD3's three
text encoders) writes a complete StableDiffusion3Pipeline: DiffusionPipeline.from_pretrained(OUT) loads it,
its encode_prompt gives our condition (context and pooled), and its few-step run from fixed latents gives
our Euler flow sampler's latents (launch/interop/export_sd3.py)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from export_helpers import REPO, RUN_FLAGS, cli, run_job

diffusers = pytest.importorskip("diffusers")
PROMPTS = ["a red circle on a blue background", "a white square on a black background"]
TOWER = {"kind": "open_clip", "arch": "ldm-tiny-text", "model_config": "configs/ldm/open_clip/ldm-tiny-text.json",
         "pretrained": None, "context_length": 16, "layer": "penultimate_raw"}   # width 128, pooled 64
T5_WIDTH, T5_LENGTH = 288, 16      # wider than the towers together (256): the join zero-pads CLIP's channels
STEPS, SCALE = 4, 3.0


def _save_tiny_t5(folder):
    spec = importlib.util.spec_from_file_location("ldm_tests_conftest_t5", REPO / "tests" / "ldm" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_tiny_t5(folder, d_model=T5_WIDTH)


def _config(run, synth_data, ae_export, t5, **text_over):
    cfg = yaml.safe_load((REPO / "configs" / "ldm" / "unet-small.yaml").read_text())
    del cfg["text_encoder"]
    cfg.update(run_dir=str(run), objective={"kind": "flow", "shift": "auto", "shift_base": 1.0,
                                            "shift_base_latent": 4},
               denoiser={"kind": "mmdit", "pooled_dim": 128,
                         "mmdit": {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
                                   "num_heads": 4, "context_dim": T5_WIDTH, "qk_norm": "rms"}},
               text={"encoders": [dict(TOWER, **text_over), dict(TOWER, init_seed=1, dropout_prob=0.2),
                                  {"kind": "t5", "path": str(t5), "max_length": T5_LENGTH, "dropout_prob": 0.2}]},
               conditioning={"dropout_prob": 0.1, "null_embedding": "empty", "use_text_mask": False},
               sampling={"sampler": "euler", "steps": STEPS, "cfg_scale": SCALE})
    cfg["data"].update(urls=[f"{synth_data}/00000.tar"], image_size=32)
    cfg["latents"].update(autoencoder=str(ae_export))
    cfg["train"].update(max_steps=2)
    return cfg


@pytest.fixture(scope="module")
def sd3_run(synth_data, ae_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    t5 = _save_tiny_t5(root / "t5")
    cfg_path = root / "mmdit-sd3.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(root / "run", synth_data, ae_export, t5)))
    run_job([str(cfg_path), *RUN_FLAGS], nproc=1)
    return root / "run", cfg_path


def test_sd3_pipeline_encodes_and_samples_as_ours(sd3_run, tmp_path):
    from launch.interop.export_diffusers import write_denoiser
    from launch.runtime.config import load_config
    from launch.runtime.exportdir import load_pipeline
    from ldm.text_encoders import build_text_encoders

    run, cfg_path = sd3_run
    out = tmp_path / "sd3"
    rc, stdout, err = cli("export", run, out, "--format", "diffusers")
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["diffusers"]["model_index.json"] == "StableDiffusion3Pipeline"
    assert config["text_encoder"] is None            # no single native tower standing in for the three
    notes = config["diffusers_notices"]
    assert not any("no model_index" in n for n in notes) and any("max_sequence_length=16" in n for n in notes)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == pytest.approx(2.0)      # shift auto at 8x8 latents: 1.0 * sqrt(64) / 4
    assert all(f.suffix in (".json", ".safetensors", ".txt") for f in out.rglob("*") if f.is_file())

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out)).to("cpu")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__,
            type(pipe.text_encoder_3).__name__] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]

    stage, _ = load_pipeline(out, text_encoder=False)
    stage.text_encoder = build_text_encoders(load_config(run / "config.yaml"))
    stage.setup(torch.device("cpu"))
    ours = stage.condition({"caption": PROMPTS})
    with torch.no_grad():
        ctx, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                               max_sequence_length=T5_LENGTH)
    assert ctx.shape == ours["context"].shape == (2, 16 + T5_LENGTH, T5_WIDTH)
    ctx_diff = float((ctx - ours["context"]).abs().max())
    pooled_diff = float((pooled - ours["pooled"]).abs().max())
    assert float(ours["context"][:, :16, 256:].abs().max()) == 0 and float(ours["context"].std()) > 0.1

    # 2 training steps leave the zero-initialised output layer near zero: perturb ours, give the pipeline the
    # same weights (written by the export's own writer), then sample both from the same latents
    torch.manual_seed(1)
    with torch.no_grad():
        for p in stage.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    write_denoiser(tmp_path / "perturbed", config["denoiser"], stage.denoiser.state_dict())
    pipe.transformer = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "perturbed",
                                                                       subfolder="transformer").eval()
    seed = 7
    z_ours = stage.generate(stage.denoiser, {"caption": PROMPTS}, seed=seed)        # sampling: euler, 4, cfg 3
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z_theirs = pipe(PROMPTS, num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
                        guidance_scale=SCALE, max_sequence_length=T5_LENGTH, latents=noise.clone(), height=32,
                        width=32, output_type="latent").images
        default = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, max_sequence_length=T5_LENGTH,
                        latents=noise.clone(), height=32, width=32, output_type="latent").images
        image = pipe(PROMPTS, num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
                     guidance_scale=SCALE, max_sequence_length=T5_LENGTH, latents=noise.clone(), height=32,
                     width=32, output_type="pt").images
    img_diff = float((image - ((stage.decode(z_ours) + 1) / 2).clamp(0, 1)).abs().max())
    z_diff = float((z_theirs - z_ours).abs().max())
    spacing_gap = float((default - z_ours).abs().max())
    print(f"\nSD3 pipeline vs ours: context {ctx_diff:.2e}, pooled {pooled_diff:.2e}, {STEPS}-step CFG-{SCALE:g} "
          f"latents {z_diff:.2e} (|z| max {float(z_ours.abs().max()):.2f}), decoded image {img_diff:.2e}; with "
          f"the scheduler's own spacing {spacing_gap:.2e}")
    assert ctx_diff < 1e-4 and pooled_diff < 1e-4
    # fp32 throughout, so the two sides differ by rounding only (about 1e-6 for the text, the latents and the
    # image, with |z| up to ~4): 1e-4 leaves ~100x headroom and stays ~1000x below what one wrong piece gives
    # (the scheduler's own step spacing instead of ours: ~8e-2; a wrong join or layer: the text check above)
    assert z_diff < 1e-4 and img_diff < 1e-4
    assert float(image.std()) > 1e-3
    assert spacing_gap > 1e-2     # the sigmas are what makes the two samplers one


def test_sd3_pipeline_refused_where_it_would_compute_another_condition(synth_data, ae_export, tmp_path):
    """A tower with our SD2-style penultimate layer (ln_final applied): no text folders nor model_index.json,
    said before writing; the native single-tower export of the three encoders is still refused."""
    from launch.interop.export import text_encoder_problems
    from launch.interop.export_pipeline import pipeline_notices
    from launch.interop.export_sd3 import sd3_problems
    from launch.runtime.config import load_config
    from launch.runtime.configio import to_plain

    t5 = _save_tiny_t5(tmp_path / "t5")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "run", synth_data, ae_export, t5, layer="penultimate")))
    cfg = load_config(path)
    plain = {"denoiser": to_plain(cfg.denoiser), "text": to_plain(cfg.text), "conditioning": to_plain(cfg.conditioning)}
    problems = sd3_problems(plain)
    assert len(problems) == 1 and "text.encoders[0].layer 'penultimate'" in problems[0]
    assert "no model_index.json" in pipeline_notices(plain)[0]
    assert text_encoder_problems(cfg, "diffusers") and text_encoder_problems(cfg, "safetensors")
    more = sd3_problems({**plain, "conditioning": {"use_text_mask": True, "null_embedding": "learned"},
                         "text": {"encoders": plain["text"]["encoders"][::-1]}})
    assert len(more) == 3 and "two CLIP towers and one T5" in more[0]
