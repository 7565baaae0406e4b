"""Fixtures for the export / sample / eval tests: tiny real runs through the real runtime.

- `synth_data`: 64 captioned-shape images, 32 px, one shard.
- `ae_run` / `ae_export`: stage one (kl-f4-small), one process, ZeRO-0, 3 steps, EMA on.
- `unet_run` / `unet_export`: stage two (unet-small on that autoencoder), 2 ranks (torchrun, gloo),
  ZeRO-3, 3 steps, EMA on; the job also dumps the weights gathered in-process.
Runs are session-scoped (made once, ~45 s together on two busy cores)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export_helpers import RUN_FLAGS, run_job



@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from data_pipeline.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, 64, size=32, seed=3, shard_size=64)
    return out


@pytest.fixture(scope="session")
def ae_run(synth_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "ae"
    run_job(["configs/autoencoder/kl-f4-small.yaml", f"run_dir={run_dir}",
             f"data.urls={synth_data}/00000.tar", "train.max_steps=3", *RUN_FLAGS], nproc=1)
    return run_dir


@pytest.fixture(scope="session")
def ae_export(ae_run, tmp_path_factory) -> Path:
    from launch.interop.export import export_run

    return export_run(ae_run, tmp_path_factory.mktemp("exports") / "ae")


@pytest.fixture(scope="session")
def unet_run(synth_data, ae_export, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "unet"
    run_job(["configs/ldm/unet-small.yaml", f"run_dir={run_dir}", f"data.urls={synth_data}/00000.tar",
             "data.image_size=32", f"latents.autoencoder={ae_export}", "train.max_steps=3",
             "deepspeed.zero_stage=3", *RUN_FLAGS], nproc=2)
    return run_dir


@pytest.fixture(scope="session")
def unet_export(unet_run, tmp_path_factory) -> Path:
    from launch.interop.export import export_run

    return export_run(unet_run, tmp_path_factory.mktemp("exports") / "unet")


@pytest.fixture
def copy_tree(tmp_path):
    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def mmdit_run(synth_data, ae_export, tmp_path_factory) -> Path:
    """A tiny MMDiT (SD3 form: QK-norm RMS, context-pre-only last block, pooled text) trained 2 steps by
    `ldm train` on one rank with the tiny open_clip tower, flow matching with shift auto."""
    run_dir = tmp_path_factory.mktemp("runs") / "mmdit"
    run_job(["configs/ldm/unet-small.yaml", f"run_dir={run_dir}", f"data.urls={synth_data}/00000.tar",
             "data.image_size=32", f"latents.autoencoder={ae_export}", "train.max_steps=2",
             "denoiser.kind=mmdit", "denoiser.pooled_dim=64", "denoiser.mmdit.input_size=8",
             "denoiser.mmdit.in_channels=4", "denoiser.mmdit.hidden_size=64", "denoiser.mmdit.depth=2",
             "denoiser.mmdit.num_heads=4", "denoiser.mmdit.context_dim=128", "denoiser.mmdit.qk_norm=rms",
             "objective.kind=flow", "objective.shift=auto", "sampling.sampler=euler", "sampling.steps=4",
             *RUN_FLAGS], nproc=1)
    return run_dir
