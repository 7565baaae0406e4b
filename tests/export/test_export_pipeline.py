"""`ldm export --format diffusers` writes a complete pipeline: DiffusionPipeline.from_pretrained(OUT) loads a
tiny trained model's export (StableDiffusionPipeline with our open_clip tower as CLIPTextModel + CLIPTokenizer)
and its image from a prompt matches our own sampler's on the same noise."""
from __future__ import annotations

import json

import pytest
import torch

from export_helpers import RUN_FLAGS, cli, run_job

diffusers = pytest.importorskip("diffusers")
PROMPTS = ["a red circle on a blue background", "a white square on a black background"]


def _pipeline_export(name, synth_data, ae_export, tmp_path_factory, *overrides):
    """A 3-step unet-small run with no text mask and no latent shift (what StableDiffusionPipeline can
    express), exported with --format diffusers."""
    run = tmp_path_factory.mktemp("runs") / name
    run_job(["configs/ldm/unet-small.yaml", f"run_dir={run}", f"data.urls={synth_data}/00000.tar",
             "data.image_size=32", f"latents.autoencoder={ae_export}", "train.max_steps=3",
             "conditioning.use_text_mask=false", "latents.shift_factor=0", *overrides, *RUN_FLAGS], nproc=1)
    out = tmp_path_factory.mktemp("exports") / name
    rc, stdout, err = cli("export", run, out, "--format", "diffusers")
    assert rc == 0, err
    return out


def _ours_and_theirs(stage, pipe, steps: int, scale: float):
    """Images of our sampler and of the pipeline from the same initial noise (seed 7), in [0, 1]."""
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    z = stage.generate(stage.denoiser, {"caption": PROMPTS}, seed=7, cfg_scale=scale, steps=steps)
    ours = ((stage.decode(z) + 1) / 2).clamp(0, 1)
    with torch.no_grad():
        theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=scale, latents=noise.clone(), height=32,
                      width=32, output_type="pt").images
    return ours, theirs


@pytest.fixture(scope="module")
def pipeline_export(synth_data, ae_export, tmp_path_factory):
    return _pipeline_export("unet_pipe", synth_data, ae_export, tmp_path_factory)


def test_pipeline_loads_and_matches_our_sampler(pipeline_export):
    from launch.runtime.exportdir import load_pipeline

    out = pipeline_export
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["prediction_type"] == "epsilon"
    assert json.loads((out / "config.json").read_text())["diffusers_notices"] == []

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out)).to("cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    stage, config = load_pipeline(out)

    # tokenizer and text tower: the same ids and hidden states as open_clip's
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, stage.text_encoder.tokenize(PROMPTS))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    ours = stage.condition({"caption": PROMPTS})["context"]
    text_diff = float((hidden - ours).abs().max())

    ours_img, theirs = _ours_and_theirs(stage, pipe, steps=10, scale=3.0)
    img_diff = float((theirs - ours_img).abs().max())
    print(f"text hidden max|diff| {text_diff:.2e}; image max|diff| {img_diff:.2e} "
          f"(mean {float((theirs - ours_img).abs().mean()):.2e}); image std {float(theirs.std()):.3f}")
    assert text_diff < 1e-4
    assert theirs.shape == (2, 3, 32, 32) and float(theirs.std()) > 1e-3
    assert img_diff < 1e-3


def test_pipeline_notices_name_what_cannot_be_expressed():
    from launch.interop.export_pipeline import pipeline_notices, scheduler_config

    notes = pipeline_notices({"denoiser": {"kind": "unet"}, "conditioning": {"use_text_mask": True,
                              "null_embedding": "learned"}, "shift_factor": 0.1, "text_encoder": {"arch": "x"}})
    assert len(notes) == 3 and "mask" in notes[0] and "null caption" in notes[1] and "shift_factor" in notes[2]
    assert "T5" in pipeline_notices({"denoiser": {"kind": "dit"}})[0]
    flow = scheduler_config({"kind": "flow", "shift": 3.0}, {"sampler": "euler"})
    assert flow["_class_name"] == "FlowMatchEulerDiscreteScheduler" and flow["shift"] == 3.0
    v = scheduler_config({"kind": "v", "schedule": "cosine", "zero_terminal_snr": True}, {"sampler": "euler"})
    assert (v["_class_name"], v["prediction_type"], v["beta_schedule"], v["rescale_betas_zero_snr"]) == \
        ("EulerDiscreteScheduler", "v_prediction", "squaredcos_cap_v2", True)


@pytest.fixture(scope="module")
def flow_pipeline_export(synth_data, ae_export, tmp_path_factory):
    """A flow-matching unet-small (the demo's objective) as a StableDiffusionPipeline."""
    return _pipeline_export("unet_flow_pipe", synth_data, ae_export, tmp_path_factory, "objective.kind=flow",
                            "sampling.sampler=euler")


def test_flow_unet_pipeline_runs_and_first_order_equals_our_euler(flow_pipeline_export):
    """StableDiffusionPipeline cannot drive FlowMatchEulerDiscreteScheduler (no init_noise_sigma); the export
    writes DPM-Solver++ on flow sigmas. At order 1 that solver is exactly Euler on the flow ODE, so with the
    same sigmas the pipeline's image equals our Euler sampler's."""
    from diffusers import DPMSolverMultistepScheduler

    from launch.runtime.exportdir import load_pipeline

    out = flow_pipeline_export
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["prediction_type"], sched["use_flow_sigmas"]) == \
        ("DPMSolverMultistepScheduler", "flow_prediction", True)
    assert any("DPM-Solver++" in n for n in json.loads((out / "config.json").read_text())["diffusers_notices"])
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out)).to("cpu")
    default = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.0, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert default.shape == (2, 3, 32, 32) and float(default.std()) > 1e-3

    stage, _ = load_pipeline(out)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=1)
    ours, theirs = _ours_and_theirs(stage, pipe, steps=6, scale=3.0)
    diff = float((theirs - ours).abs().max())
    print(f"flow UNet pipeline (DPM-Solver++ order 1) vs our Euler: image max|diff| {diff:.2e}; "
          f"timesteps {pipe.scheduler.timesteps.tolist()}")
    assert diff < 1e-4
