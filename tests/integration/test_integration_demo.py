"""`ldm demo` end to end at toy scale: every phase runs through the real runtime (two `ldm train`
subprocesses on DeepSpeed), writes its report with numbers in range, a second run reuses every phase,
`--redo` runs one again, and the README block is regenerated from the report. The full-size demo and its
acceptance figures (PSNR, adherence) come from `make demo` and are printed into the README by it."""
from __future__ import annotations

import json

from launch.demo.run import DemoSettings, run_demo
from launch.demo.report import README_END, README_START, update_readme

TINY = dict(train_images=128, val_images=32, holdout_images=24, shard_size=64, samples_per_triple=1,
            holdout_samples_per_triple=2, threads=2)
STAGE1 = ["train.max_steps=12", "train.log_every=4", "validation.every=6", "validation.sample_every=12",
          "autoencoder.latent_stats_batches=1", "data.num_workers=0", "train.checkpoint_every=12"]
STAGE2 = ["train.max_steps=12", "train.log_every=4", "validation.sample_every=12", "data.num_workers=0",
          "train.checkpoint_every=12", "sampling.steps=4"]


def test_demo_runs_every_phase_reports_and_reuses(tmp_path):
    out = tmp_path / "demo"
    logs: list[str] = []
    settings = DemoSettings(out=out, overrides_stage1=STAGE1, overrides_stage2=STAGE2, **TINY)
    summary = run_demo(settings, log=logs.append)

    assert summary["images"] == {"train": 128, "val": 32, "holdout": 24}
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
