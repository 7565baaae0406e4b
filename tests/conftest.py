"""Shared test setup: CPU DeepSpeed, a cached extension build folder, offline wandb."""
from __future__ import annotations

import os
from pathlib import Path

import sys

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)


# The base temp folder peaked at 1.37 and 1.48 GiB in two fresh-clone runs (fixtures live for their scope, a passing
# test's tmp_path is removed as it ends: pyproject's tmp_path_retention_policy); 2 leaves a margin.
NEEDS_GIB = 2


def pytest_report_header(config) -> str:
    """Free disk where the tests write: a full disk shows up as dozens of unrelated failures, so say it first."""
    import shutil

    base = config._tmp_path_factory.getbasetemp()
    free_gib = shutil.disk_usage(base).free / 2**30
    note = "" if free_gib >= NEEDS_GIB else f"  WARNING: the suite needs about {NEEDS_GIB} GiB; expect OSError 28"
    return f"tmp: {base} ({free_gib:.1f} GiB free){note}"


@pytest.fixture
def repo() -> Path:
    return REPO


# Folders of small-op tests: on a shared 2-core machine two spinning intra-op threads ran them many times
# slower than one (measured 25x on a tiny UNet, 4-8x for the training loops), so each runs single-threaded.
ONE_THREAD_FOLDERS = frozenset({"autoencoder", "export", "init", "ldm", "plan"})


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    parts = Path(str(request.node.fspath)).resolve().relative_to(REPO / "tests").parts
    if len(parts) < 2 or parts[0] not in ONE_THREAD_FOLDERS:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- a tiny real world
# Shared by tests/integration and tests/slurm (session-scoped: built once per test run).

sys.path.insert(0, str(REPO / "tests" / "runtime"))

AE_CONFIG = "configs/demo/autoencoder.yaml"
DM_CONFIG = "configs/demo/diffusion.yaml"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_world")
    from data_pipeline.synthetic import write_synthetic

    write_synthetic(root / "train", 256, size=32, seed=0, shard_size=128)
    write_synthetic(root / "val", 32, size=32, seed=1, shard_size=32)
    train_urls = str(root / "train" / "{00000..00001}.tar")
    ae_run = root / "ae_run"
    import harness as H

    proc = H.run(["train", AE_CONFIG, f"run_dir={ae_run}", f"data.urls={train_urls}",
                  f"data.val_urls={root / 'val' / '00000.tar'}", "train.max_steps=30", "train.micro_batch_size=8",
                  "train.log_every=2", "validation.every=15", "validation.sample_every=30", "validation.num_images=4",
                  "train.precision=fp32", "autoencoder.latent_stats_batches=2", "data.num_workers=0"],
                 nproc=1, script=H.LDM)
    H.assert_ok(proc)
    from launch.interop.export import export_run

    ae_export = export_run(ae_run, root / "ae_export")
    latents = root / "latents"
    proc = H.run(["data", "precompute", DM_CONFIG, f"data.urls={train_urls}", "data.kind=raw",
                  "--autoencoder", str(ae_export), "--out", str(latents), "--batch-size", "64"],
                 nproc=1, script=H.LDM)
    H.assert_ok(proc)
    return {"root": root, "train_urls": train_urls, "ae_run": ae_run, "ae_export": ae_export,
            "latent_urls": str(latents / "{00000..00001}.tar"), "val_url": str(root / "val" / "00000.tar")}
