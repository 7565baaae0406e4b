"""`ldm eval adherence`: does an image show what its synthetic caption says? Judged from the pixels.

Captions are those of the embedded data (ARCHITECTURE.md §6): `a {color} {shape} on a {background} background`.
The judge knows the eight palette colors (and, when asked, the NEW_COLORS the finetune demo teaches) and
reads an RGB image as follows:

1. Every pixel gets the nearest palette color (Euclidean RGB).
2. Background: the most frequent label on the image border (a 1-pixel ring; the shapes never touch it
   in the data, and a generated image that fills its border with the shape has no readable background).
3. Color: the most frequent label among the non-background pixels of the largest 8-connected
   non-background region, counting first the pixels that are close to a palette color (blends at the edge
   of a blurry shape, e.g. red over blue reading as purple, are outvoted by the shape's interior).
4. Shape, from a soft coverage map w = projection of (pixel - background) on (color - background),
   clipped to [0, 1], in a window around that region (blur moves mass but preserves it):
     fill = sum(w) / area of the bounding box of {w >= 0.5}
     top  = share of sum(w) in the upper half of that box
   Triangles (apex up in the data) have top ~ 0.25, squares and circles ~ 0.5; squares fill ~ 1, circles
   ~ pi/4. The shape is the nearest of the three reference points in (fill, top); the thresholds these
   points imply were calibrated on ground-truth synthetic images (tests/export: >= 99.5 % per attribute
   on them, and ~ 0 % when every attribute of their captions is deliberately wrong).
Images larger than 128 px are box-downscaled to <= 128 px first (a linear filter: w stays meaningful).

Output (`evaluate_dir`): accuracy per attribute (and all three at once), per-triple breakdown, and for a
given held-out set of triples its own accuracies beside those of the rest.
"""
from __future__ import annotations

import json
import re
from collections import Counter, deque
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from data_pipeline.palette import ALL_COLORS
from data_pipeline.synthetic import COLORS, SHAPES, parse_triple

ATTRIBUTES = ("color", "shape", "background")
NAMES = list(COLORS)
CAPTION_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*\.?\s*$", re.IGNORECASE)
MAX_SIDE = 128
CONFIDENT = 60.0          # RGB distance to the nearest palette color below which a pixel counts as "clean"
# (fill, top) reference points of the three shapes
SHAPE_POINTS = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 0.25)}
TOP_WEIGHT = 2.0          # the top-share axis is half as wide as the fill axis: weigh it up


def palette_of(colors: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """(names, RGB array) of the colors the judge chooses among: the eight of the data by default."""
    names = list(colors) if colors else NAMES
    unknown = [c for c in names if c not in ALL_COLORS]
    if unknown:
        raise ValueError(f"unknown colors {unknown}: the judge knows {', '.join(ALL_COLORS)}")
    return names, np.array([ALL_COLORS[n] for n in names], dtype=np.float32)


def parse_caption(text: str, colors: Optional[Sequence[str]] = None) -> Optional[tuple[str, str, str]]:
    """'a red circle on a blue background' -> ('red', 'circle', 'blue'); None if it is not such a caption."""
    m = CAPTION_RE.match(text or "")
    if not m:
        return None
    color, shape, background = (g.lower() for g in m.groups())
    known = set(colors) if colors else COLORS
    if color not in known or background not in known or shape not in SHAPES:
        return None
    return color, shape, background


def _downscale(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return img
    f = MAX_SIDE / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BOX))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected True region of a 2-D mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, region = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        idx = np.array(best)
        out[idx[:, 0], idx[:, 1]] = True
    return out


def shape_features(w: np.ndarray) -> Optional[tuple[float, float]]:
    """(fill, top) of a soft coverage map, or None when nothing is covered."""
    ys, xs = np.nonzero(w >= 0.5)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    total = float(w.sum())
    if total <= 0:
        return None
    fill = total / float((y1 - y0) * (x1 - x0))
    # upper half of the box, rows split at the box's middle (a half row counted half)
    mid = (y0 + y1) / 2.0
    rows = w.sum(axis=1)
    full = int(np.floor(mid))
    upper = float(rows[:full].sum()) + (mid - full) * float(rows[full]) if full < len(rows) else float(rows.sum())
    return fill, upper / total


def classify_shape(fill: float, top: float) -> str:
    return min(SHAPE_POINTS, key=lambda s: (fill - SHAPE_POINTS[s][0]) ** 2
               + (TOP_WEIGHT * (top - SHAPE_POINTS[s][1])) ** 2)


def judge(image: np.ndarray | Image.Image | str | Path, colors: Optional[Sequence[str]] = None) -> dict:
    """{'color', 'shape', 'background', 'fill', 'top'} read from an RGB image (uint8 [H, W, 3]); `colors`:
    the palette names to choose among (default the eight of the data)."""
    names, palette = palette_of(colors)
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB"))
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    img = _downscale(np.asarray(image, dtype=np.uint8)).astype(np.float32)
    h, w_ = img.shape[:2]
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)      # [H, W, colors]
    labels = dist.argmin(-1)
    nearest = dist.min(-1)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = Counter(border.tolist()).most_common(1)[0][0]
    fg_mask = labels != bg
    out = {"background": names[bg], "color": None, "shape": None, "fill": None, "top": None}
    if not fg_mask.any():
        return out
    region = _largest_component(fg_mask)
    clean = region & (nearest < CONFIDENT)
    votes = Counter(labels[clean if clean.any() else region].tolist())
    fg = votes.most_common(1)[0][0]
    out["color"] = names[fg]
    # soft coverage in a window 2 px around the region
    ys, xs = np.nonzero(region)
    y0, y1 = max(0, ys.min() - 2), min(h, ys.max() + 3)
    x0, x1 = max(0, xs.min() - 2), min(w_, xs.max() + 3)
    axis = palette[fg] - palette[bg]
    cover = ((img[y0:y1, x0:x1] - palette[bg]) @ axis) / float(axis @ axis)
    feats = shape_features(np.clip(cover, 0.0, 1.0))
    if feats is None:
        return out
    out["fill"], out["top"] = feats
    out["shape"] = classify_shape(*feats)
    return out


# ----------------------------------------------------------------------------- scoring a folder

def _accuracy(rows: Sequence[dict]) -> dict:
    n = len(rows)
    acc = {a: (sum(r["correct"][a] for r in rows) / n if n else None) for a in ATTRIBUTES}
    acc["all"] = sum(all(r["correct"].values()) for r in rows) / n if n else None
    return {"n": n, "accuracy": acc}


def score(rows: Sequence[dict], holdout: Iterable = ()) -> dict:
    """rows: {'file', 'prompt', 'expected': (c, s, b), 'judged': judge()} -> the adherence report."""
    held = {tuple(parse_triple(t)) for t in holdout}
    for r in rows:
        r["correct"] = {a: r["judged"][a] == r["expected"][i] for i, a in enumerate(ATTRIBUTES)}
    report = {**_accuracy(rows)}
    per: dict[str, list] = {}
    for r in rows:
        per.setdefault(":".join(r["expected"]), []).append(r)
    report["per_triple"] = {k: _accuracy(v) for k, v in sorted(per.items())}
    if held:
        report["held_out"] = {**_accuracy([r for r in rows if tuple(r["expected"]) in held]),
                              "triples": sorted(":".join(t) for t in held)}
        report["rest"] = _accuracy([r for r in rows if tuple(r["expected"]) not in held])
    confusion: dict[str, dict] = {a: {} for a in ATTRIBUTES}
    for r in rows:
        for i, a in enumerate(ATTRIBUTES):
            row = confusion[a].setdefault(r["expected"][i], {})
            got = str(r["judged"][a])
            row[got] = row.get(got, 0) + 1
    report["confusion"] = confusion
    return report


def evaluate_dir(samples_dir: str | Path, holdout: Iterable = (), prompts: Optional[dict] = None,
                 details: bool = False, colors: Optional[Sequence[str]] = None) -> dict:
    """Judge every image named in SAMPLES_DIR/prompts.json (written by `ldm sample`) against its caption;
    `colors`: the judge's palette (default the eight of the data; the finetune demo adds NEW_COLORS)."""
    samples_dir = Path(samples_dir)
    if prompts is None:
        pfile = samples_dir / "prompts.json"
        if not pfile.is_file():
            raise FileNotFoundError(f"{pfile} not found: adherence needs the prompt of each image "
                                    f"(written by `ldm sample`)")
        prompts = json.loads(pfile.read_text())
    rows, unparsed = [], []
    for name in sorted(prompts):
        expected = parse_caption(prompts[name], colors)
        if expected is None:
            unparsed.append(name)
            continue
        path = samples_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (named in prompts.json) not found")
        rows.append({"file": name, "prompt": prompts[name], "expected": expected, "judged": judge(path, colors)})
    if not rows:
        raise ValueError(f"no synthetic-caption prompts in {samples_dir / 'prompts.json'} "
                         f"('a {{color}} {{shape}} on a {{background}} background')")
    report = score(rows, holdout)
    report["unparsed"] = unparsed
    if details:
        report["images"] = [{"file": r["file"], "prompt": r["prompt"], "judged": r["judged"],
                             "correct": r["correct"]} for r in rows]
    return report


def format_report(report: dict) -> str:
    acc = report["accuracy"]
    lines = [f"{report['n']} images: color {acc['color']:.1%}  shape {acc['shape']:.1%}  "
             f"background {acc['background']:.1%}  all {acc['all']:.1%}"]
    for key in ("held_out", "rest"):
        if key in report and report[key]["n"]:
            a = report[key]["accuracy"]
            lines.append(f"  {key.replace('_', '-'):<9} {report[key]['n']:>5}: color {a['color']:.1%}  shape "
                         f"{a['shape']:.1%}  background {a['background']:.1%}  all {a['all']:.1%}")
    if report.get("unparsed"):
        lines.append(f"  {len(report['unparsed'])} prompts are not synthetic captions (skipped)")
    return "\n".join(lines)
