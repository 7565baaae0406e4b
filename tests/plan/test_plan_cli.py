"""`ldm plan`: the command's output, and the consistency of the plan it prints."""
from __future__ import annotations

import json

import pytest

from launch.plan import hardware as H
from launch.plan import planner as P
from launch.plan import zero as Z
from launch.plan.description import describe
from launch.cli import main
from plankit import REPO


def _plan(capsys, *argv):
    rc = main(["plan", *argv, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def sd15_desc():
    from launch.runtime.config import load_config

    return describe(load_config(REPO / "configs/ldm/unet-sd15.yaml", []))


def test_plan_cli_json_report(capsys):
    r = _plan(capsys, str(REPO / "configs/ldm/unet-sd15.yaml"), "--gpus", "16", "--global-batch", "2048")
    assert r["model"]["params"] == 859_520_964
    assert r["hardware"]["nodes"] == 2 and r["hardware"]["gpu_tflops"] == 312.0
    stages = r["memory"]["zero_stages"]
    # model states per GPU shrink with the stage (ZeRO-1 and 2 hold the same at rest in DeepSpeed 0.19)
    states = [stages[str(z)]["model_states"] for z in range(4)]
    assert states[0] > states[1] == states[2] > states[3]
    for z in range(4):
        row = stages[str(z)]["max_micro_batch"]
        assert row["ckpt"] > row["no_ckpt"] > 0
    b = r["batch"]
    assert b["fits"] and b["micro_batch"] * b["grad_accum"] * 16 == 2048
    assert b["micro_batch"] <= stages["2"]["max_micro_batch"]["ckpt"]
    th = r["throughput"]
    assert th["step_s"] == pytest.approx(th["compute_s"] + th["exposed_comm_s"])
    assert th["img_per_s"] == pytest.approx(2048 / th["step_s"])
    assert th["days_to_max_steps"] == pytest.approx(200_000 * th["step_s"] / 86400)
    # compute time is exactly FLOPs / (MFU x peak)
    f = th["flops_per_sample"]
    assert f["train"] == 4 * f["forward"]          # checkpointing on: 3x + a recomputed forward
    assert th["compute_s"] == pytest.approx(2048 / 16 * f["total"] / (0.25 * 312e12))
    assert r["memory"]["chosen"]["peak"] <= r["assumptions"]["usable_bytes_per_gpu"]


def test_plan_cli_table_and_options(capsys):
    rc = main(["plan", str(REPO / "configs/ldm/dit-xl-2.yaml"), "train.activation_checkpointing=true", "--gpus", "64",
               "--gpu-mem", "40", "--gpu-tflops", "989", "--mfu", "0.3", "--nodes", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    for z in range(4):
        assert f"ZeRO-{z}" in out
    assert "img/s" in out and "days" in out and "16 node(s)" in out and "MFU 30%" in out


def test_plan_smaller_gpu_fits_fewer_samples(sd15_desc):
    big = P.plan(sd15_desc, 8)
    small = P.plan(sd15_desc, 8, H.Hardware(gpu_mem_gib=24))
    for z in range(4):
        assert small["memory"]["zero_stages"][str(z)]["max_micro_batch"]["ckpt"] < \
            big["memory"]["zero_stages"][str(z)]["max_micro_batch"]["ckpt"]


def test_plan_does_not_fit_reports_it(sd15_desc):
    import dataclasses

    desc = dataclasses.replace(sd15_desc, zero_stage=0, checkpointing=False)
    r = P.plan(desc, 8, H.Hardware(gpu_mem_gib=16))
    assert not r["batch"]["fits"] and "img_per_s" not in r["throughput"]
    assert any("does not fit" in n for n in r["notes"])


def test_plan_more_gpus_more_throughput_less_per_gpu(sd15_desc):
    rows = [P.plan(sd15_desc, n, global_batch=2048)["throughput"] for n in (8, 64, 512)]
    assert rows[0]["img_per_s"] < rows[1]["img_per_s"] < rows[2]["img_per_s"]
    assert rows[0]["img_per_s_per_gpu"] > rows[2]["img_per_s_per_gpu"]
    assert rows[0]["exposed_comm_s"] < rows[2]["exposed_comm_s"] / rows[2]["step_s"] * rows[0]["step_s"] + 1
    # overlapping the gradient reduction can only help
    over = P.plan(sd15_desc, 512, global_batch=2048, overlap_comm=True)["throughput"]
    assert over["step_s"] <= rows[2]["step_s"]


def test_plan_grad_accum_split():
    assert P.batch_split(2048, 8, 100) == {"micro_batch": 64, "grad_accum": 4, "global_batch": 2048, "fits": True,
                                           "note": None}
    assert P.batch_split(2048, 1024, 100)["grad_accum"] == 1
    split = P.batch_split(1000, 8, 7)          # 125 per GPU: 25 x 5
    assert (split["micro_batch"], split["grad_accum"]) == (5, 25)
    assert not P.batch_split(64, 8, 0)["fits"]


def test_plan_cli_errors(capsys):
    assert main(["plan", str(REPO / "configs/autoencoder/kl-f8.yaml"), "--gpus", "8"]) == 2
    assert "stage-two" in capsys.readouterr().err
    assert main(["plan", str(REPO / "configs/ldm/dit-b-2.yaml"), "--gpus", "0"]) == 2
    assert main(["plan", str(REPO / "configs/ldm/dit-b-2.yaml"), "no.such_key=1", "--gpus", "8"]) == 2


def test_plan_comm_model_volumes():
    pi = Z.ParamInfo.from_numels([1000] * 100, persistence_threshold=0)
    P_ = pi.trainable
    assert Z.comm_bytes(pi, 0, 1, 1) == {"reduce": 0.0, "gather_prefetched": 0.0, "serial": 0.0}
    z0 = Z.comm_bytes(pi, 0, 4, 3)
    assert z0["reduce"] == pytest.approx(2 * 0.75 * 4 * P_)            # all-reduce once per step
    z2 = Z.comm_bytes(pi, 2, 4, 3)
    assert z2["reduce"] == pytest.approx(3 * 0.75 * 4 * P_) and z2["serial"] == pytest.approx(0.75 * 4 * P_)
    z3 = Z.comm_bytes(pi, 3, 4, 1, reuse_distance=0)
    assert z3["gather_prefetched"] == pytest.approx(2 * 0.75 * 4 * P_)   # forward + backward gathers
    t = P.step_time(1.0, {"reduce": 4e9, "gather_prefetched": 0.0, "serial": 0.0}, 2.0, overlap_comm=True,
                    backward_share=2 / 3)
    assert t["step_s"] == pytest.approx(1.0 + 2.0 - 2 / 3)
