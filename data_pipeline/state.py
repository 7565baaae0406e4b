"""Resumable position: seeds as pure functions, and the loader state as a plain dict.

WebDataset keeps no position of its own (ARCHITECTURE.md §8). Here every random choice of a worker
comes from `derive_seed(seed, epoch, rank, worker, ...)`, so a worker's stream of raw
(undecoded) samples is a pure function of those numbers. A batch carries how many raw samples
its worker had pulled when it was made; the trainer-side loader records that for each batch
it hands out. Resuming replays each worker's raw stream up to that count without decoding
(plus the few samples that were waiting in a partial aspect bucket) and restarts the
DataLoader's round-robin at the worker whose batch comes next.

Batches are dealt round-robin: global batch k of a rank comes from logical worker k % W, and
epoch e holds batches [e * B, (e + 1) * B) for B = batches_per_epoch, on every rank.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any

STATE_VERSION = 1


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings; stable across processes and Python runs."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return struct.unpack("<Q", h)[0] >> 1


def worker_batches(epoch: int, batches_per_epoch: int, num_workers: int, worker: int) -> int:
    """How many of epoch `epoch`'s batches logical worker `worker` makes (round-robin dealing)."""
    start, stop = epoch * batches_per_epoch, (epoch + 1) * batches_per_epoch

    def upto(n: int) -> int:  # count of k in [0, n) with k % num_workers == worker
        return (n - worker + num_workers - 1) // num_workers if n > worker else 0

    return upto(stop) - upto(start)


def fresh_position(epoch: int) -> dict:
    return {"epoch": epoch, "batches": 0, "raw": 0, "pending": []}


def settle(position: dict, batches_per_epoch: int, num_workers: int, worker: int) -> dict:
    """A worker that made all of its epoch's batches starts the next epoch from scratch."""
    pos = dict(position)
    while pos["batches"] >= worker_batches(pos["epoch"], batches_per_epoch, num_workers, worker):
        pos = fresh_position(pos["epoch"] + 1)
    return pos


def initial_positions(num_workers: int, batches_per_epoch: int, epoch: int = 0) -> list[dict]:
    return [settle(fresh_position(epoch), batches_per_epoch, num_workers, w) for w in range(num_workers)]


# The fields of a state that must match for an exact resume.
LAYOUT_KEYS = ("seed", "rank", "world_size", "num_workers", "batch_size", "batches_per_epoch")


def check_state(state: dict) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a data loader state of version {STATE_VERSION}: "
                         f"{str(state)[:200] if not isinstance(state, dict) else state.get('version')!r}")
    missing = [k for k in LAYOUT_KEYS + ("batches_consumed", "workers", "tally") if k not in state]
    if missing:
        raise ValueError(f"data loader state lacks {', '.join(missing)}")
    if len(state["workers"]) != max(1, state["num_workers"]):
        raise ValueError("data loader state: one position per worker expected")
