"""The loaders the runtime calls: an endless, resumable training loader and a one-pass loader.

Both wrap a torch DataLoader over the worker streams of stream.py (the DataLoader batches
nothing: workers hand over whole batches), take each batch's `__meta__` off, add its counts
to the trainer-side totals, and scale raw images to float32 [-1, 1] here in the main process
(uint8 crosses the process boundary: a quarter of the bytes). The runtime's training loader
skips that scaling (`uint8_images=True`) and does it on the training device.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from .config import DataConfig
from .faults import Tally
from .shards import expand_urls, split_by_rank, split_by_worker, split_holdout
from .state import LAYOUT_KEYS, STATE_VERSION, check_state, initial_positions, settle
from .stream import OnePassStream, TrainStream
from .transforms import flip_contradiction, says_left_or_right, to_float

DEFAULT_BATCHES_PER_EPOCH = 1000


def _identity(x):
    return x


def _dataloader(dataset, cfg: DataConfig, num_workers: int) -> DataLoader:
    # An own generator: starting an iterator draws its base seed from it instead of from the global torch
    # RNG. A resumed run starts its iterator at the resume step, not at step 0, so a draw from the global
    # stream would shift every later noise / timestep / dropout draw (training noise is restored exactly
    # from the checkpoint's RNG state). Our workers seed themselves from (seed, epoch, rank, worker) anyway.
    kwargs: dict = dict(batch_size=None, num_workers=num_workers, collate_fn=_identity,
                        generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        kwargs["prefetch_factor"] = cfg.prefetch_factor
        if cfg.multiprocessing_context != "default":
            kwargs["multiprocessing_context"] = cfg.multiprocessing_context
    return DataLoader(dataset, **kwargs)


def _finish(batch: dict, pin: bool, uint8_images: bool = False) -> dict:
    """Scale uint8 images to float (unless the caller scales them on its device); then pin."""
    image = batch.get("image")
    if image is not None and not image.dtype.is_floating_point and not uint8_images:
        batch["image"] = to_float(image)
    if pin and torch.cuda.is_available():
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _fingerprint(cfg: DataConfig) -> str:
    """What decides the sample sequence besides the layout: a changed value makes resuming approximate."""
    keys = ("urls", "sources", "kind", "image_size", "image_keys", "caption_key", "caption_json_field",
            "allow_empty_caption", "resampled", "shuffle_buffer", "crop", "flip_prob", "interpolation",
            "aspect_buckets", "bucket_step", "bucket_max_ratio", "min_original_size", "max_aspect_ratio",
            "json_filters")
    picked = {k: getattr(cfg, k) for k in keys}
    if cfg.val_fraction and not cfg.val_urls:  # it changes the training shards (absent when off: old states match)
        picked["val_fraction"] = cfg.val_fraction
    if not cfg.mirror_captions:  # the captions a mirrored sample carries (absent at the default: old states match)
        picked["mirror_captions"] = False
    blob = json.dumps(picked, sort_keys=True, default=lambda o: o.__dict__)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- held-out shards

def training_sources(cfg: DataConfig) -> list[tuple[list[str], float]]:
    """(expanded shard list, weight) per source of the training mix, without the shards data.val_fraction holds out."""
    out = []
    for source in cfg.all_sources():
        urls = expand_urls(source.urls)
        if cfg.val_fraction > 0 and not cfg.val_urls:
            urls = split_holdout(urls, cfg.val_fraction)[0]
        out.append((urls, source.weight))
    return out


def heldout_urls(cfg: DataConfig) -> list[str]:
    """The validation shards: data.val_urls as given, else the shards data.val_fraction holds out of the
    training data (of each source of a mix; the rule is in DataConfig and shards.split_holdout), else []."""
    if cfg.val_urls:
        return list(cfg.val_urls)
    if cfg.val_fraction <= 0:
        return []
    return [u for source in cfg.all_sources() for u in split_holdout(expand_urls(source.urls), cfg.val_fraction)[1]]


# ----------------------------------------------------------------------------- training

class TrainLoader:
    """Endless batches for one rank; epoch e is batches [e * len(self), (e + 1) * len(self)) on every rank.

    `next(loader)` / `for batch in loader` run forever; `iter_epoch()` yields the rest of the
    current epoch. `state_dict()` is the position after the last batch handed out."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, seed: int, batch_size: int,
                 state: Optional[dict] = None, uint8_images: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} is not a valid layout")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.uint8_images = uint8_images   # raw images stay uint8 [B, H, W, 3]: the caller scales them on its device
        self.sources = training_sources(cfg)   # without the shards data.val_fraction holds out
        if not self.sources or not any(u for u, _ in self.sources):
            raise ValueError("data.urls (or data.sources) is empty: nothing to train on")
        self.num_workers = cfg.num_workers
        self.nlogical = max(1, cfg.num_workers)
        for i, (urls, _) in enumerate(self.sources):
            if not urls:
                raise ValueError(f"data.sources[{i}] expands to no shard")
            if not cfg.resampled:  # a worker without a shard could not make its share of batches
                mine = split_by_rank(urls, rank, world_size)
                for w in range(self.nlogical):
                    if not split_by_worker(mine, w, self.nlogical):
                        raise ValueError(
                            f"data.resampled = false: rank {rank} worker {w} gets no shard of "
                            f"{'data.urls' if not cfg.sources else f'data.sources[{i}]'} ({len(urls)} shards for "
                            f"{world_size} ranks x {self.nlogical} workers); use resampled: true, fewer workers, "
                            f"or more shards")
        if cfg.batches_per_epoch:
            self.batches_per_epoch = cfg.batches_per_epoch
        elif cfg.samples_per_epoch:
            self.batches_per_epoch = max(1, math.ceil(cfg.samples_per_epoch / (batch_size * world_size)))
        else:
            self.batches_per_epoch = DEFAULT_BATCHES_PER_EPOCH
        self._consumed = 0
        self._positions = initial_positions(self.nlogical, self.batches_per_epoch)
        self._tally = Tally()
        self._it: Optional[Iterator] = None
        self._loader: Optional[DataLoader] = None
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._consumed // self.batches_per_epoch

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        meta = batch.pop("__meta__")
        w = meta["worker"]
        if w != self._consumed % self.nlogical:  # round-robin broken: positions would be wrong
            raise RuntimeError(f"data loader: batch {self._consumed} came from worker {w}, expected "
                               f"{self._consumed % self.nlogical}")
        self._positions[w] = settle({k: meta[k] for k in ("epoch", "batches", "raw", "pending")},
                                    self.batches_per_epoch, self.nlogical, w)
        self._tally.add(meta["tally"])
        self._consumed += 1
        self._tally.check(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_samples, f"rank {self.rank}",
                          self.cfg.bad_fraction_min_shards)
        if self._consumed == 1:
            self._warn_if_flips_contradict(batch.get("caption") or [])
        return _finish(batch, self.cfg.pin_memory, self.uint8_images)

    def _warn_if_flips_contradict(self, captions: list) -> None:
        """Raw images are mirrored here with data.flip_prob: say so once (first batch) when captions name a side
        and are not mirrored with them (data.mirror_captions false).
        (Precomputed data is checked when its mirrors are written: data_pipeline/precompute.py.)"""
        if self.cfg.kind != "raw" or self.cfg.flip_prob <= 0 or self.cfg.mirror_captions or self.rank != 0:
            return
        count = sum(says_left_or_right(c) for c in captions)
        if count:
            warnings.warn(flip_contradiction(count, len(captions), f"images are mirrored with probability "
                                             f"{self.cfg.flip_prob:g} (counted in the first batch)"), stacklevel=3)

    def iter_epoch(self) -> Iterator[dict]:
        """The batches left in the current epoch (all of them at an epoch start)."""
        for _ in range(self.batches_per_epoch - self._consumed % self.batches_per_epoch):
            yield next(self)

    def _start(self) -> None:
        dataset = TrainStream(self.cfg, self.sources, rank=self.rank, world_size=self.world_size, seed=self.seed,
                              batch_size=self.batch_size, batches_per_epoch=self.batches_per_epoch,
                              positions=copy.deepcopy(self._positions),
                              worker_offset=self._consumed % self.nlogical)
        self._loader = _dataloader(dataset, self.cfg, self.num_workers)
        self._it = iter(self._loader)

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ counts

    def fault_counts(self) -> dict[str, int]:
        """Bad samples by reason, cumulative over the batches handed out (workers included)."""
        return dict(sorted(self._tally.bad.items()))

    def counts(self) -> dict:
        """{"good", "filtered", "bad": {reason: n}, "bad_total", "shards", "bad_shards", "retries"} over the
        batches handed out (retries: shard reads tried again, in the worker processes)."""
        d = self._tally.as_dict()
        d["bad_total"] = sum(d["bad"].values())
        return d

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.nlogical, "batch_size": self.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "batches_consumed": self._consumed,
            "epoch": self.epoch,
            "samples_consumed": self._consumed * self.batch_size,
            "workers": copy.deepcopy(self._positions),
            "tally": self._tally.as_dict(),
            "fingerprint": _fingerprint(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        check_state(state)
        self.close()
        self._tally = Tally()
        self._tally.add(state["tally"])
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": self.nlogical,
                "batch_size": self.batch_size, "batches_per_epoch": self.batches_per_epoch}
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in LAYOUT_KEYS if state[k] != mine[k]]
        if changed:
            # Positions of another layout mean nothing here: go on from the start of the next epoch.
            epoch = state["batches_consumed"] // state["batches_per_epoch"] + 1
            warnings.warn(f"data loader state was saved with another layout ({'; '.join(changed)}): resuming at "
                          f"the start of epoch {epoch}, not at the exact batch", RuntimeWarning, stacklevel=2)
            self._consumed = epoch * self.batches_per_epoch
            self._positions = initial_positions(self.nlogical, self.batches_per_epoch, epoch)
            return
        if state.get("fingerprint") not in (None, _fingerprint(self.cfg)):
            warnings.warn("data config changed since this loader state was saved (urls, shuffle or transforms): "
                          "the resumed sequence follows the new config", RuntimeWarning, stacklevel=2)
        self._consumed = int(state["batches_consumed"])
        self._positions = copy.deepcopy(state["workers"])


# ----------------------------------------------------------------------------- one pass

class OnePassLoader:
    """One pass over the shards of this rank: every good sample exactly once across ranks x workers.

    Iterating again makes another pass. Workers are capped at this rank's shard count, so none idles."""

    def __init__(self, cfg: DataConfig, urls: str | Sequence[str], *, rank: int, world_size: int, batch_size: int,
                 with_meta: bool = False, check_bad_fraction: bool = True, num_workers: Optional[int] = None,
                 expanded: bool = False):
        all_urls = list(urls) if expanded else expand_urls(urls)
        if not all_urls:
            raise ValueError("no shard URLs given")
        self.urls = split_by_rank(all_urls, rank, world_size)
        if not self.urls:
            raise ValueError(f"rank {rank} of {world_size} gets no shard: only {len(all_urls)} shards; "
                             f"use at most {len(all_urls)} ranks or split the data into more shards")
        self.cfg = cfg
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.with_meta, self.check_bad_fraction = with_meta, check_bad_fraction
        wanted = cfg.num_workers if num_workers is None else num_workers
        self.num_workers = min(wanted, len(self.urls))
        self._tally = Tally()  # over all passes
        self.last_pass: Optional[Tally] = None

    def __iter__(self) -> Iterator[dict]:
        for batch, _ in self.events():
            if batch is not None:
                yield batch

    def events(self) -> Iterator[tuple[Optional[dict], list]]:
        """(batch or None, shards finished) pairs; a shard is reported once all its samples were handed out."""
        dataset = OnePassStream(self.cfg, self.urls, batch_size=self.batch_size, with_meta=self.with_meta,
                                rank=self.rank)
        tally = self.last_pass = Tally()
        for item in _dataloader(dataset, self.cfg, self.num_workers):
            meta = item.pop("__meta__")
            tally.add(meta["tally"])
            self._tally.add(meta["tally"])
            batch = None if meta["final"] else _finish(item, self.cfg.pin_memory)
            yield batch, [tuple(d) for d in meta["shards_done"]]
        if self.check_bad_fraction:
            tally.check(self.cfg.max_bad_fraction, self.cfg.bad_fraction_min_samples, f"rank {self.rank}",
                        self.cfg.bad_fraction_min_shards)

    def fault_counts(self) -> dict[str, int]:
        return dict(sorted(self._tally.bad.items()))

    def counts(self) -> dict:
        d = self._tally.as_dict()
        d["bad_total"] = sum(d["bad"].values())
        return d


# ----------------------------------------------------------------------------- the API

def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int, batch_size: int,
                       state: Optional[dict] = None, uint8_images: bool = False) -> TrainLoader:
    """Endless, resumable training batches for this rank (same count per epoch on every rank). With
    `uint8_images`, raw images come as uint8 [B, H, W, 3] for `transforms.to_float_on_device`."""
    return TrainLoader(cfg, rank=rank, world_size=world_size, seed=seed, batch_size=batch_size, state=state,
                       uint8_images=uint8_images)


def build_eval_loader(cfg: DataConfig, urls: str | Sequence[str], *, rank: int, world_size: int,
                      batch_size: int) -> OnePassLoader:
    """One pass, center crop, no flip: each good sample exactly once across ranks x workers."""
    return OnePassLoader(cfg, urls, rank=rank, world_size=world_size, batch_size=batch_size)
