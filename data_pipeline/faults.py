"""Bad data: reasons, counting, rate-limited logging and the max-bad-fraction guard.

A fault is skipped, never fatal, until too large a share of what was read is broken: then
`DataFaultError` says so. webdataset's `warn_and_continue` is not used: it sleeps 0.5 s per
sample, which turns a corrupt shard into a stall.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("data_pipeline")

# Shard-level reasons (one count per shard read) ...
UNREADABLE_URL = "unreadable_url"        # open failed, missing file, `pipe:` command exited non-zero (after retries)
SHARD_TIMEOUT = "shard_timeout"          # a `pipe:` read sent no byte for data.shard_timeout_s (after retries)
TRUNCATED_TAR = "truncated_tar"          # tar stream ended inside a member or without its end marker
EMPTY_SHARD = "empty_shard"              # a readable tar with no sample in it
# ... and sample-level reasons (one count per sample).
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_LARGE = "image_too_large"      # header says more than data.max_image_pixels: refused before decoding
MISSING_CAPTION = "missing_caption"      # no caption member and no caption in the json
BAD_JSON = "bad_json"                    # json needed (caption or filters) but not parseable
MISSING_TENSOR = "missing_tensor"        # precomputed shards: a required array (latent_mean, text_hidden) is absent
UNDECODABLE_TENSOR = "undecodable_tensor"

SHARD_REASONS = (UNREADABLE_URL, SHARD_TIMEOUT, TRUNCATED_TAR, EMPTY_SHARD)
REASONS = SHARD_REASONS + (MISSING_IMAGE, EMPTY_IMAGE, UNDECODABLE_IMAGE, IMAGE_TOO_LARGE, MISSING_CAPTION, BAD_JSON,
                           MISSING_TENSOR, UNDECODABLE_TENSOR)


class DataFaultError(RuntimeError):
    """Too much of the data is broken to go on silently."""


@dataclass(frozen=True)
class Fault:
    """One skipped item; travels through the raw stream like a sample so counts stay exact."""
    reason: str
    url: str
    key: Optional[str] = None
    detail: str = ""


class FaultLog:
    """Log faults with shard and key, at most `per_minute` lines per process (token bucket)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.tokens = float(per_minute)
        self.last = time.monotonic()
        self.suppressed = 0

    def __call__(self, fault: Fault) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        self.tokens = min(float(self.per_minute), self.tokens + (now - self.last) * self.per_minute / 60.0)
        self.last = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return
        self.tokens -= 1.0
        more = f" ({self.suppressed} more faults not logged)" if self.suppressed else ""
        self.suppressed = 0
        where = f"{fault.url} key={fault.key}" if fault.key else fault.url
        log.warning("skipped bad data [%s] %s: %s%s", fault.reason, where, fault.detail[:300], more)


class Tally:
    """Good / filtered / bad counts; `take()` hands over what accumulated since the last take.

    Besides the raw samples: `shards` read to their end (or given up on) and how many of those were
    `bad_shards` (a shard-level fault), and `retries`, the shard reads that were tried again."""

    _SCALARS = ("good", "filtered", "shards", "bad_shards", "retries")

    def __init__(self):
        self.good = 0
        self.filtered = 0
        self.shards = 0
        self.bad_shards = 0
        self.retries = 0
        self.bad: Counter = Counter()
        self._sent = ({k: 0 for k in self._SCALARS}, Counter())

    @property
    def total(self) -> int:
        return self.good + self.filtered + sum(self.bad.values())

    def take(self) -> dict:
        scalars, bad = self._sent
        delta = {k: getattr(self, k) - scalars[k] for k in self._SCALARS}
        delta["bad"] = {k: v - bad.get(k, 0) for k, v in self.bad.items() if v - bad.get(k, 0)}
        self._sent = ({k: getattr(self, k) for k in self._SCALARS}, Counter(self.bad))
        return delta

    def add(self, delta: dict) -> None:
        for k in self._SCALARS:  # states saved before shards/retries were counted lack them: 0
            setattr(self, k, getattr(self, k) + delta.get(k, 0))
        self.bad.update(delta.get("bad", {}))

    def as_dict(self) -> dict:
        return {"good": self.good, "filtered": self.filtered, "bad": dict(sorted(self.bad.items())),
                "shards": self.shards, "bad_shards": self.bad_shards, "retries": self.retries}

    def check(self, max_fraction: float, min_samples: int, where: str, min_shards: int = 0) -> None:
        """Raise when more than `max_fraction` of the raw samples seen were bad, or of the shards read.

        A shard that could not be read is one bad item among the raw samples (its sample count is
        unknown) and one bad shard among the shards; the shard guard is what notices a run that loses
        a large share of its data to unreadable shards. It judges only after `min_shards` shards (0: off)."""
        if max_fraction >= 1.0:
            return
        bad = sum(self.bad.values())
        total = self.total
        if total >= min_samples and bad > max_fraction * total:
            top = ", ".join(f"{k}: {v}" for k, v in self.bad.most_common())
            raise DataFaultError(
                f"{where}: {bad} of {total} raw samples were bad ({bad / total:.1%} > data.max_bad_fraction = "
                f"{max_fraction}); by reason: {top}. Inspect the shards with `ldm data inspect URLS`, or raise "
                f"data.max_bad_fraction if this is expected.")
        if min_shards and self.shards >= min_shards and self.bad_shards > max_fraction * self.shards:
            top = ", ".join(f"{k}: {v}" for k, v in self.bad.most_common() if k in SHARD_REASONS)
            raise DataFaultError(
                f"{where}: {self.bad_shards} of {self.shards} shards read could not be used "
                f"({self.bad_shards / self.shards:.1%} > data.max_bad_fraction = {max_fraction}); by reason: {top} "
                f"({self.retries} retries so far). Check the storage or the URLs (`ldm data inspect URLS`), or "
                f"raise data.max_bad_fraction if this is expected.")
