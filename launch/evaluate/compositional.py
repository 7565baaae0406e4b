"""`ldm eval compositional`: GenEval's tasks on the compositional tier, judged from the pixels (numpy + PIL).

A caption is parsed back into what it asks for (data_pipeline.compositional.parse_caption). The image is read
as the one-shape judge (launch adherence) reads it, per object:
1. Every pixel gets the nearest palette colour; the background is the most frequent label on the border ring.
2. Objects are the 8-connected non-background components of at least MIN_AREA of the image (specks of a
   generated image are dropped); scipy.ndimage labels them when importable, else a numpy propagation.
3. Colour: the most frequent label among the component's pixels near a palette colour (edge blends that
   read as a third colour are outvoted by the interior).
4. Shape: from a soft coverage map of that colour over the background, restricted to the component and a
   2-px ring not owned by another one: fill = coverage / box area, top = share of coverage in the upper half
   (square 1 / 0.5, circle pi/4 / 0.5, apex-up triangle 0.5 / 0.25; the nearest point wins).
5. Centroid: the coverage-weighted mean, in pixel units (pixel i spans [i, i + 1)).

Checks of a sample (each needs the right number of objects first): `count`; `shapes` (the multiset of
shapes); `colors` (the multiset of (colour, shape)); `relation` (position: the objects named by their shapes,
the relation of their centroids along the dominant axis); `background` (reported, in no task).
Tasks, as GenEval scores them (colour only where the task is about colour):
  single_object = shapes   colors = colors          (single captions)
  two_object    = shapes   color_attr = colors      (pair captions: a swapped colour fails color_attr)
  counting      = shapes                            (count captions: exactly N of the shape, nothing else)
  position      = shapes and relation               (position captions)
Overall is the mean of the task accuracies (tasks with no sample left out); seen and held-out compositions
are scored apart (data_pipeline.compositional.HoldOut).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from data_pipeline.compositional import (DEFAULT_HOLDOUT, KIND_TASKS, TASKS, Composition, HoldOut,
                                         parse_caption, relation_of)
from data_pipeline.synthetic import COLORS

NAMES = list(COLORS)
PALETTE = np.array([COLORS[n] for n in NAMES], dtype=np.float32)
MAX_SIDE = 128            # larger images are box-downscaled first (a linear filter keeps coverage meaningful)
MIN_AREA = 0.01           # components below this share of the image are noise, not objects
CONFIDENT = 60.0          # RGB distance to the nearest palette colour below which a pixel is "clean"
SHAPE_POINTS = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 0.25)}
TOP_WEIGHT = 2.0          # the top-share axis spans half the fill axis: weigh it up
CHECKS = ("count", "shapes", "colors", "relation", "background")
TASK_CHECKS = {"single_object": ("shapes",), "colors": ("colors",), "two_object": ("shapes",),
               "color_attr": ("colors",), "counting": ("shapes",), "position": ("shapes", "relation")}


# ----------------------------------------------------------------------------- reading an image

@dataclass
class SeenObject:
    color: str
    shape: str
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]           # [x0, y0, x1, y1)
    fill: float
    top: float


@dataclass
class Reading:
    background: str
    objects: list[SeenObject]


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D mask: (labels 1..n, 0 elsewhere; n)."""
    try:
        from scipy import ndimage
    except ImportError:
        return label_numpy(mask)
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=int))


def label_numpy(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The same components without scipy: each pixel takes the smallest index among its 8 neighbours
    until nothing changes (a few dozen sweeps on images of <= 128 px)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.min([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        new = np.where(mask, nb, big)
        if np.array_equal(new, lab):
            break
        lab = new
    roots = np.unique(lab[mask])
    out = np.zeros((h, w), dtype=np.int32)
    out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, len(roots)


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    if max(h, w) > MAX_SIDE:
        f = MAX_SIDE / max(h, w)
        img = np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX))
    return img


def _shape_of(w: np.ndarray) -> tuple[str, float, float, tuple[float, float]]:
    """(shape, fill, top, centroid) of a soft coverage map in window coordinates."""
    ys, xs = np.nonzero(w >= 0.5)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    total = float(w.sum())
    fill = total / float((y1 - y0) * (x1 - x0))
    mid = (y0 + y1) / 2.0                              # the box's middle row, a half row counted half
    rows = w.sum(axis=1)
    full = int(np.floor(mid))
    upper = float(rows[:full].sum()) + (mid - full) * float(rows[full]) if full < len(rows) else total
    top = upper / total
    gy, gx = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    centroid = (float((w * gx).sum() / total) + 0.5, float((w * gy).sum() / total) + 0.5)
    shape = min(SHAPE_POINTS, key=lambda s: (fill - SHAPE_POINTS[s][0]) ** 2
                + (TOP_WEIGHT * (top - SHAPE_POINTS[s][1])) ** 2)
    return shape, fill, top, centroid


def read_image(image) -> Reading:
    """The background and the objects of an RGB image (path, PIL image or uint8 [H, W, 3])."""
    img = _as_array(image).astype(np.float32)
    h, w = img.shape[:2]
    dist = np.linalg.norm(img[:, :, None, :] - PALETTE[None, None], axis=-1)      # [H, W, 8]
    labels, nearest = dist.argmin(-1), dist.min(-1)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = Counter(border.tolist()).most_common(1)[0][0]
    comps, n = _label(labels != bg)
    areas = np.bincount(comps.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if areas[i] >= MIN_AREA * h * w]
    objects = []
    for i in keep:
        region = comps == i
        clean = region & (nearest < CONFIDENT)
        fg = Counter(labels[clean if clean.any() else region].tolist()).most_common(1)[0][0]
        ys, xs = np.nonzero(region)
        y0, y1, x0, x1 = max(0, ys.min() - 2), min(h, ys.max() + 3), max(0, xs.min() - 2), min(w, xs.max() + 3)
        # coverage of this colour over the background, in a 2-px ring around the component that no other
        # component owns (so a near neighbour's pixels do not count as this object's)
        win = comps[y0:y1, x0:x1]
        axis = PALETTE[fg] - PALETTE[bg]
        cover = np.clip(((img[y0:y1, x0:x1] - PALETTE[bg]) @ axis) / float(axis @ axis), 0.0, 1.0)
        cover = np.where((win == i) | (win == 0), cover, 0.0)
        if not (cover >= 0.5).any():
            continue
        shape, fill, top, (cx, cy) = _shape_of(cover)
        objects.append(SeenObject(NAMES[fg], shape, (cx + x0, cy + y0), int(areas[i]),
                                  (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                  round(float(fill), 4), round(float(top), 4)))
    return Reading(NAMES[bg], objects)


# ----------------------------------------------------------------------------- checking a caption

def check(comp: Composition, reading: Reading) -> dict[str, Optional[bool]]:
    """The checks of CHECKS for one image against its parsed caption (relation None unless position)."""
    found = reading.objects
    count = len(found) == len(comp.objects)
    shapes = count and sorted(o.shape for o in found) == sorted(s for _, s in comp.objects)
    colors = count and sorted((o.color, o.shape) for o in found) == sorted(comp.objects)
    relation = None
    if comp.kind == "position":
        # the two objects are named by their shapes (by colour too where the caption's shapes are equal)
        (ca, sa), (cb, sb) = comp.objects
        same = sa == sb
        a_s = [o for o in found if o.shape == sa and (not same or o.color == ca)]
        b_s = [o for o in found if o.shape == sb and (not same or o.color == cb)]
        relation = bool(shapes and any(a is not b and relation_of(a.centroid, b.centroid) == comp.relation
                                       for a in a_s for b in b_s))
    return {"count": count, "shapes": shapes, "colors": colors, "relation": relation,
            "background": reading.background == comp.background}


def task_results(comp: Composition, checks: dict) -> dict[str, bool]:
    return {t: all(checks[c] for c in TASK_CHECKS[t]) for t in KIND_TASKS[comp.kind]}


# ----------------------------------------------------------------------------- scores

@dataclass
class TaskScore:
    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.n if self.n else None


@dataclass
class Scores:
    n: int = 0
    tasks: dict[str, TaskScore] = field(default_factory=lambda: {t: TaskScore() for t in TASKS})
    checks: dict[str, TaskScore] = field(default_factory=lambda: {c: TaskScore() for c in CHECKS})

    def add(self, results: dict[str, bool], checks: dict[str, Optional[bool]]) -> None:
        self.n += 1
        for t, ok in results.items():
            self.tasks[t].n += 1
            self.tasks[t].correct += bool(ok)
        for c, ok in checks.items():
            if ok is not None:
                self.checks[c].n += 1
                self.checks[c].correct += bool(ok)

    @property
    def overall(self) -> Optional[float]:
        accs = [s.accuracy for s in self.tasks.values() if s.n]
        return sum(accs) / len(accs) if accs else None

    def to_dict(self) -> dict:
        def row(s: TaskScore) -> dict:
            return {"n": s.n, "correct": s.correct, "accuracy": s.accuracy}
        return {"n": self.n, "overall": self.overall, "tasks": {t: row(s) for t, s in self.tasks.items()},
                "checks": {c: row(s) for c, s in self.checks.items()}}


@dataclass
class Report:
    all: Scores
    seen: Scores
    held_out: Scores
    holdout: list[str]
    unparsed: list[str]
    images: list[dict] = field(default_factory=list)    # per-image details when asked for

    def to_dict(self) -> dict:
        return {"n": self.all.n, "overall": self.all.overall, "all": self.all.to_dict(),
                "seen": self.seen.to_dict(), "held_out": self.held_out.to_dict(), "holdout": self.holdout,
                "unparsed": self.unparsed, "images": self.images}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def evaluate(items: Iterable[tuple[str, object, str]], holdout: HoldOut = DEFAULT_HOLDOUT,
             details: bool = False) -> Report:
    """items: (name, image, caption). Captions outside the grammar are listed in `unparsed`, not scored."""
    report = Report(Scores(), Scores(), Scores(), holdout.items(), [])
    for name, image, caption in items:
        comp = parse_caption(caption)
        if comp is None:
            report.unparsed.append(name)
            continue
        reading = read_image(image)
        checks = check(comp, reading)
        results = task_results(comp, checks)
        held = holdout.reasons(comp)
        report.all.add(results, checks)
        (report.held_out if held else report.seen).add(results, checks)
        if details:
            report.images.append({"file": name, "prompt": caption, "held_out": held, "tasks": results,
                                  "checks": checks, "read": asdict(reading)})
    return report


def evaluate_dir(samples_dir: str | Path, holdout: HoldOut = DEFAULT_HOLDOUT, prompts: Optional[dict] = None,
                 details: bool = False) -> Report:
    """Judge every image named in SAMPLES_DIR/prompts.json (as `ldm sample` writes it) against its caption."""
    samples_dir = Path(samples_dir)
    if prompts is None:
        pfile = samples_dir / "prompts.json"
        if not pfile.is_file():
            raise FileNotFoundError(f"{pfile} not found: the judge needs the prompt of each image")
        prompts = json.loads(pfile.read_text())
    missing = [n for n in prompts if not (samples_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{samples_dir / missing[0]} (named in prompts.json) not found")
    report = evaluate(((n, samples_dir / n, prompts[n]) for n in sorted(prompts)), holdout, details)
    if not report.all.n:
        raise ValueError(f"no compositional captions among the prompts of {samples_dir}")
    return report


def format_report(report: Report) -> str:
    def pct(x: Optional[float]) -> str:
        return "  -  " if x is None else f"{100 * x:5.1f}"
    head = f"{'':<10}{'n':>6} " + " ".join(f"{t:>13}" for t in TASKS) + f" {'overall':>8}"
    lines = [head]
    for name, s in (("all", report.all), ("seen", report.seen), ("held-out", report.held_out)):
        if s.n:
            lines.append(f"{name:<10}{s.n:>6} " + " ".join(f"{pct(s.tasks[t].accuracy):>13}" for t in TASKS)
                         + f" {pct(s.overall):>8}")
    if report.unparsed:
        lines.append(f"{len(report.unparsed)} prompts are not compositional captions (skipped)")
    return "\n".join(lines)
