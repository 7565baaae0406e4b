"""Process-group setup from torchrun / srun / plain environment, and the few collectives we use."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from .runlock import die_with_parent


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else srun's, else a single process.

    Under `srun` without torchrun (one task per GPU) the SLURM_* variables describe the job; we
    export the torch names so that DeepSpeed and torch.distributed see one consistent picture."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        rank, world, local = (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                              int(os.environ.get("SLURM_LOCALID", 0)))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 1000))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local
    return 0, 1, 0


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Initialise torch.distributed (and DeepSpeed's view of it). gloo on CPU, nccl on CUDA.

    `timeout_s` (runtime.collective_timeout_s) bounds every collective: gloo raises after it when a peer hangs
    (at once when the peer's connection closes); NCCL aborts the communicator on it (async error handling)."""
    import deepspeed

    # NCCL: a timed-out or failed collective aborts (and raises) instead of hanging; set before the group exists.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "0")

    rank, world, local_rank = read_env()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()       # a torchrun worker (own session) must not train on after its agent is killed
    if world == 1 and "MASTER_PORT" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps one store across restarts: without a per-attempt prefix a restarted
            # worker reads the dead attempt's gloo addresses ("Connection refused" in connectFullMesh)
            store = dist.PrefixStore(f"ldm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
                                     dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                                   is_master=False, timeout=timeout))
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    if world > 1:   # one line per rank: which process landed where (the first thing to read when a job hangs)
        node = os.environ.get("SLURMD_NODENAME")
        print(f"[ldm] rank {rank} of world {world} (local rank {local_rank}) on host {socket.gethostname()}"
              + (f" node {node}" if node else "") + f" pid {os.getpid()} {backend}", file=sys.stderr, flush=True)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_collective_error(e: BaseException) -> bool:
    """A torch.distributed error, or a backend's RuntimeError about a peer or a timeout (a lost or hung rank)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return any(k in text for k in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset",
                                   "Broken pipe", "Timed out", "timed out", "ProcessGroup", "by peer"))


def all_gather_object(obj) -> list:
    """One picklable object from every rank, in rank order ([obj] alone)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def destroy() -> None:
    """Tear the process group down explicitly: gloo can abort at interpreter exit otherwise."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer may already be gone; teardown must still proceed
            pass
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that trained under a process group, after `destroy`: run the atexit handlers (wandb,
    logging) while the interpreter is whole, flush, and leave with os._exit, skipping the interpreter's
    teardown. That teardown destroys what is still alive in C++ in no order we control, among them the
    process groups DeepSpeed keeps in module globals (its world clone, ZeRO's groups) with gloo's worker
    threads. A completed 2-rank ZeRO-3 run once aborted at exit (SIGABRT, "terminate called without an
    active exception", the message of a C++ thread destroyed unjoined) after its last checkpoint and
    weights were written, and torchrun and Slurm report that as a failed job. Not reproduced in 33 more
    runs; nothing a run writes happens after this point."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of a dict of scalars with the same keys on every rank."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum dicts of counters whose keys may differ between ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return total


def all_reduce_sum_(t: torch.Tensor) -> None:
    """In-place sum over ranks (no-op alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


def broadcast_(t: torch.Tensor, src: int) -> None:
    """In-place copy from rank `src` (no-op alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src)
