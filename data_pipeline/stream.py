"""What a DataLoader worker runs: raw samples -> seeded shuffle -> decode/filter -> batches.

Order matters for resuming: shard order, tar reading and the shuffle act on raw (undecoded)
samples and are pure functions of (seed, epoch, rank, worker); decoding comes after, with a
per-sample rng. So a worker can skip what the trainer already consumed by pulling raw
samples without decoding them (see state.py).

Each batch carries `__meta__`: the worker's position after it, and the good/filtered/bad counts
since its previous batch, which is how counts from worker processes reach the trainer.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset

from . import faults as F
from .config import DataConfig
from .faults import DataFaultError, Fault, FaultLog, Tally
from .samples import Batcher, Decoder, Filtered, Sample, collate
from .shards import (ReadPolicy, cycled_urls, mix, read_shard, read_shards, resampled_urls, split_by_rank,
                     split_by_worker)
from .state import derive_seed, worker_batches

# A worker that pulls this many raw items in a row without one usable sample gives up loudly
# (all shards unreadable, say) instead of spinning while the trainer waits.
MAX_BAD_STREAK = 10_000
# ... and likewise after this many shards in a row that gave nothing (each may cost its retries' backoff).
MAX_BAD_SHARD_STREAK = 100
SHARD_REASONS = F.SHARD_REASONS


def worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def shuffle(items: Iterator, bufsize: int, seed: int) -> Iterator:
    """Buffer shuffle with its own seeded rng (no global state); starts once the buffer is full."""
    if bufsize <= 1:
        yield from items
        return
    rng = random.Random(seed)
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


class _Judge:
    """Counts what a worker pulls, logs faults, and stops a stream that is mostly broken."""

    def __init__(self, cfg: DataConfig, where: str, check: bool = True):
        self.cfg = cfg
        self.where = where
        self.check = check
        self.tally = Tally()
        self.log = FaultLog(cfg.fault_log_per_minute)
        self.streak = 0
        self.shard_streak = 0
        self.policy = ReadPolicy.from_config(cfg)   # its retry count reaches the tally at each take()

    def take(self) -> dict:
        self.tally.retries = self.policy.retried
        return self.tally.take()

    def shard_end(self, item) -> None:
        """Count a shard when its last item (see read_shard) passes: shards counted = shards handed out."""
        if isinstance(item, Fault):
            if item.reason not in SHARD_REASONS:
                return
            self.tally.shards += 1
            self.tally.bad_shards += 1
            self.shard_streak += 1
            if self.check and self.shard_streak >= MAX_BAD_SHARD_STREAK:
                raise DataFaultError(f"{self.where}: {self.shard_streak} shards in a row gave no usable sample; "
                                     f"counts so far {self.tally.as_dict()}")
        elif item.get("__shard_end__"):
            self.tally.shards += 1

    def __call__(self, result) -> Optional[Sample]:
        if isinstance(result, Sample):
            self.tally.good += 1
            self.streak = self.shard_streak = 0
            return result
        if isinstance(result, Filtered):
            self.tally.filtered += 1
        else:
            self.tally.bad[result.reason] += 1
            self.log(result)
            if self.check:
                self.tally.check(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_samples, self.where,
                                 self.cfg.bad_fraction_min_shards)
        self.streak += 1
        if self.check and self.streak >= MAX_BAD_STREAK:
            raise DataFaultError(f"{self.where}: {self.streak} raw items in a row without a usable sample; "
                                 f"counts so far {self.tally.as_dict()}")
        return None


class TrainStream(IterableDataset):
    """Infinite per-worker batches; epoch e of logical worker w makes exactly worker_batches(e, ...) batches."""

    def __init__(self, cfg: DataConfig, sources: Sequence[tuple[list[str], float]], *, rank: int, world_size: int,
                 seed: int, batch_size: int, batches_per_epoch: int, positions: list[dict], worker_offset: int):
        super().__init__()
        self.cfg = cfg
        self.sources = [(list(u), float(w)) for u, w in sources]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.positions = positions
        self.worker_offset = worker_offset  # the DataLoader always starts at worker 0; resume may not

    def __iter__(self):
        physical, nworkers = worker_info()
        worker = (physical + self.worker_offset) % nworkers  # logical worker: what seeds and positions use
        judge = _Judge(self.cfg, f"rank {self.rank} worker {worker}")
        decoder = Decoder(self.cfg, train=True)
        start: Optional[dict] = self.positions[worker]
        epoch = start["epoch"]
        while True:
            yield from self._epoch(epoch, worker, nworkers, start, decoder, judge)
            epoch, start = epoch + 1, None

    def _shard_orders(self, epoch: int, worker: int, nworkers: int) -> list[Iterator]:
        orders = []
        for d, (urls, _) in enumerate(self.sources):
            seed = derive_seed(self.seed, "shards", epoch, self.rank, worker, d)
            if self.cfg.resampled:
                orders.append(resampled_urls(urls, seed))
            else:
                mine = split_by_worker(split_by_rank(urls, self.rank, self.world_size), worker, nworkers)
                orders.append(cycled_urls(mine, seed))
        return orders

    def _rng(self, epoch: int, worker: int, index: int) -> random.Random:
        return random.Random(derive_seed(self.seed, "sample", epoch, self.rank, worker, index))

    def _epoch(self, epoch, worker, nworkers, start, decoder, judge):
        target = worker_batches(epoch, self.batches_per_epoch, nworkers, worker)
        made = start["batches"] if start else 0
        if made >= target:
            return
        streams = [read_shards(order, judge.policy) for order in self._shard_orders(epoch, worker, nworkers)]
        raw = mix(streams, [w for _, w in self.sources], derive_seed(self.seed, "mix", epoch, self.rank, worker))
        items = shuffle(raw, self.cfg.shuffle_buffer, derive_seed(self.seed, "shuffle", epoch, self.rank, worker))
        batcher = Batcher(self.batch_size)
        index = 0
        try:
            if start and start["raw"]:
                # Resume: skip what was consumed without decoding; re-decode only the samples that were
                # waiting in partial buckets (same per-sample rng, so the same pixels).
                wanted = {i for _, idxs in start["pending"] for i in idxs}
                kept = {}
                for _ in range(start["raw"]):
                    item = next(items)
                    if index in wanted:
                        kept[index] = item
                    index += 1
                for _, idxs in start["pending"]:
                    for i in idxs:
                        sample = decoder(kept[i], self._rng(epoch, worker, i))
                        if not isinstance(sample, Sample):
                            raise RuntimeError(f"resume: pending sample {i} no longer decodes ({sample})")
                        batcher.add(i, sample)
            for item in items:
                i, index = index, index + 1
                judge.shard_end(item)
                result = item if isinstance(item, Fault) else decoder(item, self._rng(epoch, worker, i))
                sample = judge(result)
                if sample is None:
                    continue
                full = batcher.add(i, sample)
                if full is None:
                    continue
                made += 1
                batch = collate(full, with_meta=False)
                batch["__meta__"] = {"worker": worker, "epoch": epoch, "batches": made, "raw": index,
                                     "pending": batcher.pending(), "tally": judge.take()}
                yield batch
                if made >= target:
                    return
        finally:  # stop readers (and `pipe:` processes) of the abandoned shards now, not at GC time
            items.close()
            raw.close()
            for s in streams:
                s.close()


class OnePassStream(IterableDataset):
    """Each shard of this rank once, split over workers; every good sample exactly once.

    The last item of every worker is a batch-less `__meta__` with `final: True`, so counts of
    faults after the last batch (or of a worker without any good sample) still arrive."""

    def __init__(self, cfg: DataConfig, urls: Sequence[str], *, batch_size: int, with_meta: bool = False,
                 rank: int = 0):
        super().__init__()
        self.cfg = cfg
        self.urls = list(urls)
        self.batch_size = batch_size
        self.with_meta = with_meta
        self.rank = rank

    def __iter__(self):
        worker, nworkers = worker_info()
        mine = split_by_worker(self.urls, worker, nworkers)
        if not mine:
            raise ValueError(f"rank {self.rank}: DataLoader worker {worker} of {nworkers} gets no shard "
                             f"({len(self.urls)} shards on this rank); use at most {len(self.urls)} workers")
        judge = _Judge(self.cfg, f"rank {self.rank} worker {worker}", check=False)  # judged after the pass
        decoder = Decoder(self.cfg, train=False, with_meta=self.with_meta)
        batcher = Batcher(self.batch_size)
        done: list = []  # (url, status) of finished shards, released once none of their samples waits

        def pack(samples: Optional[list], final: bool = False) -> dict:
            waiting = batcher.pending_urls()
            ready = [d for d in done if final or d[0] not in waiting]
            for d in ready:
                done.remove(d)
            batch = collate(samples, self.with_meta) if samples else {}
            batch["__meta__"] = {"worker": worker, "final": final, "tally": judge.take(), "shards_done": ready}
            return batch

        for url in mine:
            status = "ok"
            for item in read_shard(url, judge.policy):
                judge.shard_end(item)
                if isinstance(item, Fault) and item.reason in SHARD_REASONS:
                    status = item.reason
                sample = judge(item if isinstance(item, Fault) else decoder(item, None))
                if sample is None:
                    continue
                full = batcher.add(0, sample)
                if full is not None:
                    yield pack(full)
            done.append((url, status))
        for rest in batcher.flush():
            yield pack(rest)
        yield pack(None, final=True)
