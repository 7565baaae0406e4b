"""bench/gpu.sh --dry-run: the prepared GPU run's code paths on the CPU, small, end to end (ARCHITECTURE.md: bench/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("gpu_results")
    env = dict(os.environ, LDM_BENCH_RESULTS=str(results), PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", "--budget-s", "300"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results, json.loads((results / "gpu_dry.json").read_text()), proc.stdout


def test_gpu_dry_run_measures_every_row(dry_run):
    from bench.gpu import COLUMNS, MODELS, ZERO_COLUMNS

    _, result, stdout = dry_run
    assert result["dry_run"] is True and result["peak"]["bf16_gflops"] > 0
    names = [c["name"] for c in result["comparisons"]]
    assert names == [f"{m}_bf16{s}" for m in MODELS for s in ("", "_compile")]
    for c in result["comparisons"]:
        assert not c.get("skipped"), c
        for _, key in COLUMNS:                      # the README block's columns are JSON keys
            assert key in c, (c["name"], key)
        assert c["equality"]["same_function"]        # ours and the peer computed the same function first
        assert c["ours_img_per_s"] > 0 and c["peer_img_per_s"] > 0 and c["ratio"] > 0
        assert c["flops_per_step"] > 0 and c["ours_mfu"] > 0
    assert [c["compile"] for c in result["comparisons"]] == [False, True, False, True]
    z = result["zero2"]
    for _, key in ZERO_COLUMNS:
        assert key in z, key
    assert z["zero_stage"] == 2 and z["world"] == 1 and len(z["step_s"]) == 3
    # the live engine holds at least its fp32 weights, gradients-partition and two Adam moments
    assert z["measured_peak_bytes"] >= 4 * 4 * z["params"]
    assert z["plan_peak_bytes"] > 0
    assert "sd_unet_bf16_compile" in stdout       # the table printed


def test_gpu_result_fills_the_readme_block(dry_run, tmp_path):
    from bench import report

    results, result, _ = dry_run
    (tmp_path / "gpu.json").write_text(json.dumps(dict(result, dry_run=False)))
    (tmp_path / "gpu.md").write_text((results / "gpu_dry.md").read_text())
    block = report.section("gpu", tmp_path)
    assert "sd_unet_bf16_compile" in block and "ZeRO-2" in block and "bench/gpu.sh" in block
    assert "Not measured yet" in report.section("gpu", tmp_path / "empty")
