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
a damaged one with a warning. Pruning only ever removes tags older than a complete newer one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
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
        """`also`: anything with save(tag_dir, rank) that belongs in the checkpoint (post-hoc EMA profiles)."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.env.is_main:
            if tag_dir.exists():  # debris of an interrupted save of this same step
                shutil.rmtree(tag_dir)
            tag_dir.mkdir(parents=True)
        D.barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tag_dir), tag=name, save_latest=False,
                                   client_state={"step": step,
                                                 "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
        if ema is not None:
            ema.save(tag_dir / "ema", self.env.rank)
        if also is not None:
            also.save(tag_dir, self.env.rank)
        (tag_dir / "state").mkdir(exist_ok=True)
        torch.save(rank_state, tag_dir / "state" / f"rank_{self.env.rank:05d}.pt")
        D.barrier()  # every rank's shards are on disk
        if self.env.is_main:
            (tag_dir / "meta.json").write_text(json.dumps({**meta, "step": step, "tag": tag}, indent=1))
            _atomic_write(tag_dir / COMPLETE, json.dumps({"files": _manifest(tag_dir)}))
            _atomic_write(self.root / LATEST, tag)
            self._prune(keep_tag=tag)
        D.barrier()
        return tag_dir

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
