"""Sharded checkpoints that a kill can never leave half-trusted.

Layout of one checkpoint (a "tag", named after the step):

    RUN_DIR/checkpoints/step_00001000/
        <engine>/...                 DeepSpeed's own sharded save, one folder per engine
        ema/rank_XXXXX.safetensors   EMA (one file per rank under ZeRO-3, else one file)
        ema_phema_<sigma>/...        the post-hoc EMA profiles, the same way (launch/runtime/posthoc.py)
        state/rank_XXXXX.pt          per-rank RNG states, data position, log accumulators
        meta.json                    step, world size, ZeRO stage, config hash, engine names
        COMPLETE                     manifest (every file and its size), written last
    RUN_DIR/checkpoints/latest       name of the newest complete tag (atomic rename)

DeepSpeed writes its own `latest` file before its final barrier, so it could name a tag whose
other shards are still being written: we save with `save_latest=False`, barrier, and only then
rank 0 writes the manifest and our `latest`. Resume walks complete tags newest first, checks
every file of the manifest is present at its recorded size on every rank, and falls back past
a damaged one with a warning. Pruning only ever removes tags older than a complete newer one, and
only after the new tag is complete and named by `latest`.

A write that fails (a full disk, an I/O error) is caught on its rank; the ranks agree on it through an
all-reduce at the end of each phase, so none is left waiting in a collective, the partial tag is removed
and every rank raises CheckpointSaveFailed naming the path and the MiB free (train.py: EXIT_SAVE_FAILED).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist as D

COMPLETE = "COMPLETE"
LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_")[1])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- RNG state

def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- manifest

def _manifest(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}


def check_complete(tag_dir: Path) -> str | None:
    """None when every file of the manifest is present at its recorded size, else the reason."""
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, size in files.items():
        p = tag_dir / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != size:
            return f"file {rel} has {p.stat().st_size} bytes, manifest says {size} (truncated or corrupted)"
    return None


class CheckpointSaveFailed(RuntimeError):
    """A save failed on some rank (every rank raises it, with the same message); train.py exits EXIT_SAVE_FAILED."""


def free_mib(path: Path) -> float:
    """MiB free for an unprivileged writer on the filesystem of `path` (its nearest existing ancestor)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free / 2 ** 20
    except OSError:
        return float("nan")


_WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError)
try:
    from safetensors import SafetensorError       # safetensors' own type for a failed write
    _WRITE_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover
    pass


class _Failure:
    """The first write that failed on this rank during one save: phase, path, error, free MiB at that moment."""

    def __init__(self, rank: int, root: Path):
        self.rank, self.root = rank, root
        self.what: str | None = None

    def __bool__(self) -> bool:
        return self.what is not None

    def record(self, phase: str, path, error: BaseException) -> None:
        if self.what is None:
            where = getattr(error, "filename", None) or path
            self.what = (f"rank {self.rank}, {phase}: writing {where} failed with {type(error).__name__}: "
                         f"{str(error).strip()[:300]} ({free_mib(Path(where)):.1f} MiB free on "
                         f"{_mount_of(self.root)})")

    @contextlib.contextmanager
    def phase(self, phase: str, path):
        try:
            yield
        except _WRITE_ERRORS as e:
            if D.is_collective_error(e):
                raise
            self.record(phase, path, e)

    def report(self) -> str | None:
        return self.what


def _mount_of(path: Path) -> str:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


class _GuardedCheckpointEngine:
    """DeepSpeed's checkpoint engine with its writes guarded: a failed save or makedirs is recorded and the
    following writes of this save are skipped, while DeepSpeed's collectives run exactly as on the other ranks."""

    def __init__(self, inner, failure: _Failure, phase: str):
        self._inner, self._failure, self._phase = inner, failure, phase

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, state_dict, path):
        if self._failure:
            return None
        with self._failure.phase(self._phase, path):
            return self._inner.save(state_dict, path)

    def makedirs(self, path, exist_ok=False):
        if self._failure:
            return None
        with self._failure.phase(self._phase, path):
            return self._inner.makedirs(path, exist_ok=exist_ok)


@contextlib.contextmanager
def _guarded(engine, failure: _Failure, phase: str):
    inner = getattr(engine, "checkpoint_engine", None)
    copy_script = engine.__dict__.get("_copy_recovery_script")
    if inner is not None:
        engine.checkpoint_engine = _GuardedCheckpointEngine(inner, failure, phase)
    if hasattr(engine, "_copy_recovery_script"):
        original = engine._copy_recovery_script

        def copy_recovery_script(save_path):      # rank 0's copy of zero_to_fp32.py, a write like the others
            if not failure:
                with failure.phase(phase, save_path):
                    original(save_path)
        engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        if inner is not None:
            engine.checkpoint_engine = inner
        if copy_script is None:
            engine.__dict__.pop("_copy_recovery_script", None)
        else:
            engine._copy_recovery_script = copy_script


PAUSE_ENV = "LDM_TEST_SAVE_PAUSE"


def _pause_hook(step: int, phase: str, run_dir: Path, rank: int) -> None:
    """Test hook (tests/faults): LDM_TEST_SAVE_PAUSE=STEP:PHASE[:RANK][,...] makes the save of STEP stop at PHASE
    (start, engines, shards, complete): it creates RUN_DIR/save_paused_STEP_PHASE_rankR and waits until that
    file is removed (at most 10 minutes), so a test can kill the job or fill the disk at that point. Once per
    marker: a marker left by a killed attempt means that pause has happened, and a restart goes on."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    for one in spec.split(","):
        parts = one.split(":")
        if int(parts[0]) == step and parts[1] == phase and (len(parts) < 3 or int(parts[2]) == rank):
            break
    else:
        return
    marker = Path(run_dir) / f"save_paused_{step}_{phase}_rank{rank}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    deadline = time.time() + 600
    while marker.exists() and time.time() < deadline:
        time.sleep(0.05)


@dataclass
class Loaded:
    tag: str
    step: int
    meta: dict
    rank_state: dict | None          # None when this rank did not exist in the saved run
    tag_dir: Path


class CheckpointManager:
    def __init__(self, run_dir: str | Path, env: D.DistEnv, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.env = env
        self.keep = keep

    # ------------------------------------------------------------------ save (collective)

    def save(self, step: int, engines: dict, ema, rank_state: dict, meta: dict, also=None) -> Path:
        """`also`: anything with save(tag_dir, rank) that belongs in the checkpoint (post-hoc EMA profiles).

        Every rank runs the same collectives whatever fails: a write that fails (OSError, RuntimeError: a full
        disk, an I/O error) is recorded, not raised, until the ranks agree on a failure flag (all-reduce); then
        the partial tag is removed and every rank raises CheckpointSaveFailed naming the path and the free space.
        DeepSpeed's own writes go through a guard on its checkpoint engine, so its barriers still line up."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        failure = _Failure(self.env.rank, self.root)
        _pause_hook(step, "start", self.root.parent, self.env.rank)
        if self.env.is_main:
            with failure.phase("create the tag directory", tag_dir):
                if tag_dir.exists():  # debris of an interrupted save of this same step
                    shutil.rmtree(tag_dir)
                tag_dir.mkdir(parents=True)
        self._agree(failure, tag_dir, step)            # (also the barrier before anyone writes into it)
        for name, engine in engines.items():
            with _guarded(engine, failure, f"DeepSpeed save of engine '{name}'"):
                engine.save_checkpoint(str(tag_dir), tag=name, save_latest=False,
                                       client_state={"step": step,
                                                     "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
        _pause_hook(step, "engines", self.root.parent, self.env.rank)
        if ema is not None and not failure:
            with failure.phase("EMA", tag_dir / "ema"):
                ema.save(tag_dir / "ema", self.env.rank)
        if also is not None and not failure:
            with failure.phase("post-hoc EMA profiles", tag_dir):
                also.save(tag_dir, self.env.rank)
        if not failure:
            state_path = tag_dir / "state" / f"rank_{self.env.rank:05d}.pt"
            with failure.phase("rank state", state_path):
                state_path.parent.mkdir(exist_ok=True)
                torch.save(rank_state, state_path)
        self._agree(failure, tag_dir, step)            # every rank's shards are on disk
        _pause_hook(step, "shards", self.root.parent, self.env.rank)
        if self.env.is_main:
            with failure.phase("meta.json and the COMPLETE manifest", tag_dir / COMPLETE):
                _atomic_write(tag_dir / "meta.json", json.dumps({**meta, "step": step, "tag": tag}, indent=1))
                _atomic_write(tag_dir / COMPLETE, json.dumps({"files": _manifest(tag_dir)}))
            if not failure:
                _pause_hook(step, "complete", self.root.parent, self.env.rank)
                with failure.phase("the latest pointer", self.root / LATEST):
                    _atomic_write(self.root / LATEST, tag)
        self._agree(failure, tag_dir, step)
        if self.env.is_main:
            self._prune(keep_tag=tag)   # only now: the new tag is complete and named by `latest`
        D.barrier()
        return tag_dir

    def _agree(self, failure: "_Failure", tag_dir: Path, step: int) -> None:
        """All-reduce the failure flag; on a failure anywhere: every rank learns what failed where, rank 0
        removes the partial tag (the previous complete checkpoint and `latest` are untouched), all raise."""
        if not D.all_reduce_max([1.0 if failure else 0.0], self.env.device)[0]:
            return
        reports = [r for r in D.all_gather_object(failure.report()) if r]
        if self.env.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)
            latest = self.root / LATEST
            if latest.is_file() and latest.read_text().strip() == tag_dir.name:   # failed after moving it
                previous = [t for t in self.candidates() if t != tag_dir.name and check_complete(self.root / t) is None]
                if previous:
                    _atomic_write(latest, previous[0])
                else:
                    latest.unlink(missing_ok=True)
        D.barrier()
        kept = [t for t in self.candidates() if check_complete(self.root / t) is None]
        raise CheckpointSaveFailed(
            f"checkpoint {tag_dir.name} (step {step}) could not be written: " + "; ".join(reports)
            + f". The partial {tag_dir} was removed; "
            + (f"the previous complete checkpoint {kept[0]} is intact and a restart resumes from it"
               if kept else "there is no earlier complete checkpoint")
            + ". Free space (or fix the storage) and start again.")

    def _prune(self, keep_tag: str) -> None:
        tags = sorted((p.name for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal")),
                      key=step_of)
        complete = [t for t in tags if (self.root / t / COMPLETE).is_file()]
        keep = set(complete[-self.keep:]) | {keep_tag}
        newest = step_of(keep_tag)
        for t in tags:
            if t not in keep and step_of(t) < newest:
                shutil.rmtree(self.root / t, ignore_errors=True)
                shutil.rmtree(self.root / f"{t}_universal", ignore_errors=True)

    # ------------------------------------------------------------------ resume (collective)

    def candidates(self) -> list[str]:
        if not self.root.is_dir():
            return []
        tags = sorted((p.name for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal")),
                      key=step_of, reverse=True)
        latest = self.root / LATEST
        if latest.is_file():
            named = latest.read_text().strip()
            if named in tags:  # the pointer first; everything else newest first
                tags.remove(named)
                tags.insert(0, named)
        return tags

    def find_resumable(self, log) -> str | None:
        """Newest tag that is complete and intact on every rank; warns about each one skipped."""
        for tag in self.candidates():
            problem = check_complete(self.root / tag)
            bad = D.all_reduce_max([1.0 if problem else 0.0], self.env.device)[0]
            if bad:
                log(f"warning: checkpoint {tag} is not usable ({problem or 'damaged on another rank'}); "
                    f"falling back to an earlier one")
                continue
            return tag
        return None

    def read_meta(self, tag: str) -> dict:
        return json.loads((self.root / tag / "meta.json").read_text())

    def load_rank_state(self, tag: str) -> dict | None:
        path = self.root / tag / "state" / f"rank_{self.env.rank:05d}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
