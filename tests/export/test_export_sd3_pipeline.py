"""`ldm export --format diffusers` of an MMDiT run conditioned on two open_clip towers and a T5 (SD3's three
text encoders) writes a complete StableDiffusion3Pipeline: DiffusionPipeline.from_pretrained(OUT) loads it,
its encode_prompt gives our condition (context and pooled), and its few-step run from fixed latents gives
our Euler flow sampler's latents (launch/interop/export_sd3.py). Our own sampler from the export alone (`ldm
sample`: load_pipeline rebuilds our three encoders from text_encoder{,_2,_3}/) equals ours from the run's own
weights."""
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
    from launch.interop.sample import generate_latents, sample_export
    from launch.runtime.exportdir import load_pipeline
    from launch.runtime.runweights import ema_weights, open_run
    from ldm.text_encoders import build_text_encoders

    run, cfg_path = sd3_run
    out = tmp_path / "sd3"
    rc, stdout, err = cli("export", run, out, "--format", "diffusers")
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["diffusers"]["model_index.json"] == "StableDiffusion3Pipeline"
    assert config["text_encoder"] is None            # no single native tower standing in for the three
    assert config["text_encoder_folders"] == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert [e.get("model_config") or e.get("path") for e in config["text"]["encoders"]] == \
        ["text_encoder/open_clip/ldm-tiny-text.json", "text_encoder_2/open_clip/ldm-tiny-text.json", "text_encoder_3"]
    notes = config["diffusers_notices"]
    assert not any("no model_index" in n for n in notes) and any("max_sequence_length=16" in n for n in notes)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == pytest.approx(2.0)      # shift auto at 8x8 latents: 1.0 * sqrt(64) / 4
    assert all(f.suffix in (".json", ".safetensors", ".txt") for f in out.rglob("*") if f.is_file())

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out)).to("cpu")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__,
            type(pipe.text_encoder_3).__name__] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]

    # our sampler from the export alone (its text_encoder{,_2,_3}/ folders rebuilt as our encoders) against
    # ours from the run's own weights: the run config's encoders, the checkpoint's EMA denoiser
    stage, _ = load_pipeline(out)
    ref, _ = load_pipeline(out, text_encoder=False)
    ref.text_encoder = build_text_encoders(load_config(run / "config.yaml"))
    ref.denoiser.load_state_dict(ema_weights(open_run(run)))
    ref.setup(torch.device("cpu"))
    run_weights = ref.denoiser.state_dict()
    assert max(float((v - run_weights[k]).abs().max()) for k, v in stage.denoiser.state_dict().items()) == 0
    assert type(stage.text_encoder).__name__ == "TextEncoders" and stage.text_encoder.kinds == ["open_clip"] * 2 + ["t5"]
    ours = stage.condition({"caption": PROMPTS})
    export_vs_run = max(float((side[k] - run_side[k]).abs().max())
                        for side, run_side in ((ours, ref.condition({"caption": PROMPTS})),
                                               (stage.condition({"caption": [""]}), ref.condition({"caption": [""]})))
                        for k in ("context", "pooled"))
    rc, _, err = cli("sample", out, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", tmp_path / "cli",
                     "--no-progress")
    assert rc == 0, err
    sample_export(out, PROMPTS, tmp_path / "run_side", pipeline=(ref, config), progress=False)
    assert [(tmp_path / "cli" / f).read_bytes() == (tmp_path / "run_side" / f).read_bytes()
            for f in ("00000.png", "00001.png")] == [True, True]
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
    ref.denoiser.load_state_dict(stage.denoiser.state_dict())
    z_export, z_run = (generate_latents(s, PROMPTS, [0, 1], seed=0, steps=STEPS, cfg_scale=SCALE, sampler="euler",
                                        latent_shape=(4, 8, 8)) for s in (stage, ref))    # what `ldm sample` runs
    sampler_diff = float((z_export - z_run).abs().max())
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
    print(f"\nour sampler from the export vs from the run's weights: condition {export_vs_run:.2e}, {STEPS}-step "
          f"latents {sampler_diff:.2e}")
    print(f"SD3 pipeline vs ours: context {ctx_diff:.2e}, pooled {pooled_diff:.2e}, {STEPS}-step CFG-{SCALE:g} "
          f"latents {z_diff:.2e} (|z| max {float(z_ours.abs().max()):.2f}), decoded image {img_diff:.2e}; with "
          f"the scheduler's own spacing {spacing_gap:.2e}")
    assert export_vs_run < 1e-5 and sampler_diff < 1e-5 and float(z_run.std()) > 0.1
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


def test_sd3_medium_recipe_exports_to_a_full_pipeline(tmp_path):
    """configs/ldm/mmdit-sd3-medium.yaml computes SD3's condition (penultimate_raw towers of length 77, no text
    mask, empty null): with a T5-XXL-wide folder in place of its placeholder path, nothing keeps
    --format diffusers from writing the StableDiffusion3Pipeline. (Only T5's config.json is read here.)"""
    from launch.interop.export import text_encoder_problems
    from launch.interop.export_sd3 import sd3_problems
    from launch.runtime.config import load_config
    from launch.runtime.configio import to_plain

    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 4096}))
    cfg = load_config(REPO / "configs" / "ldm" / "mmdit-sd3-medium.yaml")
    plain = {"text": to_plain(cfg.text), "conditioning": to_plain(cfg.conditioning)}
    assert [e["layer"] for e in plain["text"]["encoders"][:2]] == ["penultimate_raw"] * 2
    plain["text"]["encoders"][2]["path"] = str(tmp_path / "t5")
    assert sd3_problems(plain) == []
    assert text_encoder_problems(cfg, "safetensors")     # the native layout still holds one tower only


def test_several_encoders_without_their_folders_name_what_is_missing(tmp_path):
    """A config.json listing text.encoders but no text_encoder_folders (no weights for them): load_text_encoders
    says so instead of failing on the absent single text_encoder section."""
    from launch.runtime.exportdir import load_text_encoders

    config = {"text_encoder": None, "text": {"encoders": [TOWER, dict(TOWER, init_seed=1)]}}
    with pytest.raises(FileNotFoundError, match="text_encoder_folders"):
        load_text_encoders(tmp_path, config)
    with pytest.raises(FileNotFoundError, match=r"text encoder 0 folder \S+/text_encoder not found"):
        load_text_encoders(tmp_path, {**config, "text_encoder_folders": ["text_encoder", "text_encoder_2"]})


def test_a_new_export_clears_the_sd3_folders_of_an_earlier_one(tmp_path):
    """Re-exporting into OUT removes every folder an SD3 export wrote there (no stale T5 beside a UNet)."""
    from launch.runtime.exportdir import clear_previous_export

    names = ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("kept")
    clear_previous_export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_one_tower_listed_in_text_encoders_is_the_exported_tower(tmp_path):
    """`text.encoders: [one open_clip tower]` leaves `text_encoder:` at its default (ViT-L-14): the export
    writes the listed tower, not the default (the native single-tower layout, loaded by load_text_encoder)."""
    from launch.interop.export import several_encoders, single_text_encoder
    from launch.runtime.config import load_config
    from launch.runtime.configio import to_plain

    cfg = yaml.safe_load((REPO / "configs" / "ldm" / "unet-small.yaml").read_text())
    del cfg["text_encoder"]
    cfg["text"] = {"encoders": [dict(TOWER, layer="penultimate", dropout_prob=0.1)]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_cfg = load_config(path)
    assert run_cfg.text_encoder.arch == "ViT-L-14" and not several_encoders(run_cfg)
    spec = to_plain(single_text_encoder(run_cfg))
    assert spec == {k: v for k, v in TOWER.items() if k != "kind"} | {"layer": "penultimate", "cache_dir": None,
                                                                       "init_seed": 0}
