"""The compositional tier of the embedded data: one to three objects, each its own colour, on a background.

Captions come from a small grammar that the judge (launch/evaluate/compositional.py) reads back:
  single    a red circle on a blue background
  pair      a red circle and a blue square on a white background       (shapes differ, colours differ)
  count     three green triangles on a black background                (two or three, one colour, one shape)
  position  a yellow square to the left of a purple circle on a ...    (to the left of / to the right of /
                                                                        above / below; shapes differ)
Colours and shapes are those of the one-shape tier (data_pipeline.synthetic); the background differs from
every object colour. Objects are axis-aligned boxes kept `gap` px apart and `margin` px inside the frame,
so they never touch (8-connected components stay apart) and the border ring is background. A relation
holds between the shapes' centroids along the dominant axis, by at least 1/8 of the image side.

Held out (`HoldOut`): colour-shape pairings that no training object has, and arrangements (which shape is
left of / above which) that no training caption states, in either phrasing ("a circle to the left of a
square" is "a square to the right of a circle"). Sample i depends only on (seed, i, exclude, only).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from PIL import Image, ImageDraw

from .state import derive_seed
from .palette import COLORS, SHAPES, draw_shape

KINDS = ("single", "pair", "count", "position")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
# GenEval's tasks and the caption kind each is scored on (launch/evaluate/compositional.py says how)
KIND_TASKS = {"single": ("single_object", "colors"), "pair": ("two_object", "color_attr"),
              "count": ("counting",), "position": ("position",)}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SIZE_RANGE = (0.25, 0.375)   # object side / image side: 16-24 px at 64 px, three fit with gaps
MIN_SIZE = 32                # below this the smallest triangle is under 8 px and reads poorly


def gap_px(size: int) -> int:
    """Background between two objects' boxes: wide enough that a blurred generated pair stays two."""
    return max(2, round(size / 16))


def margin_px(size: int) -> int:
    return max(1, round(size / 32))


@dataclass(frozen=True)
class Composition:
    """What a caption says: the objects in caption order, the background, and for `position` the
    relation of objects[0] to objects[1]."""
    kind: str
    objects: tuple[tuple[str, str], ...]          # (colour, shape)
    background: str
    relation: Optional[str] = None

    def caption(self) -> str:
        obj = [f"a {c} {s}" for c, s in self.objects]
        if self.kind == "single":
            head = obj[0]
        elif self.kind == "pair":
            head = f"{obj[0]} and {obj[1]}"
        elif self.kind == "count":
            (c, s), n = self.objects[0], len(self.objects)
            head = f"{COUNT_WORDS[n]} {c} {s}s"
        else:
            head = f"{obj[0]} {self.relation} {obj[1]}"
        return f"{head} on a {self.background} background"

    def arrangement(self) -> Optional[tuple[str, str, str]]:
        """Canonical (shape, 'left of' | 'above', shape) of a position caption, the same for both phrasings."""
        if self.kind != "position":
            return None
        (_, a), (_, b) = self.objects
        return {"to the left of": (a, "left of", b), "to the right of": (b, "left of", a),
                "above": (a, "above", b), "below": (b, "above", a)}[self.relation]


# ----------------------------------------------------------------------------- parsing the grammar

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJ = rf"an? ({_COLOR}) ({_SHAPE})"
_TAIL = rf" on an? ({_COLOR}) background\.?"
_FORMS = {
    "single": re.compile(rf"{_OBJ}{_TAIL}"),
    "pair": re.compile(rf"{_OBJ} and {_OBJ}{_TAIL}"),
    "count": re.compile(rf"(two|three) ({_COLOR}) ({_SHAPE})s{_TAIL}"),
    "position": re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}{_TAIL}"),
}


def parse_caption(text: str) -> Optional[Composition]:
    """The inverse of Composition.caption (case and surrounding space ignored); None if not in the grammar."""
    t = " ".join((text or "").lower().split())
    for kind, form in _FORMS.items():
        m = form.fullmatch(t)
        if not m:
            continue
        g = m.groups()
        if kind == "single":
            return Composition(kind, ((g[0], g[1]),), g[2])
        if kind == "pair":
            return Composition(kind, ((g[0], g[1]), (g[2], g[3])), g[4])
        if kind == "count":
            n = {"two": 2, "three": 3}[g[0]]
            return Composition(kind, ((g[1], g[2]),) * n, g[3])
        return Composition(kind, ((g[0], g[1]), (g[3], g[4])), g[5], relation=g[2])
    return None


# ----------------------------------------------------------------------------- held-out compositions

@dataclass(frozen=True)
class HoldOut:
    pairings: frozenset = frozenset()        # {(colour, shape)}
    arrangements: frozenset = frozenset()    # {(shape, 'left of' | 'above', shape)}, canonical

    @staticmethod
    def parse(items: Iterable[str]) -> "HoldOut":
        """'red:circle' (a pairing), 'circle:left-of:square' / 'square:above:triangle' (arrangements; also
        right-of / below, turned canonical), 'default' (DEFAULT_HOLDOUT)."""
        pairings, arrangements = set(), set()
        for item in items:
            parts = [p.strip().lower() for p in item.replace("/", ":").split(":")]
            if parts == ["default"]:
                pairings |= DEFAULT_HOLDOUT.pairings
                arrangements |= DEFAULT_HOLDOUT.arrangements
            elif len(parts) == 2 and parts[0] in COLORS and parts[1] in SHAPES:
                pairings.add((parts[0], parts[1]))
            elif len(parts) == 3 and parts[0] in SHAPES and parts[2] in SHAPES and parts[0] != parts[2]:
                a, rel, b = parts
                rel = rel.replace("-", " ").replace("_", " ")
                canon = {"left of": (a, "left of", b), "right of": (b, "left of", a),
                         "above": (a, "above", b), "below": (b, "above", a)}.get(rel)
                if canon is None:
                    raise ValueError(f"{item!r}: relations are left-of, right-of, above, below")
                arrangements.add(canon)
            else:
                raise ValueError(f"{item!r}: a held-out item is COLOR:SHAPE (e.g. red:circle), "
                                 f"SHAPE:RELATION:SHAPE (e.g. circle:left-of:square) or 'default'")
        return HoldOut(frozenset(pairings), frozenset(arrangements))

    def items(self) -> list[str]:
        return (sorted(f"{c}:{s}" for c, s in self.pairings)
                + sorted(f"{a}:{r.replace(' ', '-')}:{b}" for a, r, b in self.arrangements))

    def __bool__(self) -> bool:
        return bool(self.pairings or self.arrangements)

    def reasons(self, comp: Composition) -> list[str]:
        """Which held-out items a composition contains (empty: it is a training composition)."""
        out = sorted({f"{c}:{s}" for c, s in comp.objects if (c, s) in self.pairings})
        arr = comp.arrangement()
        if arr in self.arrangements:
            out.append(f"{arr[0]}:{arr[1].replace(' ', '-')}:{arr[2]}")
        return out


# one pairing per shape, in the one-shape tier's held-out colours; two arrangements, each of whose
# reverse and whose other axis stay in training
DEFAULT_HOLDOUT = HoldOut(frozenset({("red", "circle"), ("green", "square"), ("yellow", "triangle")}),
                          frozenset({("circle", "left of", "square"), ("square", "above", "triangle")}))


def is_held_out(caption: str | Composition, holdout: HoldOut = DEFAULT_HOLDOUT) -> bool:
    comp = parse_caption(caption) if isinstance(caption, str) else caption
    if comp is None:
        raise ValueError(f"{caption!r} is not a compositional caption")
    return bool(holdout.reasons(comp))


# ----------------------------------------------------------------------------- drawing a sample

@dataclass
class Placed:
    color: str
    shape: str
    box: tuple[int, int, int, int]               # [x0, y0, x1, y1), pixels

    @property
    def centroid(self) -> tuple[float, float]:
        """Of the filled shape, in pixel units (pixel i spans [i, i + 1)); a triangle's is 2/3 down."""
        x0, y0, x1, y1 = self.box
        cy = y0 + (y1 - y0) * (2 / 3 if self.shape == "triangle" else 0.5)
        return (x0 + x1) / 2, cy

    def json(self, size: int) -> dict:
        side = self.box[2] - self.box[0]
        return {"color": self.color, "shape": self.shape, "bbox": list(self.box),
                "centroid": [round(v, 3) for v in self.centroid], "size": side, "size_fraction": side / size}


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centroid a lies relative to b, along the dominant axis (image y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _clear(a: tuple[float, float], b: tuple[float, float], relation: str, min_offset: float) -> bool:
    dx, dy = a[0] - b[0], a[1] - b[1]
    along, across = (dx, dy) if relation in ("to the left of", "to the right of") else (dy, dx)
    return relation_of(a, b) == relation and abs(along) - abs(across) >= min_offset


def _content(rng: random.Random, kinds: Sequence[str]) -> Composition:
    kind = rng.choice(kinds)
    colors, shapes = list(COLORS), list(SHAPES)
    if kind == "single":
        objects = ((rng.choice(colors), rng.choice(shapes)),)
    elif kind == "pair":
        c1, c2 = rng.sample(colors, 2)
        s1, s2 = rng.sample(shapes, 2)
        objects = ((c1, s1), (c2, s2))
    elif kind == "count":
        objects = ((rng.choice(colors), rng.choice(shapes)),) * rng.choice((2, 3))
    else:
        s1, s2 = rng.sample(shapes, 2)
        objects = ((rng.choice(colors), s1), (rng.choice(colors), s2))
    background = rng.choice([c for c in colors if c not in {c for c, _ in objects}])
    return Composition(kind, objects, background, rng.choice(RELATIONS) if kind == "position" else None)


def _layout(comp: Composition, size: int, rng: random.Random,
            size_range: tuple[float, float]) -> list[Placed]:
    """Boxes for the objects: apart, inside the frame, the relation clear; rejection, shrinking if stuck."""
    gap, margin, min_offset = gap_px(size), margin_px(size), size / 8
    sides = [max(4, round(rng.uniform(*size_range) * size)) for _ in comp.objects]
    while True:
        for _ in range(400):
            placed = []
            for (color, shape), side in zip(comp.objects, sides):
                x0 = rng.randint(margin, size - margin - side)
                y0 = rng.randint(margin, size - margin - side)
                placed.append(Placed(color, shape, (x0, y0, x0 + side, y0 + side)))
            if any(not _apart(p.box, q.box, gap) for i, p in enumerate(placed) for q in placed[i + 1:]):
                continue
            if comp.relation and not _clear(placed[0].centroid, placed[1].centroid, comp.relation, min_offset):
                continue
            return placed
        if max(sides) <= 4:
            raise RuntimeError(f"no layout of {comp.caption()!r} fits a {size}-px image")
        sides = [max(4, int(s * 0.9)) for s in sides]   # rare: big sides that do not fit together


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample(index: int, *, size: int = 64, seed: int = 0, exclude: HoldOut = HoldOut(),
           only: HoldOut = HoldOut(), kinds: Sequence[str] = KINDS,
           size_range: tuple[float, float] = SIZE_RANGE) -> tuple[Image.Image, str, dict]:
    """Sample `index`: (image, caption, json attributes). `exclude`: no held-out item anywhere (training);
    `only`: every sample contains at least one of them (the held-out set)."""
    rng = random.Random(derive_seed(seed, "compositional", index))
    for _ in range(10_000):  # rejection on content keeps the draw a pure function of (seed, index, ...)
        comp = _content(rng, kinds)
        if not (exclude and exclude.reasons(comp)) and not (only and not only.reasons(comp)):
            break
    else:
        raise ValueError(f"no composition of kinds {list(kinds)} fits exclude={exclude.items()} "
                         f"only={only.items()}")
    placed = _layout(comp, size, rng, size_range)
    img = Image.new("RGB", (size, size), COLORS[comp.background])
    pen = ImageDraw.Draw(img)
    for p in placed:
        draw_shape(pen, p.shape, (p.box[0], p.box[1], p.box[2] - 1, p.box[3] - 1), COLORS[p.color])
    held = (only or exclude or DEFAULT_HOLDOUT).reasons(comp)   # the held-out items it has, if any
    attrs = {"tier": "compositional", "kind": comp.kind, "tasks": list(KIND_TASKS[comp.kind]),
             "background": comp.background, "count": len(placed), "objects": [p.json(size) for p in placed],
             "relation": ({"subject": 0, "relation": comp.relation, "object": 1} if comp.relation else None),
             "held_out": held}
    return img, comp.caption(), attrs


def iter_compositional(num: int, *, size: int = 64, seed: int = 0, exclude: Iterable[str] = (),
                       only: Iterable[str] = (), start: int = 0, kinds: Sequence[str] = KINDS,
                       size_range: tuple[float, float] = SIZE_RANGE) -> Iterator[tuple[Image.Image, str, dict]]:
    """`exclude` / `only`: held-out items as HoldOut.parse reads them (e.g. ['default'])."""
    if size < MIN_SIZE:
        raise ValueError(f"the compositional tier needs size >= {MIN_SIZE}, got {size}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if not 0 < size_range[0] <= size_range[1] <= 0.4:
        raise ValueError(f"size_range must satisfy 0 < lo <= hi <= 0.4 (three objects must fit), got {size_range}")
    ex, on = HoldOut.parse(exclude), HoldOut.parse(only)
    if ex and on:
        raise ValueError("give either exclude (train set) or only (held-out set), not both")
    # checked above, before the first sample is asked for (a generator body would check only then)
    return (sample(i, size=size, seed=seed, exclude=ex, only=on, kinds=kinds, size_range=size_range)
            for i in range(start, start + num))
