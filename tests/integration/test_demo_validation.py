"""The demo's stage two logs the fixed-t validation curve (issue 20), and `ldm ema RUN_DIR --sweep` scores the
post-hoc EMA reconstructions of that real run by it. `ldm demo` at toy scale (the settings of
test_integration_demo.py), with stage-two validation every 6 of its 12 steps and post-hoc snapshots every 3."""
from __future__ import annotations

import json
import math
import re

import pytest
import yaml

import harness as H
from launch.demo.run import VAL_EVERY, DemoSettings, run_demo
from launch.runtime.validation import UNIT_TIMES

TINY = dict(train_images=128, val_images=32, holdout_images=24, shard_size=64, samples_per_triple=1,
            holdout_samples_per_triple=2, threads=2)
STAGE1 = ["train.max_steps=12", "train.log_every=4", "validation.every=6", "validation.sample_every=12",
          "autoencoder.latent_stats_batches=1", "data.num_workers=0", "train.checkpoint_every=12"]
STAGE2 = ["train.max_steps=12", "train.log_every=4", "validation.sample_every=12", "data.num_workers=0",
          "train.checkpoint_every=12", "sampling.steps=4", "validation.every=6", "ema.posthoc.snapshot_every=3"]
T_KEYS = [f"val_loss_u{u:g}" for u in UNIT_TIMES]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_validation") / "demo"
    run_demo(DemoSettings(out=out, overrides_stage1=STAGE1, overrides_stage2=STAGE2, **TINY), log=lambda m: None)
    return out


def test_demo_stage_two_logs_the_fixed_t_validation_curve(demo):
    run = demo / "runs" / "diffusion"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["val_urls"] and "latents_val" in str(cfg["data"]["val_urls"]), cfg["data"]
    assert sorted(p.name for p in (demo / "data" / "latents_val").glob("*.tar")) == ["00000.tar"]
    pre = json.loads((demo / ".demo" / "precompute.json").read_text())["result"]
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
    run = demo / "runs" / "diffusion"
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
