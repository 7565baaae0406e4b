"""Shards with every fault the pipeline must survive, built once per session in a temp folder.

`faulty_shards` returns the URL list and the exact counts a one-pass read must report.
"""
from __future__ import annotations

import json
import os

import pytest

from datakit import good, jpeg, member_offsets, odd_mode_images, rgb, write_tar


@pytest.fixture(scope="session")
def faulty_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faulty")
    good_keys: list[str] = []

    # 00000: odd image modes, EXIF rotation, webp, a caption only in the json
    a = [good(f"a{i:02d}", i) for i in range(3)]
    for j, (name, (ext, data)) in enumerate(odd_mode_images().items()):
        a.append(good(f"a_{name}", j, ext=ext, data=data))
    a.append(good("a_jsoncap", 9, json_caption=True))
    write_tar(root / "00000.tar", a)
    good_keys += [s["__key__"] for s in a]

    # 00001: sample-level faults among good samples
    broken_jpeg = jpeg(rgb(1))[:200]
    b = [good("b00", 10),
         {"__key__": "b_undecodable", "jpg": b"this is not an image", "txt": b"x"},
         {"__key__": "b_empty", "jpg": b"", "txt": b"x"},
         {"__key__": "b_noimage", "txt": b"a caption", "json": b"{}"},
         {"__key__": "b_nocaption", "jpg": jpeg(rgb(2)), "json": json.dumps({"key": "b_nocaption"}).encode()},
         {"__key__": "b_badjson", "jpg": jpeg(rgb(3)), "json": b"{not json"},
         {"__key__": "b_cutjpeg", "jpg": broken_jpeg, "txt": b"x"},
         good("b01", 11), good("b02", 12)]
    write_tar(root / "00001.tar", b)
    good_keys += ["b00", "b01", "b02"]

    # 00002: truncated inside the data of its 4th sample: samples 0 and 1 survive; sample 2 was being
    # assembled when the data ended (the reader cannot know it was complete) and is dropped.
    c = [good(f"c{i}", 20 + i) for i in range(5)]
    write_tar(root / "full_c.tar", c)
    off = member_offsets(root / "full_c.tar")["c3.jpg"][1]
    (root / "00002.tar").write_bytes((root / "full_c.tar").read_bytes()[:off + 100])
    good_keys += ["c0", "c1"]

    # 00003: truncated inside a header (tarfile would silently call it the end): same rule
    write_tar(root / "full_d.tar", [good(f"d{i}", 30 + i) for i in range(5)])
    off = member_offsets(root / "full_d.tar")["d3.jpg"][0]
    (root / "00003.tar").write_bytes((root / "full_d.tar").read_bytes()[:off + 100])
    good_keys += ["d0", "d1"]
    os.remove(root / "full_c.tar")
    os.remove(root / "full_d.tar")

    # 00005: good, read through a pipe
    write_tar(root / "00005.tar", [good(f"e{i}", 40 + i) for i in range(4)])
    good_keys += [f"e{i}" for i in range(4)]

    urls = [str(root / "00000.tar"), str(root / "00001.tar"), str(root / "00002.tar"), str(root / "00003.tar"),
            f"pipe:cat {root / 'missing_via_pipe.tar'}",   # pipe command fails
            f"pipe:cat {root / '00005.tar'}",
            str(root / "missing.tar")]                      # missing local file
    bad = {"undecodable_image": 2, "empty_image": 1, "missing_image": 1, "missing_caption": 1, "bad_json": 1,
           "truncated_tar": 2, "unreadable_url": 2}
    return {"root": root, "urls": urls, "good_keys": sorted(good_keys), "bad": bad}


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory) -> dict:
    """Five uneven good shards (3, 9, 4, 12, 6 samples) for training-mode and resume tests."""
    root = tmp_path_factory.mktemp("clean")
    sizes = [3, 9, 4, 12, 6]
    keys = []
    for s, n in enumerate(sizes):
        samples = [good(f"s{s}_{i:02d}", 7 * s + i) for i in range(n)]
        write_tar(root / f"{s:05d}.tar", samples)
        keys += [x["__key__"] for x in samples]
    return {"root": root, "urls": [str(root / f"{s:05d}.tar") for s in range(len(sizes))], "keys": keys}
