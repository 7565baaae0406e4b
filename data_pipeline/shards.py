"""Shard lists and raw samples: URL expansion, rank/worker splitting, shard orders, tar reading.

Reading goes through webdataset's `gopen` (local paths, http via curl, ...; `pipe:` commands are
started here) and its streaming `tar_file_iterator`. What is added here:
every failure becomes a `Fault` item in the stream instead of an exception or a sleep; a tar that
silently stops short (Python's tarfile treats a cut inside a header as a clean end) is recognised by
its missing end marker; failed reads are retried with backoff (skipping what was already yielded, so
the stream stays a pure function of the seeds) and command reads that stall time out (`ReadPolicy`).
The held-out split of data.val_fraction lives here too (`split_holdout`).
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import random
import re
import select
import signal
import struct
import subprocess
import time
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

import braceexpand
from webdataset import utils as wds_utils
from webdataset.gopen import Pipe, gopen, gopen_schemes, rewrite_url
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .faults import EMPTY_SHARD, SHARD_TIMEOUT, TRUNCATED_TAR, UNREADABLE_URL, Fault
from .state import derive_seed

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
log = logging.getLogger("data_pipeline")


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


def shard_name(url: str) -> str:
    """The name the held-out rule hashes: the last two path parts of where the shard lives.

    "/data/laion/00012.tar", "file:///data/laion/00012.tar", "s3://bucket/laion/00012.tar" and
    "pipe:aws s3 cp s3://bucket/laion/00012.tar -" all give "laion/00012.tar". In a `pipe:` command the
    last word ending in .tar / .tar.gz / .tgz is the location; a command without one is its own name."""
    text = url
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[5:].split()]
        found = [w for w in words if w.lower().endswith(TAR_SUFFIXES)]
        text = found[-1] if found else url[5:].strip()
    parsed = urlparse(text)
    path = (parsed.netloc + "/" + parsed.path) if parsed.scheme and len(parsed.scheme) > 1 else text
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else text


def holdout_score(url: str) -> float:
    """A stable number in [0, 1) per shard name (blake2b; the same in every process and Python run)."""
    digest = hashlib.blake2b(("val_fraction" + shard_name(url)).encode(), digest_size=8).digest()
    return (struct.unpack("<Q", digest)[0] >> 11) / float(1 << 53)


def split_holdout(urls: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards) by the data.val_fraction rule (see DataConfig); order kept.

    A shard is held out iff holdout_score < fraction, so the choice is per shard and stable when shards
    are added. With fraction > 0 and >= 2 shards: at least one is held out (smallest score) and at
    least one is kept for training (largest score)."""
    urls = list(urls)
    if fraction <= 0 or len(urls) < 2:
        return urls, []
    scores = {u: holdout_score(u) for u in urls}
    held = {u for u in urls if scores[u] < fraction}
    if not held:
        held = {min(urls, key=lambda u: scores[u])}
    if len(held) == len(set(urls)):
        held.discard(max(urls, key=lambda u: scores[u]))
    return [u for u in urls if u not in held], [u for u in urls if u in held]


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


class ShardTimeout(OSError):
    """A pipe read got no byte within the configured time."""


@dataclass
class ReadPolicy:
    """How hard to try a shard: retries with exponential backoff, a stall timeout for pipe reads.

    `retried` counts the retries made through this policy (one per process): the stream reports it."""
    retries: int = 0
    backoff_s: float = 1.0
    timeout_s: float = 0.0   # 0: no timeout
    retried: int = 0
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_config(cls, cfg) -> "ReadPolicy":
        return cls(retries=cfg.shard_retries, backoff_s=cfg.shard_retry_backoff_s, timeout_s=cfg.shard_timeout_s)


class _PipeRaw(io.RawIOBase):
    """The read end of a command's stdout; `readinto` waits at most `timeout` seconds for data."""

    def __init__(self, fd: int, timeout: float):
        super().__init__()
        self.fd, self.timeout = fd, timeout
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.timeout > 0 and not self.poller.poll(self.timeout * 1000.0):
            raise ShardTimeout(f"no data for {self.timeout:g} s (data.shard_timeout_s)")
        return os.readv(self.fd, [buf])


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (Linux /proc); [] where the kernel does not list children."""
    out, todo = [], [pid]
    while todo:
        for task in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                with open(task) as f:
                    kids = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


class PipeStream:
    """A command's stdout (`pipe:` URLs, and webdataset's curl/gsutil/... pipes) with a stall timeout.

    The command stays in the caller's process group (a Ctrl-C or a group kill of the job reaches it); a
    timed-out or abandoned command is killed together with what it started (its shell's children)."""

    OK_STATUS = (0, 141, -signal.SIGPIPE)   # a reader that stops early makes the writer die of SIGPIPE

    def __init__(self, proc: subprocess.Popen, timeout: float, ok_status=OK_STATUS, keep=None):
        self.proc, self.timeout = proc, timeout
        self.ok_status = tuple(ok_status)
        self._keep = keep   # the webdataset Pipe this came from, kept quiet and alive until we are done
        self.buffer = io.BufferedReader(_PipeRaw(proc.stdout.fileno(), timeout), buffer_size=1 << 20)

    @classmethod
    def command(cls, cmd: str, timeout: float) -> "PipeStream":
        return cls(subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=0), timeout)

    @classmethod
    def from_pipe(cls, pipe: Pipe, timeout: float) -> "PipeStream":
        pipe.ignore_errors = True
        return cls(pipe.proc, timeout, ok_status=tuple(pipe.ignore_status) + cls.OK_STATUS, keep=pipe)

    def read(self, n: int = -1) -> bytes:
        return self.buffer.read(n)

    def _kill(self) -> None:
        if self.proc.poll() is not None:
            return
        for pid in [self.proc.pid] + _descendants(self.proc.pid):   # listed before the parent dies
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> str:
        """Close and wait for the command; why it failed, or "" (exit 0 / SIGPIPE). May raise ShardTimeout."""
        try:
            self.proc.stdout.close()
        except Exception:
            pass
        try:
            status = self.proc.wait(self.timeout if self.timeout > 0 else None)
        except subprocess.TimeoutExpired:
            self.abort()
            raise ShardTimeout(f"the command did not exit within {self.timeout:g} s after its output ended "
                               f"(data.shard_timeout_s)") from None
        self._mark_done(status)
        return "" if status in self.ok_status else f"command exited with status {status}"

    def abort(self) -> None:
        self._kill()
        try:
            self.proc.stdout.close()
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except Exception:
            pass
        self._mark_done(0)

    def _mark_done(self, status) -> None:
        if self._keep is not None:
            self._keep.status = status   # keep Pipe.__del__ quiet


def open_shard(url: str, timeout: float = 0.0):
    """A readable binary stream of one shard: a local file (1 MiB buffer) or a PipeStream."""
    url = rewrite_url(url)
    if url.startswith("pipe:"):
        if wds_utils.enforce_security:
            raise ValueError("webdataset's enforce_security is on: pipe: URLs are refused")
        return PipeStream.command(url[5:], timeout)
    f = gopen(url, "rb")
    if isinstance(f, Pipe):
        return PipeStream.from_pipe(f, timeout)
    if type(f) is io.BufferedReader:  # a local file: read it in larger blocks (fewer syscalls per member)
        f = io.BufferedReader(f.detach(), buffer_size=1 << 20)
    return f


def _close(f) -> str:
    """Close a stream; for a command return why it failed ("" when it exited 0 / SIGPIPE)."""
    if isinstance(f, PipeStream):
        return f.close()
    try:
        f.close()
    except Exception as e:
        return str(e)[:300]
    return ""


def _abort(f) -> None:
    if isinstance(f, PipeStream):
        f.abort()
    else:
        try:
            f.close()
        except Exception:
            pass


def read_shard(url: str, policy: Optional[ReadPolicy] = None) -> Iterator[dict | Fault]:
    """Raw samples `{"__key__", "__url__", ext: bytes, ...}` of one shard, then at most one Fault.

    Every shard ends with exactly one item that says so: its last sample carries `"__shard_end__": True`,
    or a shard-level Fault (unreadable_url, shard_timeout, truncated_tar, empty_shard) comes last.

    A failed read (see `ReadPolicy`) is tried again after a backoff; a retry skips the complete samples
    already yielded, so a shard that reads on some attempt yields exactly what a clean read yields.
    A truncated shard yields its complete samples and drops the one being read when the data
    ended (its members may be cut); the truncation counts once as `truncated_tar`."""
    policy = policy if policy is not None else ReadPolicy()
    delivered = 0
    for attempt in range(policy.retries + 1):
        if attempt:
            policy.retried += 1
            wait = policy.backoff_s * 2 ** (attempt - 1)
            log.info("shard read failed (%s: %s); retry %d of %d in %.3g s: %s", fault.reason, fault.detail[:200],
                     attempt, policy.retries, wait, url)
            if wait > 0:
                policy.sleep(wait)
        fault, delivered, retryable = yield from _read_once(url, delivered, policy.timeout_s)
        if fault is None:
            return
        if not retryable:
            break
    yield fault


def _read_once(url: str, skip: int, timeout: float):
    """One attempt: yields the samples after the first `skip`; returns (fault or None, yielded so far, retryable)."""
    try:
        f = open_shard(url, timeout)
    except FileNotFoundError as e:  # a missing local file does not come back by waiting
        return Fault(UNREADABLE_URL, url, None, f"{type(e).__name__}: {e}"), skip, False
    except Exception as e:
        return Fault(UNREADABLE_URL, url, None, f"{type(e).__name__}: {e}"), skip, True
    remote = isinstance(f, PipeStream)
    watch = _Watch(f)
    members = tar_file_iterator(watch)
    current: dict | None = None
    error: Exception | None = None
    nmembers = complete = 0
    failed = ""
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
                        complete += 1
                        if complete > skip:
                            yield current
                    current = {"__key__": prefix, "__url__": url}
                current.setdefault(suffix.lower(), member["data"])  # a duplicate member keeps the first
            clean = watch.drained_cleanly()
        except Exception as e:  # tarfile.ReadError, EOFError, a pipe that died or stalled mid-stream
            error, clean = e, False
        if isinstance(error, ShardTimeout):
            _abort(f)
        else:
            try:
                failed = _close(f)
            except ShardTimeout as e:
                error, clean = e, False
        done = True
    finally:
        if not done:  # the consumer stopped early (epoch end, close): stop the pipe, count nothing
            members.close()
            _abort(f)
    delivered = max(skip, complete)
    key = current["__key__"] if current else None
    if isinstance(error, ShardTimeout):
        return Fault(SHARD_TIMEOUT, url, key, str(error)), delivered, True
    if failed:
        return Fault(UNREADABLE_URL, url, None, failed), delivered, True
    if not clean:
        detail = f"{type(error).__name__}: {error}" if error else "tar ends without its end-of-archive blocks"
        return Fault(TRUNCATED_TAR, url, key, detail[:300]), delivered, remote  # a local file stays cut
    if current is None:
        what = "the tar holds no files" if nmembers == 0 else "the tar holds no sample (no file with a key)"
        return Fault(EMPTY_SHARD, url, None, what), delivered, False
    if complete + 1 <= skip:
        return Fault(UNREADABLE_URL, url, None, f"the shard changed between read attempts: {complete + 1} "
                                                f"samples now, {skip} were read before"), delivered, False
    current["__shard_end__"] = True
    yield current
    return None, complete + 1, False


def read_shards(urls, policy: Optional[ReadPolicy] = None) -> Iterator[dict | Fault]:
    for url in urls:
        yield from read_shard(url, policy)
