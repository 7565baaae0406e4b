"""`ldm demo` end to end at toy scale: every phase runs through the real runtime (two `ldm train`
subprocesses on DeepSpeed), writes its report with numbers in range, a second run reuses every phase,
`--redo` runs one again, and the README block is regenerated from the report; stage two logs the fixed-t
validation curve (issue 20) and `ldm ema --sweep` scores post-hoc EMA reconstructions of that run by it;
`--finetune` adds its LoRA phases; the export loads as a diffusers pipeline. One toy demo serves every test.
The full-size demo and its acceptance figures (PSNR, adherence, the finetune's new color) come from
`make demo` and are printed into the README by it."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

import harness as H
from launch.demo.run import VAL_EVERY, DemoSettings, run_demo
from launch.demo.report import README_END, README_START, update_readme
from launch.runtime.validation import UNIT_TIMES

TINY = dict(train_images=128, val_images=32, holdout_images=24, shard_size=64, samples_per_triple=1,
            holdout_samples_per_triple=2, threads=2, tier_options={"color_sweep_images": 32})
STAGE1 = ["train.max_steps=12", "train.log_every=4", "validation.every=6", "validation.sample_every=12",
          "autoencoder.latent_stats_batches=1", "data.num_workers=0", "train.checkpoint_every=12"]
STAGE2 = ["train.max_steps=12", "train.log_every=4", "validation.sample_every=12", "data.num_workers=0",
          "train.checkpoint_every=12", "sampling.steps=4", "validation.every=6", "ema.posthoc.snapshot_every=3"]
T_KEYS = [f"val_loss_u{u:g}" for u in UNIT_TIMES]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One toy-scale demo for every test here (each full phase chain costs about a minute)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    logs: list[str] = []
    settings = DemoSettings(out=out, overrides_stage1=STAGE1, overrides_stage2=STAGE2, **TINY)
    summary = run_demo(settings, log=logs.append)
    return {"out": out, "settings": settings, "summary": summary, "logs": logs}


def test_demo_runs_every_phase_reports_and_reuses(demo, tmp_path):
    out, settings, summary, logs = demo["out"], demo["settings"], demo["summary"], list(demo["logs"])

    assert summary["images"] == {"train": 128, "val": 32, "holdout": 24, "color_sweep": 32}
    # stage one read the colour sweep besides the train shards; stage two only the train shards' latents
    ae_urls = yaml.safe_load((out / "runs/autoencoder/config.yaml").read_text())["data"]["urls"]
    assert [Path(u).parent.name for u in ae_urls] == ["train", "color_sweep"], ae_urls
    dm_urls = yaml.safe_load((out / "runs/diffusion/config.yaml").read_text())["data"]["urls"]
    assert [Path(u).parent.name for u in dm_urls] == ["latents"], dm_urls
    assert 5.0 < summary["recon_psnr_holdout"] < 100.0 and summary["scaling_factor"] > 0
    adh = summary["adherence"]
    assert adh["n"] == 168 + 3 * 1            # every triple once, the held-out ones twice
    assert summary["adherence_held_out"]["n"] == 6
    for key in ("color", "shape", "background"):
        assert 0.0 <= adh[key] <= 1.0
    for phase in ("data", "stage1", "export1", "recon", "precompute", "stage2", "export2", "sample", "adherence"):
        assert summary["timings_s"][phase] >= 0, phase
    for path in ("report.md", "loss_curves.png", "samples/grid.png", "export/config.json",
                 "export/model.safetensors", "runs/diffusion/metrics.jsonl", "runs/autoencoder/checkpoints/latest"):
        assert (out / path).is_file(), path
    assert json.loads((out / "runs" / "diffusion" / "result.json").read_text())["status"] == "completed"
    assert any("overall ETA" in line for line in logs)
    assert summary["sampling"]["steps"] == 4 and summary["sampling"]["cfg_scale"] > 1   # what the scores used

    # a second run reuses every phase but the report; --redo runs the named one again and every later one
    # (new samples must be judged again), reusing those before it
    logs.clear()
    run_demo(settings, log=logs.append)
    assert sum("reused" in line for line in logs) == 9, logs
    logs.clear()
    run_demo(settings, redo={"sample"}, log=logs.append)
    assert sum("reused" in line for line in logs) == 7, logs
    assert not any(("prompt adherence" in line or "sample from" in line) and "reused" in line for line in logs)

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n")
    update_readme(out, readme, tmp_path / "assets")
    text = readme.read_text()
    assert "old" not in text and f"{summary['recon_psnr_holdout']:.2f} dB" in text
    assert (tmp_path / "assets" / "demo_grid.png").is_file()


def test_finetune_teaches_a_new_color_with_lora_on_the_demo(demo):
    """`ldm demo --finetune` on top: LoRA from the base export, judged before and after with pink known; its
    section lands in report.md once, also after the base report is rewritten. (The >= 90 % figure is the full
    demo's, printed into the README by `ldm demo --finetune --readme`.)"""
    out, settings, logs = demo["out"], demo["settings"], []
    from launch.demo.finetune import FinetuneSettings, run_finetune

    ft = run_finetune(settings, FinetuneSettings(images=64, replay_images=64, steps=6, samples_per_triple=1),
                      log=logs.append)
    assert ft["new_color_before"]["n"] == ft["new_color_after"]["n"] == 24
    assert ft["old_colors_after"]["n"] == 168 and ft["train_result"]["status"] == "completed"
    for path in ("finetune/report.md", "finetune/samples/before/grid.png", "finetune/samples/after/grid.png",
                 "finetune/export/model.safetensors"):
        assert (out / path).is_file(), path
    assert json.loads((out / "finetune/export/config.json").read_text())["lora"]["merged"] is True
    run_demo(settings, log=logs.append)
    run_finetune(settings, FinetuneSettings(images=64, replay_images=64, steps=6, samples_per_triple=1),
                 log=logs.append)
    assert (out / "report.md").read_text().count("Fine-tuning a new color") == 1


def test_demo_export_loads_as_a_diffusers_pipeline(demo, tmp_path):
    """The demo export as a diffusers pipeline a server loads (what it cannot express is listed in config.json)."""
    out = demo["out"]
    import diffusers
    import torch

    from launch.interop.export import export_run

    pipe_dir = export_run(out / "runs" / "diffusion", tmp_path / "demo_pipeline", fmt="diffusers",
                          autoencoder=out / "stage1_export")
    notices = json.loads((pipe_dir / "config.json").read_text())["diffusers_notices"]
    assert any("mask" in n for n in notices)          # the demo trains with padding masked out
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipe_dir)).to("cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    image = pipe("a red circle on a blue background", num_inference_steps=4, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 1e-3


def test_demo_stage_two_logs_the_fixed_t_validation_curve(demo):
    run = demo["out"] / "runs" / "diffusion"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["val_urls"] and "latents_val" in str(cfg["data"]["val_urls"]), cfg["data"]
    assert sorted(p.name for p in (demo["out"] / "data" / "latents_val").glob("*.tar")) == ["00000.tar"]
    pre = json.loads((demo["out"] / ".demo" / "precompute.json").read_text())["result"]
    assert pre["val"]["samples"] == 32, pre

    records = H.metrics(run)
    vals = {r["step"]: r for r in records if "val/val_loss" in r}
    checkpoints = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert sorted(vals) == [0, 6, 12] and set(checkpoints) <= set(vals), (sorted(vals), checkpoints)
    for step, r in vals.items():
        for prefix in ("val/", "val_ema/"):
            for k in ["val_loss", *T_KEYS]:
                assert math.isfinite(r[prefix + k]), (step, prefix + k)
        assert r["val/val_loss"] == pytest.approx(sum(r["val/" + k] for k in T_KEYS) / len(T_KEYS))

    page = (run / "report.html").read_text()
    assert 'alt="per-t validation"' in page and "no fixed-t validation in this run" not in page
    assert 'alt="training and validation loss"' in page


def test_demo_default_validates_at_every_checkpoint():
    """The full demo (configs/demo/diffusion.yaml) checkpoints at 500, 1000 and its last step: each is a
    validation step of the demo's default validation.every."""
    cfg = yaml.safe_load((H.REPO / "configs" / "demo" / "diffusion.yaml").read_text())["train"]
    steps = list(range(cfg["checkpoint_every"], cfg["max_steps"], cfg["checkpoint_every"])) + [cfg["max_steps"]]
    assert all(s % VAL_EVERY == 0 for s in steps), (steps, VAL_EVERY)


def test_ldm_ema_sweep_cli_names_the_best_sigma_rel(demo, tmp_path):
    run = demo["out"] / "runs" / "diffusion"
    assert sorted(p.name for p in (run / "phema").glob("step_*")) == [f"step_{s:08d}" for s in (3, 6, 9, 12)]
    out = tmp_path / "sweep"
    sigmas = ["0.03", "0.1", "0.2"]
    proc = H.run(["ema", str(run), "--sweep", "--sigma-rel", *sigmas, "--out", str(out)], nproc=1, script=H.LDM,
                 timeout=300)
    H.assert_ok(proc)
    printed = {float(s): float(v) for s, v in re.findall(r"sigma_rel ([0-9.]+): val_loss ([0-9.]+)", proc.stdout)}
    assert sorted(printed) == [float(s) for s in sigmas], proc.stdout
    best = re.search(r"best sigma_rel ([0-9.]+) \(step (\d+)\)", proc.stdout)
    assert best and int(best.group(2)) == 12, proc.stdout
    assert re.search(rf"sigma_rel {best.group(1)}: val_loss [0-9.]+  <- best", proc.stdout), proc.stdout
    result = json.loads((out / "sweep.json").read_text())
    losses = {float(k): v for k, v in result["losses"].items()}
    print("ldm ema --sweep on the tiny demo run:", result)
    assert result["step"] == 12 and float(best.group(1)) == result["best"] == min(losses, key=losses.get)
    assert all(math.isfinite(v) for v in losses.values()) and len(set(losses.values())) == len(sigmas)
    assert all(abs(printed[s] - losses[s]) < 1e-6 for s in losses)


def test_training_log_shows_mfu_peak_memory_and_data_counters(demo):
    """Both demo stages log MFU and peak memory per window (launch/runtime/throughput.py) and the loader's
    shard counters; the FLOPs per step are the counted real micro-step (UNet training: forward + about twice
    that backward) and stay the same from window to window."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from launch.runtime.exportdir import load_pipeline

    for name in ("autoencoder", "diffusion"):
        windows = [r for r in H.metrics(demo["out"] / "runs" / name) if "img_per_s" in r]
        assert windows, name
        for r in windows:
            assert 0 < r["perf/mfu"] < 1 and r["perf/tflops_per_s"] > 0, (name, r)
            assert r["mem/peak_rss_bytes"] > 100 * 2 ** 20, (name, r)
            assert r["data/bad_shards"] == 0 and r["data/retries"] == 0, (name, r)
        assert windows[-1]["data/shards_read"] >= 1, name     # counted when a shard ends
        assert len({r["perf/flops_per_step"] for r in windows}) == 1, name
    stage, cfg = load_pipeline(demo["out"] / "export", "cpu")
    batch = yaml.safe_load((demo["out"] / "runs" / "diffusion" / "config.yaml").read_text())["train"]
    micro = batch["micro_batch_size"] * batch["grad_accum_steps"]
    net = stage.denoiser
    ch, size = net.cfg.in_channels, net.cfg.sample_size
    cond = stage.condition({"caption": ["a red circle on a blue background"] * micro})
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(micro, ch, size, size), torch.rand(micro), **cond)
    ratio = windows[-1]["perf/flops_per_step"] / counter.get_total_flops()
    print(f"demo stage two: FLOPs per step {windows[-1]['perf/flops_per_step']:.3e} = {ratio:.2f} x a forward; "
          f"MFU {windows[-1]['perf/mfu']:.1%} of {windows[-1]['perf/peak_tflops']:.3f} TFLOP/s measured")
    assert 2.5 < ratio < 3.1


def test_demo_run_report_renders_in_headless_chromium(demo, tmp_path):
    """`ldm report` of the demo's stage-two run (the page the runtime wrote at its last checkpoint) in a real
    headless Chromium: not blank, every section present, the fixed-t validation plots among its images."""
    import sys

    sys.path.insert(0, str(H.REPO / "tests" / "report"))
    from test_report_chromium import render_in_chromium

    from launch.report.html import SECTIONS

    page = demo["out"] / "runs" / "diffusion" / "report.html"
    px, dom = render_in_chromium(page, tmp_path)
    assert px.std() > 20, f"screenshot looks blank (pixel std {px.std():.2f})"
    assert set(re.findall(r'<section id="([a-z_]+)"', dom)) == set(SECTIONS)
    assert 'alt="per-t validation"' in dom and dom.count('src="data:image/png;base64,') >= 6
