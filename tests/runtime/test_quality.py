"""Quality signals while training (issue 20): fixed-t validation on every rank and EDM2 post-hoc EMA, through
the real DeepSpeed engine (ZeRO-3, two gloo ranks, CPU) on toy_quality.FlowStage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import harness as H
from launch.runtime.phema import (discrete_profile, gamma_to_sigma_rel, posthoc_coefficients, profile_dot,
                                  sigma_rel_to_gamma)
from launch.runtime.posthoc import list_snapshots, reconstruct
from launch.runtime.validation import UNIT_TIMES

RUN_QUALITY = Path(__file__).with_name("run_quality.py")
ARGS = ["train.micro_batch_size=8", "train.log_every=5", "optimizer.lr=0.01", "train.checkpoint_every=20",
        "validation.every=20", "deepspeed.zero_stage=3", "ema.sigma_rel=0.075", "ema.posthoc.snapshot_every=2",
        "logging.progress=false"]
T_KEYS = [f"val_loss_u{u:g}" for u in UNIT_TIMES]


def val_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in H.metrics(run_dir) if "val/val_loss" in r}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("quality_zero3")
    H.assert_ok(H.run([str(run_dir), *ARGS, "train.max_steps=40"], script=RUN_QUALITY))
    return run_dir


def test_phema_math():
    for s in (0.05, 0.1, 0.2):
        assert abs(gamma_to_sigma_rel(sigma_rel_to_gamma(s)) - s) < 1e-12
    g = sigma_rel_to_gamma(0.1)
    assert profile_dot(100.0, g, 100.0, g) == pytest.approx((g + 1) ** 2 / ((2 * g + 1) * 100.0))
    # a profile that is one of the snapshots is reconstructed by that snapshot alone
    x = posthoc_coefficients([50, 100, 50, 100], [sigma_rel_to_gamma(0.05)] * 2 + [g] * 2, 0.1)
    assert np.allclose(x, [0, 0, 0, 1], atol=1e-6)
    # the continuous inner product is the limit of the discrete EMA's weights
    n = 20000
    d = discrete_profile(n, g)
    assert abs(d.sum() - 1) < 1e-9 and abs((d * d).sum() - profile_dot(n, g, n, g)) < 1e-3 * profile_dot(n, g, n, g)


def test_fixed_t_validation_on_every_rank_zero3(zero3_run):
    recs = val_records(zero3_run)
    assert sorted(recs) == [0, 20, 40], "step-0 baseline, then every validation.every steps"
    for prefix in ("val/", "val_ema/"):
        assert all(f"{prefix}{k}" in recs[40] for k in ["val_loss", *T_KEYS])
        for k in T_KEYS:   # each of the eight fixed times improves on the step-0 weights
            assert recs[40][prefix + k] < recs[0][prefix + k], (prefix, k, recs[0][prefix + k], recs[40][prefix + k])
    # twice more on the final weights: bit-equal, and the same numbers on both ranks
    a, b = (json.loads((zero3_run / f"val_rank{r}.json").read_text()) for r in (0, 1))
    assert a["twice"][0] == a["twice"][1] == b["twice"][0]
    assert a["twice"][0]["val/val_loss"] == recs[40]["val/val_loss"]
    assert a["digest"] == b["digest"]


def test_posthoc_reconstruction_matches_a_directly_tracked_profile(zero3_run):
    """EDM2's check: the main EMA tracks sigma_rel 0.075 directly; snapshots of 0.05 and 0.10 (on the ZeRO-3
    partitions) reconstruct it."""
    snaps = list_snapshots(zero3_run)
    assert {s["sigma_rel"] for s in snaps} == {0.05, 0.1} and max(s["t"] for s in snaps) == 40
    assert len(list((snaps[-1]["path"]).glob("rank_*.safetensors"))) == 2, "one partition file per rank"
    rec, info = reconstruct(zero3_run, [0.075])
    direct = load_file(str(zero3_run / "final_ema.safetensors"))
    live = load_file(str(zero3_run / "final_live.safetensors"))
    norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))  # noqa: E731
    err = norm({k: rec[0.075][k] - direct[k] for k in rec[0.075]}) / norm({k: direct[k] for k in rec[0.075]})
    moved = norm({k: live[k] - direct[k] for k in rec[0.075]}) / norm({k: direct[k] for k in rec[0.075]})
    print(f"post-hoc reconstruction of sigma_rel 0.075: relative error {err:.2e} (live vs EMA {moved:.2e})")
    assert err < 1e-3 < moved, (err, moved)


def test_resume_evaluates_the_same_samples_and_noise(zero3_run, tmp_path):
    run = tmp_path / "resumed"
    H.assert_ok(H.run([str(run), *ARGS, "train.max_steps=20"], script=RUN_QUALITY))
    first = json.loads((run / "val_rank0.json").read_text())["digest"]
    resumed = H.run([str(run), *ARGS, "train.max_steps=40"], script=RUN_QUALITY)
    H.assert_ok(resumed)
    assert "resumed from step_00000020" in resumed.stderr + resumed.stdout
    assert json.loads((run / "val_rank0.json").read_text())["digest"] == first
    ref, got = val_records(zero3_run), val_records(run)
    assert sorted(got) == [0, 20, 40]
    assert got[40] == ref[40], "resumed run: the same fixed set, noise and weights give the same losses"


def test_ldm_ema_writes_reconstructions(zero3_run, tmp_path):
    out = tmp_path / "phema_out"
    H.assert_ok(H.run(["ema", str(zero3_run), "--sigma-rel", "0.075", "0.2", "--out", str(out)], nproc=1, script=H.LDM,
                      timeout=120))
    rec, _ = reconstruct(zero3_run, [0.075])
    got = load_file(str(out / "ema_sigma0.075.safetensors"))
    assert got.keys() == rec[0.075].keys() and all(torch.equal(got[k], rec[0.075][k]) for k in got)
    assert (out / "ema_sigma0.2.safetensors").is_file()
    assert json.loads((out / "posthoc.json").read_text())["t"] == 40


def test_posthoc_sweep_names_the_lowest_validation_loss(zero3_run):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_quality import FlowStage, held_out

    from launch.runtime.posthoc import sweep
    sigmas = [0.03, 0.075, 0.15, 0.25]
    result = sweep(zero3_run, sigmas, stage=FlowStage(), val_data=held_out(0), log=lambda m: None)
    losses = result["losses"]
    print("sweep", result)
    assert set(losses) == set(sigmas) and result["step"] == 40
    assert all(losses[result["best"]] <= v for v in losses.values())
    assert len({round(v, 9) for v in losses.values()}) == len(sigmas)     # each scored its own weights


def test_export_ema_sigma_rel_writes_the_reconstruction(zero3_run, tmp_path):
    out = tmp_path / "export"
    # --text-encoder reference: the toy run's text tower is the default (ViT-L/14, randomly initialised);
    # copying it would write 470 MB that this test does not look at
    H.assert_ok(H.run(["export", str(zero3_run), str(out), "--ema-sigma-rel", "0.15", "--text-encoder", "reference"],
                      nproc=1, script=H.LDM, timeout=180))
    rec, _ = reconstruct(zero3_run, [0.15])
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == rec[0.15].keys() and all(torch.equal(got[k], rec[0.15][k]) for k in got)
    assert json.loads((out / "config.json").read_text())["weights"].startswith("posthoc_ema sigma_rel=0.15")
