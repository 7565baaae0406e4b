"""Helpers shared by the `ldm plan` tests (a module name unique across tests/, as pytest imports it by name)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load(name: str, *overrides: str):
    """A config from configs/ by its path under configs/ (without .yaml), with overrides."""
    from launch.runtime.config import load_config

    return load_config(REPO / "configs" / f"{name}.yaml", list(overrides))


def rel(a: float, b: float) -> float:
    """Relative difference of a prediction `a` to a measurement `b`."""
    return abs(a - b) / abs(b)


def run_job(script: Path, args: list[str], nproc: int, timeout: float = 600, **env):
    """Run a job script alone (nproc 1) or under torchrun with gloo on CPU, as tests/runtime does."""
    import os
    import socket
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    full_env.update({k: str(v) for k, v in env.items()})
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(script), *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
