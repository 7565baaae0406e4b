"""The compositional tier: captions in the grammar, objects apart and whole, relations true, reproducible,
held-out compositions never in the training set."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_pipeline.compositional import (DEFAULT_HOLDOUT, KINDS, Composition, HoldOut, gap_px, is_held_out,
                                         iter_compositional, margin_px, parse_caption, relation_of, sample)
from data_pipeline.synthetic import COLORS, SHAPES, write_synthetic

C, S = "|".join(COLORS), "|".join(SHAPES)
FORMS = {
    "single": rf"a ({C}) ({S}) on a ({C}) background",
    "pair": rf"a ({C}) ({S}) and a ({C}) ({S}) on a ({C}) background",
    "count": rf"(two|three) ({C}) ({S})s on a ({C}) background",
    "position": rf"a ({C}) ({S}) (to the left of|to the right of|above|below) a ({C}) ({S}) on a ({C}) background",
}


def test_captions_follow_the_grammar_and_parse_back():
    kinds = Counter()
    for img, caption, attrs in iter_compositional(400, size=64, seed=1):
        kind = attrs["kind"]
        kinds[kind] += 1
        assert re.fullmatch(FORMS[kind], caption), caption
        comp = parse_caption(caption)
        assert comp is not None and comp.caption() == caption and comp.kind == kind
        assert [(o["color"], o["shape"]) for o in attrs["objects"]] == list(comp.objects)
        assert attrs["count"] == len(comp.objects) and attrs["background"] == comp.background
        colors = {c for c, _ in comp.objects}
        assert comp.background not in colors
        if kind == "pair":
            assert len(colors) == 2 and comp.objects[0][1] != comp.objects[1][1]
        if kind == "position":
            assert comp.objects[0][1] != comp.objects[1][1]
            assert attrs["relation"] == {"subject": 0, "relation": comp.relation, "object": 1}
        if kind == "count":
            assert len(comp.objects) in (2, 3) and len(set(comp.objects)) == 1
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 70       # about 100 each
    assert parse_caption("A Red circle  on an orange background.") == Composition("single", (("red", "circle"),),
                                                                                   "orange")
    assert parse_caption("three red circles") is None                  # no background
    assert parse_caption("a red hexagon on a blue background") is None
    assert parse_caption("four red circles on a blue background") is None


@pytest.mark.parametrize("size", [32, 64])
def test_objects_are_apart_whole_inside_and_relations_hold(size):
    gap, margin = gap_px(size), margin_px(size)
    for img, caption, attrs in iter_compositional(300, size=size, seed=2):
        arr = np.asarray(img).astype(int)
        objs = attrs["objects"]
        owned = np.zeros(arr.shape[:2], dtype=int)
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert margin <= x0 < x1 <= size - margin and margin <= y0 < y1 <= size - margin
            assert x1 - x0 == y1 - y0 == o["size"] and 0.25 * size - 1 <= o["size"] <= 0.375 * size + 1
            owned[y0:y1, x0:x1] += 1
            # the object's colour inside its box is the whole shape (nothing drawn over it)
            side = o["size"]
            drawn = (np.abs(arr[y0:y1, x0:x1] - COLORS[o["color"]]).sum(-1) == 0).sum()
            full = {"square": side * side, "circle": np.pi / 4 * side * side, "triangle": side * side / 2}
            assert abs(drawn - full[o["shape"]]) <= 0.2 * full[o["shape"]] + 2 * side, (caption, o)
        assert owned.max() == 1                                             # boxes disjoint...
        for i, a in enumerate(objs):                                        # ...and `gap` px apart
            for b in objs[i + 1:]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
                assert ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0
        # outside the boxes: only background (flat colours, nothing outside the boxes)
        assert (np.abs(arr[owned == 0] - COLORS[attrs["background"]]).sum(-1) == 0).all()
        if attrs["relation"]:
            a, b = (objs[attrs["relation"][k]]["centroid"] for k in ("subject", "object"))
            assert relation_of(a, b) == attrs["relation"]["relation"]
            dx, dy = abs(a[0] - b[0]), abs(a[1] - b[1])
            assert abs(dx - dy) >= size / 8 - 1e-2                          # clear along the dominant axis


def test_held_out_compositions_never_reach_the_training_set():
    train = list(iter_compositional(1500, size=32, seed=3, exclude=["default"]))
    for _, caption, attrs in train:
        comp = parse_caption(caption)
        assert not is_held_out(caption) and attrs["held_out"] == []
        assert not {(o["color"], o["shape"]) for o in attrs["objects"]} & DEFAULT_HOLDOUT.pairings
        assert comp.arrangement() not in DEFAULT_HOLDOUT.arrangements
    held = list(iter_compositional(300, size=32, seed=3, only=["default"]))
    reasons = Counter(r for _, caption, attrs in held for r in attrs["held_out"])
    assert all(is_held_out(c) and a["held_out"] for _, c, a in held)
    assert set(reasons) == set(DEFAULT_HOLDOUT.items())                 # every held-out item is tested
    # the parts of held-out compositions are all seen in training: colours, shapes, the reversed arrangement
    seen_pairs = Counter((o["color"], o["shape"]) for _, _, a in train for o in a["objects"])
    assert len(seen_pairs) == 8 * 3 - 3
    seen_arr = Counter(parse_caption(c).arrangement() for _, c, a in train if a["kind"] == "position")
    assert len(seen_arr) == 12 - 2 and ("square", "left of", "circle") in seen_arr
    # both phrasings of a held-out arrangement are held out; its reverse is not
    assert is_held_out("a white circle to the left of a black square on a blue background")
    assert is_held_out("a white square to the right of a black circle on a blue background")
    assert not is_held_out("a white circle to the right of a black square on a blue background")
    assert is_held_out("a blue triangle below a white square on a black background")
    assert HoldOut.parse(["blue:circle", "square:below:circle"]) == HoldOut(
        frozenset({("blue", "circle")}), frozenset({("circle", "above", "square")}))
    with pytest.raises(ValueError):
        HoldOut.parse(["circle:near:square"])
    with pytest.raises(ValueError):
        iter_compositional(4, size=32, exclude=["default"], only=["default"])
    with pytest.raises(ValueError):
        iter_compositional(4, size=24)                                  # too small to stay readable


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_shards_are_reproducible_and_carry_every_object(tmp_path):
    kw = dict(size=48, shard_size=10, tier="compositional", exclude=["default"])
    summary = write_synthetic(tmp_path / "a", 20, seed=4, **kw)
    write_synthetic(tmp_path / "b", 20, seed=4, **kw)
    write_synthetic(tmp_path / "c", 20, seed=5, **kw)
    assert summary["samples"] == 20 and summary["tier"] == "compositional"
    assert summary["excluded"] == DEFAULT_HOLDOUT.items()
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "c" / "00000.tar").read_bytes()
    members = _members(tmp_path / "a" / "00001.tar")
    keys = sorted(n[:-5] for n in members if n.endswith(".json"))
    assert len(keys) == 10
    for i, key in enumerate(keys):
        meta = json.loads(members[key + ".json"])
        img, caption, attrs = sample(10 + i, size=48, seed=4, exclude=DEFAULT_HOLDOUT)  # sample i is (seed, i)
        assert meta["caption"] == members[key + ".txt"].decode() == caption
        assert meta["objects"] == attrs["objects"] and meta["kind"] == attrs["kind"]
        assert meta["width"] == meta["height"] == 48 and meta["tier"] == "compositional"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(members[key + ".png"]))), np.asarray(img))
    with pytest.raises(ValueError):
        write_synthetic(tmp_path / "d", 2, size=48, tier="fancy")
