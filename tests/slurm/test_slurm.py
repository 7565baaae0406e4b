"""launch/slurm.sh against a real (throw-away, single-host) Slurm cluster: `sbatch launch/slurm.sh
configs/demo/diffusion.yaml` trains like launch/local.sh, survives USR1 preemption through save + requeue +
resume with every step logged once and the losses of an uninterrupted run, spreads over two nodes; a
config error fails fast; and the launch scripts pass bash -n and shellcheck.

The jobs run `ldm train` itself (the scripts' default entry point) on 2 ranks (gloo, CPU) with the demo's
stage-two config, on the precomputed latents of the session's tiny world (tests/conftest.py: synthetic
shards, a small trained autoencoder, its export). Overrides only shorten the run and make it fp32.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import Unavailable, ensure_packages

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SLURM_SH = REPO / "launch" / "slurm.sh"
LOCAL_SH = REPO / "launch" / "local.sh"
CONFIG = REPO / "configs" / "demo" / "diffusion.yaml"
# Long enough that a USR1 sent after step 3 lands mid-run (a step here takes ~30-60 ms).
MAX_STEPS = 120
# What the scripts need on this machine; sbatch passes the submitting environment on.
JOB_ENV = {"LDM_CPUS_PER_RANK": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": None}   # None: unset, so that both scripts pick the thread count themselves
CPU_JOB = ["--gpus-per-node=0", "--time=10"]


# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def config() -> Path:
    return CONFIG


@pytest.fixture(scope="module")
def overrides(tiny_world) -> list[str]:
    return [f"data.urls={tiny_world['latent_urls']}", f"latents.autoencoder={tiny_world['ae_export']}",
            f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=8", "train.log_every=1",
            "train.checkpoint_every=40", "train.precision=fp32", "data.num_workers=1",
            "validation.sample_every=100000"]


@pytest.fixture(scope="module")
def reference(config, overrides, tmp_path_factory) -> Path:
    """The same config trained without Slurm: launch/local.sh with 2 processes."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    env = {k: v for k, v in {**os.environ, **JOB_ENV}.items() if v is not None}
    out = subprocess.run(["bash", str(LOCAL_SH), "2", str(config), f"run_dir={run_dir}", *overrides],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"local.sh rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return run_dir


def submit(cluster, config: Path, run_dir: Path, sbatch_opts: list[str], overrides: list[str], **env) -> int:
    out_dir = run_dir.parent
    return cluster.sbatch([*CPU_JOB, f"--output={out_dir}/sbatch-%j.out", *sbatch_opts, str(SLURM_SH),
                           str(config), f"run_dir={run_dir}", *overrides], cwd=REPO, **{**JOB_ENV, **env})


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def sbatch_out(run_dir: Path, job_id: int) -> str:
    path = run_dir.parent / f"sbatch-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_done(cluster, job_id: int, run_dir: Path, timeout_s: float = 240) -> dict:
    try:
        return cluster.wait_job(job_id, timeout_s)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- job log\n{job_log(run_dir, job_id)[-6000:]}\n{cluster.logs()}") from None


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def assert_every_step_once(run_dir: Path, context: str) -> None:
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1)), f"{context}: logged steps {steps}"


def assert_losses_equal(run_dir: Path, reference: Path, context: str) -> None:
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(want), f"{context}: steps {sorted(got)} vs {sorted(want)}"
    bad = {s: (got[s], want[s]) for s in want if not math.isclose(got[s], want[s], rel_tol=1e-6, abs_tol=1e-8)}
    assert not bad, f"{context}: losses differ from the uninterrupted local.sh run at steps {bad}"


def result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if p.is_file() and p.relative_to(run_dir).parts[0] != "logs"}


# ------------------------------------------------------------------ tests

def test_sbatch_trains_like_local_sh(slurm_cluster, config, overrides, reference, tmp_path):
    """One node, 2 ranks: the run directory matches launch/local.sh's run of the same config."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, config, run_dir, ["--nodes=1", "--cpus-per-task=2"], overrides)
    info = wait_done(slurm_cluster, job, run_dir)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert "world size 2" in log and f"logs to {run_dir}/logs/slurm-{job}.out" in sbatch_out(run_dir, job)

    assert files(run_dir) == files(reference), "the Slurm run directory differs from local.sh's"
    assert "checkpoints/latest" in files(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == (reference / "checkpoints" / "latest").read_text()
    strip = lambda text: re.sub(r"(?m)^run_dir: .*$", "run_dir: -", text)  # noqa: E731
    assert strip((run_dir / "config.yaml").read_text()) == strip((reference / "config.yaml").read_text())
    assert result(run_dir)["status"] == "completed" and result(run_dir)["step"] == MAX_STEPS
    assert_every_step_once(run_dir, "slurm")
    assert_every_step_once(reference, "local.sh")
    assert_losses_equal(run_dir, reference, "slurm")
    lrs = {r["step"]: r.get("lr") for r in records(run_dir)}
    assert lrs == {r["step"]: r.get("lr") for r in records(reference)}


def preempt_mid_run(cluster, job: int, run_dir: Path) -> tuple[dict, str, str, int]:
    """USR1 to the batch shell once step 3 is logged; wait for the job to end. Returns the job's
    final record, the log of its first and of its second start, and the step it stopped at."""
    deadline = time.time() + 180
    while not any(s >= 3 for s in losses(run_dir)):
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job is {state}\n{job_log(run_dir, job)[-6000:]}"
        assert time.time() < deadline, f"no step 3 in time\n{job_log(run_dir, job)[-6000:]}"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = wait_done(cluster, job, run_dir)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-8000:]}"
    assert info["Restarts"] == "1", f"expected one requeue: {info}\n{log[-8000:]}"
    first, _, second = log.partition("SLURM_RESTART_COUNT=1")
    assert second, f"the job did not start a second time:\n{log[-8000:]}"
    stopped = re.search(r'result \{"status": "preempted", "step": (\d+)', first)
    assert stopped and 3 <= int(stopped.group(1)) < MAX_STEPS, f"no preempted result mid-run:\n{first[-6000:]}"
    assert f"scontrol requeue {job}" in first
    # The signal went the intended way: a step on every node that signals torchrun's children.
    assert "could not start the signal step" not in first, first[-6000:]
    step = int(stopped.group(1))
    assert f"resumed from step_{step:08d}" in second, second[-6000:]
    assert result(run_dir)["status"] == "completed" and result(run_dir)["step"] == MAX_STEPS
    return info, first, second, step


def test_usr1_saves_requeues_and_resumes(slurm_cluster, config, overrides, reference, tmp_path):
    """USR1 to the batch shell mid-run: checkpoint, exit 75, scontrol requeue, resume, finish;
    every step logged once and the losses of an uninterrupted run."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, config, run_dir, ["--nodes=1", "--cpus-per-task=2"], overrides)
    info, first, second, step = preempt_mid_run(slurm_cluster, job, run_dir)
    signalled = re.findall(r"node n\d: SIGUSR1 to training processes ([\d ]+)", first)
    assert len(signalled) == 1 and len(signalled[0].split()) == 2, f"both ranks, by pid: {signalled}"
    assert first.count("[ldm] received SIGUSR1") == 2, f"both ranks should get USR1:\n{first[-6000:]}"
    assert_every_step_once(run_dir, "preempted + resumed")
    assert_losses_equal(run_dir, reference, "preempted + resumed")


def test_two_nodes_one_rank_each(slurm_cluster, config, overrides, reference, tmp_path):
    """--nodes=2 with one CPU each: torchrun on both logical nodes, one rank per node, world size 2;
    preempted mid-run it saves on both nodes, requeues and resumes on two nodes."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, config, run_dir, ["--nodes=2", "--cpus-per-task=1"], overrides)
    info, first, second, step = preempt_mid_run(slurm_cluster, job, run_dir)
    assert info["NodeList"] == "n[1-2]", info
    for part in (first, second):
        assert "2 node(s) [n1 n2] x 1 process(es) = world size 2" in part, part[-6000:]
        ranks = dict(re.findall(r"\[ldm\] rank (\d) of world 2 \(local rank 0\) on host \S+ node (n\d)", part))
        assert sorted(ranks) == ["0", "1"] and sorted(ranks.values()) == ["n1", "n2"], f"{ranks}\n{part[-6000:]}"
        for node in ("n1", "n2"):
            assert f"node {node} (host" in part
    signalled = dict(re.findall(r"node (n\d): SIGUSR1 to training processes (\d+)\n", first))
    assert sorted(signalled) == ["n1", "n2"], f"one training process per node signalled: {signalled}"
    assert_every_step_once(run_dir, "two nodes")
    assert_losses_equal(run_dir, reference, "two nodes")


def test_default_entry_trains_a_real_stage(slurm_cluster, tmp_path):
    """No custom entry point: `ldm train` itself (stage one, small KL autoencoder, synthetic shards,
    a DataLoader worker per rank) through sbatch on 2 ranks."""
    data = tmp_path / "data"
    out = subprocess.run([sys.executable, "-m", "launch", "data", "synth", str(data), "--num", "64", "--size", "32",
                          "--shard-size", "16"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    steps = 6
    job = submit(slurm_cluster, REPO / "configs" / "autoencoder" / "kl-f4-small.yaml", run_dir,
                 ["--nodes=1", "--cpus-per-task=2"],
                 overrides=[f"data.urls={data}/{{00000..00003}}.tar", f"train.max_steps={steps}", "train.log_every=1",
                            "validation.every=1000", "validation.sample_every=1000"])
    info = wait_done(slurm_cluster, job, run_dir)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert "world size 2" in log
    assert result(run_dir)["status"] == "completed" and result(run_dir)["step"] == steps
    assert [r["step"] for r in records(run_dir) if "loss" in r] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "config.yaml").is_file()


def test_config_error_fails_fast_with_status_2(slurm_cluster, config, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, config, run_dir, ["--nodes=1", "--cpus-per-task=1"], ["train.max_step=3"])
    info = wait_done(slurm_cluster, job, run_dir, timeout_s=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "train.max_step" in sbatch_out(run_dir, job)
    assert not run_dir.exists()


def test_launch_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted((REPO / "launch").glob("*.sh"))
    assert {"env.sh", "local.sh", "slurm.sh"} <= {p.name for p in scripts}
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"bash -n {script.name}: {out.stderr}"
    try:
        ensure_packages(("shellcheck",))
    except Unavailable as e:
        pytest.skip(f"shellcheck is not installed and cannot be: {e}")
    out = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in scripts]], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
