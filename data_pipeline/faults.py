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
UNREADABLE_URL = "unreadable_url"        # open failed, missing file, `pipe:` command exited non-zero
TRUNCATED_TAR = "truncated_tar"          # tar stream ended inside a member or without its end marker
EMPTY_SHARD = "empty_shard"              # a readable tar with no member at all
# ... and sample-level reasons (one count per sample).
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"      # no caption member and no caption in the json
BAD_JSON = "bad_json"                    # json needed (caption or filters) but not parseable
MISSING_TENSOR = "missing_tensor"        # precomputed shards: a required array (latent_mean, text_hidden) is absent
UNDECODABLE_TENSOR = "undecodable_tensor"

REASONS = (UNREADABLE_URL, TRUNCATED_TAR, EMPTY_SHARD, MISSING_IMAGE, EMPTY_IMAGE, UNDECODABLE_IMAGE,
           MISSING_CAPTION, BAD_JSON, MISSING_TENSOR, UNDECODABLE_TENSOR)


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
    """Good / filtered / bad counts; `take()` hands over what accumulated since the last take."""

    def __init__(self):
        self.good = 0
        self.filtered = 0
        self.bad: Counter = Counter()
        self._sent = (0, 0, Counter())

    @property
    def total(self) -> int:
        return self.good + self.filtered + sum(self.bad.values())

    def take(self) -> dict:
        good, filtered, bad = self._sent
        delta = {"good": self.good - good, "filtered": self.filtered - filtered,
                 "bad": {k: v - bad.get(k, 0) for k, v in self.bad.items() if v - bad.get(k, 0)}}
        self._sent = (self.good, self.filtered, Counter(self.bad))
        return delta

    def add(self, delta: dict) -> None:
        self.good += delta.get("good", 0)
        self.filtered += delta.get("filtered", 0)
        self.bad.update(delta.get("bad", {}))

    def as_dict(self) -> dict:
        return {"good": self.good, "filtered": self.filtered, "bad": dict(sorted(self.bad.items()))}

    def check(self, max_fraction: float, min_samples: int, where: str) -> None:
        """Raise when more than `max_fraction` of the raw samples seen were bad."""
        bad = sum(self.bad.values())
        total = self.total
        if max_fraction >= 1.0 or total < min_samples or bad <= max_fraction * total:
            return
        top = ", ".join(f"{k}: {v}" for k, v in self.bad.most_common())
        raise DataFaultError(
            f"{where}: {bad} of {total} raw samples were bad ({bad / total:.1%} > data.max_bad_fraction = "
            f"{max_fraction}); by reason: {top}. Inspect the shards with `ldm data inspect URLS`, or raise "
            f"data.max_bad_fraction if this is expected.")
