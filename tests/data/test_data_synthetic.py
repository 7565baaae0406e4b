"""The synthetic captioned shapes obey ARCHITECTURE.md §6 and are reproducible; held-out triples stay out."""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.synthetic import COLORS, DEFAULT_HOLDOUT, SHAPES, parse_triple, write_synthetic

CAPTION = re.compile(r"^a (\w+) (circle|square|triangle) on a (\w+) background$")


def read_all(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[:-5]
            out.append({"key": key, "json": json.loads(members[name]), "txt": members[key + ".txt"].decode(),
                        "img": np.asarray(Image.open(io.BytesIO(members[key + ".png"])))})
    return out


def test_synthetic_obeys_the_contract(tmp_path):
    summary = write_synthetic(tmp_path, 60, size=32, seed=3, shard_size=25, exclude=DEFAULT_HOLDOUT)
    assert summary["shards"] == 3 and summary["samples"] == 60
    for stem in ("00000", "00001", "00002"):
        assert (tmp_path / f"{stem}.parquet").is_file() and (tmp_path / f"{stem}_stats.json").is_file()
    samples = read_all(tmp_path)
    assert len(samples) == 60
    triples = Counter()
    for s in samples:
        m = CAPTION.match(s["txt"])
        assert m, s["txt"]
        color, shape, background = m.groups()
        assert color in COLORS and background in COLORS and shape in SHAPES and color != background
        meta = s["json"]
        assert (meta["color"], meta["shape"], meta["background"]) == (color, shape, background)
        assert meta["caption"] == s["txt"] and meta["key"] == s["key"]
        assert meta["width"] == meta["height"] == 32
        triples[(color, shape, background)] += 1
        # fully inside: the bbox is in the frame, nothing of the shape lies outside it, and the drawn
        # area is the whole shape's (a clipped shape would be smaller)
        x0, y0, x1, y1 = meta["bbox"]
        side = x1 - x0
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 and y1 - y0 == side
        assert 0.3 * 32 - 1 <= side <= 0.6 * 32 + 1
        img = s["img"].astype(int)
        is_shape = (np.abs(img - COLORS[color]).sum(-1) == 0)
        assert (np.abs(img - COLORS[background]).sum(-1) == 0).sum() + is_shape.sum() == 32 * 32  # flat colors
        ys, xs = np.nonzero(is_shape)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        full = {"square": side * side, "circle": math.pi / 4 * side * side, "triangle": side * side / 2}[shape]
        assert abs(is_shape.sum() - full) <= 0.25 * full + 4 * side
    assert not set(triples) & set(DEFAULT_HOLDOUT)
    assert len(triples) > 30  # a broad spread of the 168 triples


def test_synthetic_is_deterministic_and_holdout_writes_separately(tmp_path):
    write_synthetic(tmp_path / "a", 12, size=16, seed=5, shard_size=5)
    write_synthetic(tmp_path / "b", 12, size=16, seed=5, shard_size=5)
    write_synthetic(tmp_path / "c", 12, size=16, seed=6, shard_size=5)
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "c" / "00000.tar").read_bytes()
    held = ["red:circle:blue", "green:square:white"]
    write_synthetic(tmp_path / "held", 20, size=16, seed=5, shard_size=50, only=held)
    got = {(s["json"]["color"], s["json"]["shape"], s["json"]["background"]) for s in read_all(tmp_path / "held")}
    assert got == {parse_triple(t) for t in held}


def test_color_sweep_covers_rgb_is_reproducible_and_names_no_color(tmp_path):
    """Stage one's colour sweep: random RGB shapes on random RGB backgrounds (the demo autoencoder must be able
    to draw a colour the denoiser is later taught), a pure function of (seed, index), captions without colours."""
    import pytest

    from data_pipeline.synthetic import SWEEP_MIN_CONTRAST

    write_synthetic(tmp_path / "a", 200, size=16, seed=3, shard_size=100, tier="colors")
    write_synthetic(tmp_path / "b", 200, size=16, seed=3, shard_size=100, tier="colors")
    assert (tmp_path / "a" / "00001.tar").read_bytes() == (tmp_path / "b" / "00001.tar").read_bytes()
    samples = read_all(tmp_path / "a")
    assert len(samples) == 200
    fg = np.array([s["json"]["rgb"] for s in samples], dtype=float)
    bg = np.array([s["json"]["background_rgb"] for s in samples], dtype=float)
    assert np.linalg.norm(fg - bg, axis=1).min() >= SWEEP_MIN_CONTRAST
    # every channel spread over its range (uniform: mean ~127, the eight palette colours would give 8 values)
    assert len({tuple(c) for c in fg}) == 200 and abs(fg.mean() - 127.5) < 15 and fg.std() > 60
    for s in samples:
        assert s["txt"] in {f"a {shape}" for shape in SHAPES}
        x0, y0, x1, y1 = s["json"]["bbox"]
        assert (s["img"][y0 + (y1 - y0) // 2, x0 + (x1 - x0) // 2] == s["json"]["rgb"]).all()
        assert (s["img"][0, 0] == s["json"]["background_rgb"]).all() or (x0, y0) == (0, 0)
    with pytest.raises(ValueError, match="no exclude/only"):
        write_synthetic(tmp_path / "c", 4, size=16, tier="colors", only=["red:circle:blue"])
