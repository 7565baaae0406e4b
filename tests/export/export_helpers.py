"""Helpers for the export tests (a uniquely named module: test folders share one import namespace)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO / "tests" / "runtime") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "runtime"))

import harness  # noqa: E402

JOB = HERE / "export_train_job.py"
RUN_FLAGS = ["train.checkpoint_every=1000", "validation.every=0", "validation.sample_every=0",
             "logging.progress=false", "data.num_workers=0", "train.micro_batch_size=4"]


def run_job(args: list[str], nproc: int, timeout: float = 400) -> None:
    proc = harness.run(args, nproc=nproc, script=JOB, timeout=timeout, PYTHONPATH=str(REPO))
    harness.assert_ok(proc)


def ldm(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `ldm` CLI as a user would (a fresh process)."""
    proc = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=REPO, env=harness.job_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        harness.assert_ok(proc)
    return proc


def cli(*args) -> tuple[int, str, str]:
    """Run the `ldm` CLI in this process (same argument parsing and command code, no interpreter start):
    (exit status, stdout, stderr)."""
    import contextlib
    import io

    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def make_dit_export(out: Path, autoencoder: Path, *, pooled: bool = True) -> Path:
    """A stage-two export written by hand (no run): a small DiT in the non-PixArt form (QK-norm), learned
    null caption, pooled text, flow matching, the repository's tiny text tower. Exercises the learned-null
    and pooled paths of sampling and ONNX without training."""
    import json

    import torch

    from launch.runtime.config import load_config
    from launch.runtime.configio import to_plain
    from launch.interop.export import write_text_encoder
    from launch.runtime.exportdir import EXPORT_FORMAT, write_safetensors
    from ldm.training import build_denoiser

    cfg = load_config(REPO / "configs/ldm/dit-small.yaml",
                      ["denoiser.dit.depth=2", "denoiser.dit.hidden_size=64", f"denoiser.pooled_dim={64 if pooled else 0}",
                       "sampling.steps=4"])
    torch.manual_seed(0)
    net = build_denoiser(cfg.denoiser)
    with torch.no_grad():      # zero-initialised output and cross-attention would hide the text paths
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    spec, weights = write_text_encoder(cfg.text_encoder, out, "copy")
    config = {"format": EXPORT_FORMAT, "kind": "diffusion", "step": 0, "config_hash": "handmade", "weights": "ema",
              "tag": None, "denoiser": to_plain(cfg.denoiser), "objective": to_plain(cfg.objective),
              "conditioning": to_plain(cfg.conditioning), "text_encoder": spec, "text_encoder_weights": weights,
              "sampling": to_plain(cfg.sampling), "latents": to_plain(cfg.latents), "autoencoder": str(autoencoder),
              "scaling_factor": 0.9, "shift_factor": 0.05, "dtype": "fp32"}
    write_safetensors(net.state_dict(), out / "model.safetensors", "fp32", {"format": EXPORT_FORMAT, "step": 0})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
