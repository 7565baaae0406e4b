"""Flaky storage (issue #21 item 3): failed / stalled shard reads are retried with backoff, then skipped and
counted by reason; retries leave the stream (and so exact resume) unchanged; max_bad_fraction guards shards;
an image whose header is too large is refused before decoding."""
from __future__ import annotations

import io
import os
import resource
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline import DataConfig, DataFaultError, build_eval_loader, build_train_loader
from data_pipeline.samples import Decoder, Sample
from data_pipeline.shards import ReadPolicy, read_shard
from datakit import good, jpeg, member_offsets, rgb, write_tar


def cfg_for(urls, **kw) -> DataConfig:
    base = dict(urls=list(urls), image_size=16, num_workers=0, max_bad_fraction=1.0, fault_log_per_minute=0,
                shard_retries=3, shard_retry_backoff_s=0.02, shard_timeout_s=0.5)
    base.update(kw)
    cfg = DataConfig(**base)
    cfg.validate()
    return cfg


def shard(path: Path, prefix: str, n: int, seed: int = 0) -> Path:
    write_tar(path, [good(f"{prefix}{i:02d}", seed + i) for i in range(n)])
    return path


def flaky(tmp: Path, tar: Path, fails: int, partial: int = 0, name: str = "flaky") -> tuple[str, Path]:
    """A `pipe:` URL whose command fails its first `fails` runs (after `partial` bytes of the tar), then reads."""
    counter = tmp / f"{name}.count"
    script = tmp / f"{name}.sh"
    script.write_text(
        f'n=$(cat "{counter}" 2>/dev/null || echo 0)\n'
        f'echo $((n + 1)) > "{counter}"\n'
        f'if [ "$n" -lt {fails} ]; then head -c {partial} "{tar}"; exit 1; fi\n'
        f'cat "{tar}"\n')
    return f"pipe:sh {script}", counter


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def one_pass(cfg: DataConfig, urls) -> tuple[list[str], object]:
    loader = build_eval_loader(cfg, urls, rank=0, world_size=1, batch_size=2)
    return keys_of(loader), loader


# ----------------------------------------------------------------------------- retries

def cut_inside(tar: Path, key: str) -> int:
    """A byte count that ends inside sample `key`'s image: the samples before the one before it are complete."""
    return member_offsets(tar)[f"{key}.jpg"][1] + 100


@pytest.mark.parametrize("mid_stream", [False, True])  # fails before any byte / after some samples were read
def test_pipe_failing_first_times_is_read_after_retries(tmp_path, mid_stream):
    tar = shard(tmp_path / "a.tar", "a", 6)
    partial = cut_inside(tar, "a03") if mid_stream else 0
    url, counter = flaky(tmp_path, tar, fails=2, partial=partial)
    clean = [x["__key__"] for x in read_shard(str(tar))]
    if mid_stream:  # without retries the failed attempt hands out a00..a01 (a02 may be cut), then the fault
        once = list(read_shard(url))
        assert [x["__key__"] for x in once[:-1]] == ["a00", "a01"] and once[-1].reason == "unreadable_url"
        counter.unlink()
    policy = ReadPolicy(retries=3, backoff_s=0.02)
    t0 = time.perf_counter()
    items = list(read_shard(url, policy))
    took = time.perf_counter() - t0
    # exactly the clean stream: no sample twice (a retry skips what an earlier attempt handed out), none lost
    assert [x["__key__"] for x in items] == clean and all(isinstance(x, dict) for x in items)
    assert policy.retried == 2 and counter.read_text().strip() == "3"
    assert items[-1]["__shard_end__"] and not any(x.get("__shard_end__") for x in items[:-1])
    assert took >= 0.02 + 0.04   # backoff 0.02 * 2**k
    print(f"\nflaky pipe (fails 2x after {partial} bytes): {len(items)} samples after {policy.retried} retries "
          f"in {took:.3f} s")

    # through the loader: counted as retries, not as faults
    counter.unlink()
    keys, loader = one_pass(cfg_for([url]), [url])
    assert sorted(keys) == sorted(clean)
    counts = loader.counts()
    assert counts["bad_total"] == 0 and counts["retries"] == 2 and counts["shards"] == 1


def test_retried_training_stream_equals_a_clean_one_and_resumes_exactly(tmp_path):
    tars = [shard(tmp_path / f"{s}.tar", f"s{s}_", 5 + s, seed=10 * s) for s in range(3)]
    clean_urls = [f"pipe:cat {t}" for t in tars]
    flaky_url, counter = flaky(tmp_path, tars[1], fails=2, partial=cut_inside(tars[1], "s1_03"))
    flaky_urls = [clean_urls[0], flaky_url, clean_urls[2]]
    kw = dict(num_workers=1, batches_per_epoch=4, shuffle_buffer=5, crop="random", flip_prob=0.5)

    def take(cfg, n, state=None):
        loader = build_train_loader(cfg, rank=0, world_size=1, seed=3, batch_size=3, state=state)
        out = [next(loader) for _ in range(n)]
        st = loader.state_dict()
        counts = loader.counts()
        loader.close()
        return out, st, counts

    expected, _, clean_counts = take(cfg_for(clean_urls, **kw), 10)
    got, _, counts = take(cfg_for(flaky_urls, **kw), 10)
    assert counts["retries"] == 2 and clean_counts["retries"] == 0
    assert counts["bad"] == clean_counts["bad"] == {} and counts["shards"] == clean_counts["shards"]
    for a, b in zip(got, expected):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])

    counter.unlink()  # the interrupted run meets the failures again, before and after its resume
    first, state, _ = take(cfg_for(flaky_urls, **kw), 4)
    rest, _, _ = take(cfg_for(flaky_urls, **kw), 6, state=state)
    for a, b in zip(first + rest, expected):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_permanently_failing_url_is_skipped_and_counted(tmp_path):
    a = shard(tmp_path / "a.tar", "a", 4)
    b = shard(tmp_path / "b.tar", "b", 3, seed=20)
    urls = [str(a), "pipe:echo broken >&2; exit 3", f"pipe:cat {b}"]
    t0 = time.perf_counter()
    keys, loader = one_pass(cfg_for(urls, shard_retries=2, shard_retry_backoff_s=0.05), urls)
    took = time.perf_counter() - t0
    assert sorted(keys) == [f"a{i:02d}" for i in range(4)] + [f"b{i:02d}" for i in range(3)]
    counts = loader.counts()
    assert loader.fault_counts() == {"unreadable_url": 1}
    assert counts["retries"] == 2 and counts["shards"] == 3 and counts["bad_shards"] == 1
    assert took >= 0.05 + 0.10
    # a missing local file does not come back by waiting: not retried
    keys, loader = one_pass(cfg_for([str(a), str(tmp_path / "gone.tar")]), [str(a), str(tmp_path / "gone.tar")])
    assert len(keys) == 4 and loader.fault_counts() == {"unreadable_url": 1} and loader.counts()["retries"] == 0
    print(f"\npermanent failure: skipped after 2 retries in {took:.3f} s; 7 good samples kept")


def _live(marker: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def test_hanging_pipe_times_out_then_is_skipped(tmp_path):
    a = shard(tmp_path / "a.tar", "a", 4)
    b = shard(tmp_path / "b.tar", "b", 6, seed=30)
    marker = "sleep 47.125"
    urls = [str(a),
            f"pipe:{marker}",                               # stalls before its first byte
            f"pipe:head -c {cut_inside(b, 'b03')} {b}; {marker}",   # stalls after a few samples
            f"pipe:cat {b}"]
    cfg = cfg_for(urls, shard_retries=1, shard_retry_backoff_s=0.05, shard_timeout_s=0.5)
    t0 = time.perf_counter()
    keys, loader = one_pass(cfg, urls)
    took = time.perf_counter() - t0
    # the stalled shard's samples read before the stall are kept once; the clean copy of b gives all of b
    assert sorted(set(keys)) == sorted([f"a{i:02d}" for i in range(4)] + [f"b{i:02d}" for i in range(6)])
    assert loader.fault_counts() == {"shard_timeout": 2} and loader.counts()["retries"] == 2
    assert took < 8.0, took   # 2 shards x 2 attempts x 0.5 s + backoff, not 47 s
    time.sleep(0.2)
    assert not _live(marker), "a timed-out command (or what its shell started) is still running"
    print(f"\nhanging pipes: 2 shards timed out (2 attempts each, 0.5 s) and skipped in {took:.2f} s")


# ----------------------------------------------------------------------------- max_bad_fraction over shards

def test_max_bad_fraction_trips_when_too_many_shards_are_bad(tmp_path):
    goods = [str(shard(tmp_path / f"g{s}.tar", f"g{s}_", 20, seed=s)) for s in range(19)]
    # 1 bad shard of 20: 5% <= 20%, fine; the samples guard alone would not see 3 bad of 10 either
    # (3 bad items among ~140 raw samples), the shard guard does (30% > 20%)
    cfg = cfg_for(goods + ["pipe:false"], shard_retries=0, max_bad_fraction=0.2, bad_fraction_min_shards=5)
    keys, loader = one_pass(cfg, cfg.urls)
    assert len(keys) == 19 * 20 and loader.counts()["bad_shards"] == 1
    bad_urls = goods[:7] + ["pipe:false", "pipe:exit 1", "pipe:false"]
    cfg = cfg_for(bad_urls, shard_retries=0, max_bad_fraction=0.2, bad_fraction_min_shards=5)
    with pytest.raises(DataFaultError, match=r"3 of 10 shards read could not be used.*unreadable_url: 3"):
        one_pass(cfg, cfg.urls)
    # training (resampled): the guard trips while training, on the shard counts
    cfg = cfg_for(goods[:2] + ["pipe:false", "pipe:false"], shard_retries=0, max_bad_fraction=0.2,
                  bad_fraction_min_shards=5, batches_per_epoch=50)
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=4)
    with pytest.raises(DataFaultError, match="shards read could not be used"):
        for _ in range(50):
            next(loader)


# ----------------------------------------------------------------------------- image size

def big_png(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h (decoded to RGB it would take 3 w h bytes); zeros compress to little."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (w + 7) // 8)
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def big_jpeg_header(w: int, h: int) -> bytes:
    """A small JPEG whose SOF header is patched to say w x h."""
    data = bytearray(jpeg(rgb(5)))
    i = 2
    while data[i] == 0xFF and data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def test_image_over_max_pixels_is_refused_from_its_header(tmp_path):
    huge_png = big_png(20000, 20000)     # 400 Mpx: over PIL's own bomb error too
    mid_png = big_png(9000, 9000)        # 81 Mpx: under PIL's warning (89 Mpx), over our 64 Mpx default
    huge_jpeg = big_jpeg_header(20000, 20000)
    assert Image.open(io.BytesIO(mid_png)).size == (9000, 9000)
    assert len(huge_png) < 200_000 and len(huge_jpeg) < 2000
    cfg = cfg_for([])
    assert cfg.max_image_pixels == 64_000_000
    decoder = Decoder(cfg, train=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    results = {name: decoder({"__key__": name, ext: data, "txt": b"x"}, None)
               for name, ext, data in [("huge_png", "png", huge_png), ("mid_png", "png", mid_png),
                                       ("huge_jpeg", "jpg", huge_jpeg)]}
    took = time.perf_counter() - t0
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert {n: r.reason for n, r in results.items()} == {n: "image_too_large" for n in results}
    assert "9000 x 9000 = 81000000 pixels > data.max_image_pixels" in results["mid_png"].detail
    assert took < 1.0 and grew_mb < 100, (took, grew_mb)   # decoding 400 Mpx to RGB would take 1.2 GB
    # a smaller limit refuses a small image; a larger one lets the 81 Mpx header through to decoding
    assert decoder({"__key__": "s", "jpg": jpeg(rgb(1)), "txt": b"x"}, None).__class__ is Sample
    small = Decoder(cfg_for([], max_image_pixels=24 * 24 - 1), train=False)
    assert small({"__key__": "s", "jpg": jpeg(rgb(1)), "txt": b"x"}, None).reason == "image_too_large"

    # in a shard: refused and counted, the good samples intact
    write_tar(tmp_path / "big.tar", [good("ok0", 1), good("huge", 2, ext="png", data=huge_png),
                                     good("mid", 3, ext="png", data=mid_png), good("ok1", 4),
                                     good("hugej", 5, data=huge_jpeg)])
    keys, loader = one_pass(cfg, [str(tmp_path / "big.tar")])
    assert sorted(keys) == ["ok0", "ok1"] and loader.fault_counts() == {"image_too_large": 3}
    print(f"\nimage_too_large: 3 headers (400/81/400 Mpx) refused in {took * 1000:.1f} ms, peak RSS +{grew_mb:.0f} MB")


# ----------------------------------------------------------------------------- config

def test_bad_config_values_name_the_key_and_what_is_allowed():
    from launch.runtime.configio import ConfigError, build_dataclass

    cases = [({"shard_retries": -1}, "'data.shard_retries' = -1 is out of range: must be >= 0 and <= 20"),
             ({"shard_retry_backoff_s": -0.5}, "'data.shard_retry_backoff_s' = -0.5 is out of range: must be >= 0"),
             ({"shard_timeout_s": -1}, "'data.shard_timeout_s' = -1.0 is out of range: must be >= 0"),
             ({"max_image_pixels": 0}, "'data.max_image_pixels' = 0 is out of range: must be >= 1"),
             ({"bad_fraction_min_shards": 0}, "'data.bad_fraction_min_shards' = 0 is out of range: must be >= 1")]
    for values, message in cases:
        with pytest.raises(ConfigError) as e:
            build_dataclass(DataConfig, values, "data")
        assert message in str(e.value), str(e.value)
    cfg = build_dataclass(DataConfig, {"shard_retries": 0, "shard_timeout_s": 0, "max_image_pixels": 10**6}, "data")
    assert (cfg.shard_retries, cfg.shard_timeout_s, cfg.max_image_pixels) == (0, 0.0, 10**6)
