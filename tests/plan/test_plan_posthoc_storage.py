"""`ldm plan`'s post-hoc EMA snapshot storage (launch/plan/storage.py) against the snapshots a real run writes:
`ldm train` of the demo's stage-two config on the tiny world's latents, ZeRO-3 on three gloo ranks (one partition
file per rank and profile; at three ranks DeepSpeed pads one of the 212 parameters, which the figure counts), then
`ldm plan` of the same config and overrides."""
from __future__ import annotations

import json

import harness as H
from launch.cli import main
from launch.plan.storage import posthoc_storage
from launch.plan.zero import ParamInfo

DM_CONFIG = "configs/demo/diffusion.yaml"


def test_posthoc_storage_formula():
    pi = ParamInfo.from_numels([10, 7, 1])
    s = posthoc_storage(pi, [0.05, 0.1], 0, 500, 1100, zero_stage=0, world=4)
    assert (s["bytes_per_profile"], s["bytes_per_snapshot"]) == (4 * 18, 2 * 4 * 18)
    assert s["snapshots_per_run"] == 3 and s["total_bytes"] == 3 * 2 * 4 * 18       # steps 500, 1000, 1100
    assert s["snapshot_every_key"] == "train.checkpoint_every" and s["files_per_snapshot"] == 2
    z3 = posthoc_storage(pi, [0.05, 0.1], 250, 500, 1000, zero_stage=3, world=4)   # 12 + 8 + 4 padded elements
    assert z3["bytes_per_profile"] == 4 * 24 and z3["snapshots_per_run"] == 4 and z3["files_per_snapshot"] == 8
    assert posthoc_storage(pi, [], 0, 500, 1100, 0, 1) is None
    assert posthoc_storage(pi, [0.05], 0, 500, 1100, 0, 1, enabled=False) is None


def _safetensors_data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: the file minus its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def test_plan_posthoc_storage_equals_the_snapshots_on_disk(tiny_world, tmp_path, capsys):
    run = tmp_path / "dm"
    overrides = [f"data.urls={tiny_world['latent_urls']}", f"latents.autoencoder={tiny_world['ae_export']}",
                 "deepspeed.zero_stage=3", "train.max_steps=7", "train.checkpoint_every=7",
                 "ema.posthoc.snapshot_every=3", "train.micro_batch_size=8", "train.precision=fp32",
                 "train.log_every=1", "data.num_workers=0", "validation.sample_every=0", "logging.progress=false"]
    H.assert_ok(H.run(["train", DM_CONFIG, f"run_dir={run}", *overrides], nproc=3, script=H.LDM, timeout=600))

    assert main(["plan", DM_CONFIG, *overrides, "--gpus", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["posthoc_ema"]
    assert plan["sigma_rels"] == [0.05, 0.1] and plan["dtype"] == "float32"
    assert plan["elements_per_profile"] == report["model"]["params"] + 1, "one parameter padded by one element"

    snaps = sorted((run / "phema").glob("step_*"))
    assert [d.name for d in snaps] == ["step_00000003", "step_00000006", "step_00000007"]
    assert plan["snapshots_per_run"] == len(snaps) == 3
    total = 0
    for d in snaps:
        files = sorted(d.glob("sigma_*/rank_*.safetensors"))
        assert len(files) == plan["files_per_snapshot"] == 6, files        # 2 profiles x 3 ranks
        data = sum(_safetensors_data_bytes(f) for f in files)
        on_disk = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        with capsys.disabled():
            print(f"{d.name}: planned {plan['bytes_per_snapshot']:,d} B, tensor data {data:,d} B, "
                  f"on disk {on_disk:,d} B ({on_disk / plan['bytes_per_snapshot'] - 1:+.2%})")
        assert data == plan["bytes_per_snapshot"], "the tensor data is exactly the plan's figure"
        assert plan["bytes_per_snapshot"] <= on_disk <= 1.02 * plan["bytes_per_snapshot"], "headers: under 2 %"
        total += on_disk
    assert plan["total_bytes"] <= total <= 1.02 * plan["total_bytes"]

    assert main(["plan", DM_CONFIG, *overrides, "--gpus", "3"]) == 0
    table = capsys.readouterr().out
    assert "post-hoc EMA snapshots" in table and "x 3 snapshots (every 3 steps, ema.posthoc.snapshot_every)" in table
