"""Shard lists and raw samples: URL expansion, rank/worker splitting, shard orders, tar reading.

Reading goes through webdataset's `gopen` (local paths, `pipe:` commands, http via curl, ...) and
its streaming `tar_file_iterator`. What is added here: every failure becomes a `Fault` item in
the stream instead of an exception or a sleep, and a tar that silently stops short (Python's
tarfile treats a cut inside a header as a clean end) is recognised by its missing end marker.
"""
from __future__ import annotations

import glob
import io
import os
import random
from bisect import bisect_right
from itertools import accumulate
from typing import Iterator, Sequence
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import Pipe, gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .faults import EMPTY_SHARD, TRUNCATED_TAR, UNREADABLE_URL, Fault
from .state import derive_seed

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


# ----------------------------------------------------------------------------- shard lists

def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns, `::`-joined lists and folders (-> their sorted tar files) to a flat list.

    `${VAR}` is left for the shell of a `pipe:` command (webdataset's own expansion would
    demand a WDS_VAR environment variable instead)."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            part = part.strip()
            if not part:
                continue
            if not part.startswith("pipe:") and os.path.isdir(part):
                found = sorted(p for p in glob.glob(os.path.join(part, "*")) if p.endswith(TAR_SUFFIXES))
                if not found:
                    raise ValueError(f"folder {part!r} holds no .tar shards")
                out.extend(found)
            else:
                out.extend(braceexpand.braceexpand(part))
    for url in out:
        scheme = urlparse(url).scheme
        if scheme not in ("", "file") and scheme not in gopen_schemes:
            raise ValueError(f"{url!r}: webdataset cannot open '{scheme}:' URLs; read them through a command, "
                             f"e.g. 'pipe:aws s3 cp {url} -'")
    return out


def split_by_rank(urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return list(urls[rank::world_size])


def split_by_worker(urls: Sequence[str], worker: int, num_workers: int) -> list[str]:
    return list(urls[worker::num_workers])


def resampled_urls(urls: Sequence[str], seed: int) -> Iterator[str]:
    """Shards drawn with replacement, forever; the order is a pure function of `seed`."""
    rng = random.Random(seed)
    while True:
        yield urls[rng.randrange(len(urls))]


def cycled_urls(urls: Sequence[str], seed: int) -> Iterator[str]:
    """Each shard once per pass, a fresh seeded permutation per pass, forever."""
    for p in range(1 << 62):
        order = list(urls)
        random.Random(derive_seed(seed, "pass", p)).shuffle(order)
        yield from order


def mix(streams: Sequence[Iterator], weights: Sequence[float], seed: int) -> Iterator:
    """Pick the source of every next item with probability proportional to its weight."""
    if len(streams) == 1:
        yield from streams[0]
        return
    rng = random.Random(seed)
    cum = list(accumulate(weights))
    while True:
        yield next(streams[bisect_right(cum, rng.random() * cum[-1])])


# ----------------------------------------------------------------------------- reading one shard

class _Watch:
    """File wrapper that remembers the first and last bytes, to check the tar's end marker."""

    def __init__(self, f):
        self.f = f
        self.nbytes = 0
        self.head = b""
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if len(self.head) < 6:
            self.head += data[:6 - len(self.head)]
        self.nbytes += len(data)
        self.tail = data[-1024:] if len(data) >= 1024 else (self.tail + data)[-1024:]
        return data

    def drained_cleanly(self, limit: int = 1 << 20) -> bool:
        """Read what tarfile left (record padding) and check for the two zero end blocks.

        Compressed shards are trusted to their decompressor, which reports truncation itself."""
        if self.head[:2] == b"\x1f\x8b" or self.head[:3] == b"BZh" or self.head[:6] == b"\xfd7zXZ\x00":
            return True
        left = limit
        while left > 0:
            chunk = self.read(min(65536, left))
            if not chunk:
                break
            left -= len(chunk)
        else:
            return True  # trailing data beyond the padding: not a truncation
        return self.nbytes % 512 == 0 and len(self.tail) == 1024 and not any(self.tail)


def _close(f) -> str:
    """Close a stream; for a `pipe:` command return why it failed ("" when it exited 0 / SIGPIPE)."""
    try:
        f.close()
    except Exception as e:  # Pipe.close raises on a non-zero exit status
        return str(e)[:300]
    return ""


def _abort(f) -> None:
    if isinstance(f, Pipe):
        f.ignore_errors = True  # the kill below is ours: no complaint from Pipe.close / __del__
        try:
            f.proc.kill()
        except Exception:
            pass
        try:
            f.stream.close()
            f.proc.wait(10)
        except Exception:
            pass
        f.status = 0  # keep Pipe.__del__ quiet about the kill
    else:
        try:
            f.close()
        except Exception:
            pass


def read_shard(url: str) -> Iterator[dict | Fault]:
    """Raw samples `{"__key__", "__url__", ext: bytes, ...}` of one shard, then at most one Fault.

    A truncated shard yields its complete samples and drops the one being read when the data
    ended (its members may be cut); the truncation counts once as `truncated_tar`."""
    try:
        f = gopen(url, "rb")
    except Exception as e:
        yield Fault(UNREADABLE_URL, url, None, f"{type(e).__name__}: {e}")
        return
    if type(f) is io.BufferedReader:  # a local file: read it in larger blocks (fewer syscalls per member)
        f = io.BufferedReader(f.detach(), buffer_size=1 << 20)
    watch = _Watch(f)
    members = tar_file_iterator(watch)
    current: dict | None = None
    error: Exception | None = None
    nmembers = 0
    done = False
    try:
        try:
            for member in members:
                nmembers += 1
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is None:
                    continue
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                current.setdefault(suffix.lower(), member["data"])  # a duplicate member keeps the first
            clean = watch.drained_cleanly()
        except Exception as e:  # tarfile.ReadError, EOFError, or a pipe that died mid-stream
            error, clean = e, False
        failed = _close(f)
        done = True
    finally:
        if not done:  # the consumer stopped early (epoch end, close): stop the pipe, count nothing
            members.close()
            _abort(f)
    if failed:
        yield Fault(UNREADABLE_URL, url, None, failed)
    elif not clean:
        detail = f"{type(error).__name__}: {error}" if error else "tar ends without its end-of-archive blocks"
        yield Fault(TRUNCATED_TAR, url, current["__key__"] if current else None, detail[:300])
    elif current is not None:
        yield current
    elif nmembers == 0:
        yield Fault(EMPTY_SHARD, url, None, "the tar holds no files")


def read_shards(urls) -> Iterator[dict | Fault]:
    for url in urls:
        yield from read_shard(url)
