"""`ldm demo --tier compositional` end to end at toy scale: the same phases as the shapes demo on the
compositional data (two real `ldm train` subprocesses), judged by GenEval's tasks with seen and held-out
captions apart, the report and its README block written from the numbers. The full-size figures (overall,
per task, compute) come from `ldm demo --tier compositional --readme`, which prints them into the README."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_pipeline.compositional import DEFAULT_HOLDOUT, TASKS, is_held_out, parse_caption
from launch.demo.compositional import README_END, README_START, CompositionalTier
from launch.demo.run import REPO, DemoSettings, run_demo

STAGE1 = ["train.max_steps=10", "train.log_every=5", "validation.every=5", "validation.sample_every=10",
          "autoencoder.latent_stats_batches=1", "data.num_workers=0", "train.checkpoint_every=10"]
STAGE2 = ["train.max_steps=10", "train.log_every=5", "validation.sample_every=10", "data.num_workers=0",
          "train.checkpoint_every=10", "sampling.steps=3", "validation.every=5"]


def test_grid_prompts_parse_and_the_first_three_are_held_out():
    prompts = CompositionalTier().grid_prompts(None)
    assert len(prompts) == 8 and all(parse_caption(p) for p in prompts)
    assert [is_held_out(p, DEFAULT_HOLDOUT) for p in prompts] == [True] * 3 + [False] * 5
    kinds = {parse_caption(p).kind for p in prompts}
    assert kinds == {"single", "pair", "count", "position"}


def test_compositional_demo_runs_every_phase_and_scores_every_task(tmp_path):
    s = DemoSettings.for_tier("compositional", tmp_path / "demo", train_images=96, val_images=32,
                              holdout_images=16, shard_size=48, threads=2, tier_options={"seen": 48, "held_out": 24},
                              overrides_stage1=STAGE1, overrides_stage2=STAGE2)
    assert s.image_size == 40 and s.diffusion_config.parent.name == "compositional"
    logs: list[str] = []
    summary = run_demo(s, log=logs.append)

    assert summary["tier"] == "compositional" and summary["images"] == {"train": 96, "val": 32, "holdout": 16}
    scores = summary["scores"]
    assert scores["all"]["n"] == 72 and scores["seen"]["n"] == 48 and scores["held_out"]["n"] == 24
    for split in ("all", "seen", "held_out"):
        assert set(TASKS) <= set(scores[split]) and 0.0 <= scores[split]["overall"] <= 1.0
    assert "frozen open_clip tower `ldm-tiny-text`" in summary["text_tower"]
    assert "randomly initialised" in summary["text_tower"]
    # held-out items never reach the training shards
    train_caps = []
    import tarfile
    for tar in sorted((tmp_path / "demo" / "data" / "train").glob("*.tar")):
        with tarfile.open(tar) as t:
            train_caps += [t.extractfile(m).read().decode() for m in t.getmembers() if m.name.endswith(".txt")]
    assert len(train_caps) == 96 and not any(is_held_out(c) for c in train_caps)
    judged_prompts = json.loads((tmp_path / "demo" / "samples" / "scored_holdout" / "prompts.json").read_text())
    assert len(judged_prompts) == 24 and all(is_held_out(p) for p in judged_prompts.values())

    report = (tmp_path / "demo" / "report.md").read_text()
    assert "compositional tier" in report and "| held-out | 24 |" in report
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n")
    CompositionalTier().update_readme(tmp_path / "demo", readme, tmp_path / "assets")
    text = readme.read_text()
    assert "old" not in text and "| seen | 48 |" in text and (tmp_path / "assets" / "demo_compositional_grid.png").is_file()

    logs.clear()
    run_demo(s, log=logs.append)
    assert sum("reused" in line for line in logs) == 9, logs


def test_report_names_the_text_tower_a_user_gave(tmp_path):
    """The frozen tower is the demo's random one unless `--stage2 text_encoder.pretrained=FILE` names weights;
    the report says which (no weights are loaded to say it)."""
    from launch.demo.compositional import text_tower

    plain = DemoSettings.for_tier("compositional", tmp_path / "a")
    assert "randomly initialised (seed 0)" in text_tower(plain)
    given = DemoSettings.for_tier("compositional", tmp_path / "b", overrides_stage2=[
        f"text_encoder.pretrained={tmp_path / 'tower.pt'}", "text_encoder.layer=penultimate", "train.seed=3"])
    said = text_tower(given)
    assert f"weights from {tmp_path / 'tower.pt'}" in said and "layer `penultimate`" in said
    assert "randomly" not in said


def test_finetune_refuses_the_compositional_tier():
    proc = subprocess.run([sys.executable, "-m", "launch", "demo", "--tier", "compositional", "--finetune"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "--finetune teaches the shapes tier" in proc.stderr
