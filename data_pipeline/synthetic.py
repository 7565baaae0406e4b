"""The embedded captioned-shapes data (ARCHITECTURE.md §6).

One filled shape on a flat background, caption `a {color} {shape} on a {background} background`,
color != background, shape side 30-60 % of the image side, fully inside the frame. Sample i
depends only on (seed, i), so a data set is reproducible and can be written in pieces.
Held-out (color, shape, background) triples can be left out of one set and be the only content
of another: the demo trains without them and evaluates prompt adherence on them.
"""
from __future__ import annotations

import io
import os
import random
from typing import Iterator, Optional, Sequence

from PIL import Image, ImageDraw

from .palette import ALL_COLORS, COLORS, SHAPES, draw_shape
from .state import derive_seed
from .write import ShardWriter

SIZE_RANGE = (0.3, 0.6)  # shape side as a fraction of the image side
SWEEP_MIN_CONTRAST = 80.0  # RGB distance between a colour-sweep shape and its background
# A small default held-out set, one triple per shape (and distinct colors), for the demo's adherence test.
DEFAULT_HOLDOUT = (("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "purple"))

Triple = tuple[str, str, str]


def caption_for(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_triples() -> list[Triple]:
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def parse_triple(text: str | Sequence[str]) -> Triple:
    """'red:circle:blue' (or a 3-sequence) -> ('red', 'circle', 'blue'), checked. A NEW_COLORS color is
    accepted too (the `only` set of the finetune data); random draws never pick one."""
    parts = tuple(text.replace(",", ":").replace("/", ":").split(":")) if isinstance(text, str) else tuple(text)
    if len(parts) != 3:
        raise ValueError(f"{text!r}: a triple is color:shape:background, e.g. red:circle:blue")
    color, shape, background = (p.strip().lower() for p in parts)
    if color not in ALL_COLORS or background not in ALL_COLORS:
        raise ValueError(f"{text!r}: colors are {', '.join(ALL_COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"{text!r}: shapes are {', '.join(SHAPES)}")
    if color == background:
        raise ValueError(f"{text!r}: color and background must differ")
    return color, shape, background


def draw(color: str, shape: str, background: str, size: int, rng: random.Random) -> tuple[Image.Image, dict]:
    side = min(size, max(1, round(rng.uniform(*SIZE_RANGE) * size)))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive corners, inside [0, size - 1]
    img = Image.new("RGB", (size, size), ALL_COLORS[background])
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x1, y1), ALL_COLORS[color])
    attrs = {"color": color, "shape": shape, "background": background,
             "bbox": [x0, y0, x1 + 1, y1 + 1], "size_fraction": side / size}
    return img, attrs


def sample(index: int, *, size: int, seed: int = 0, exclude: Sequence[Triple] = (),
           only: Sequence[Triple] = ()) -> tuple[Image.Image, str, dict]:
    """Sample `index` of the set (seed, exclude, only): (image, caption, json attributes)."""
    rng = random.Random(derive_seed(seed, "synthetic", index))
    if only:
        color, shape, background = only[rng.randrange(len(only))]
    else:
        banned = set(exclude)
        while True:  # rejection keeps the draw a pure function of (seed, index)
            color = rng.choice(list(COLORS))
            background = rng.choice([c for c in COLORS if c != color])
            shape = rng.choice(SHAPES)
            if (color, shape, background) not in banned:
                break
    img, attrs = draw(color, shape, background, size, rng)
    return img, caption_for(color, shape, background), attrs


def color_sweep_sample(index: int, *, size: int, seed: int = 0) -> tuple[Image.Image, str, dict]:
    """Sample `index` of the colour sweep: a demo shape in a uniformly random RGB colour on another random
    RGB background (at least SWEEP_MIN_CONTRAST apart, so the shape is visible). Stage one trains on these
    besides the palette images, as a real autoencoder sees every colour: without them the demo's
    autoencoder maps colours it never saw onto the eight it knows (pink decoded as yellow), and a
    denoiser taught a new colour could not show it. The caption names no colour; stage two never reads these."""
    rng = random.Random(derive_seed(seed, "color-sweep", index))
    while True:
        fg, bg = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        if sum((a - b) ** 2 for a, b in zip(fg, bg)) ** 0.5 >= SWEEP_MIN_CONTRAST:
            break
    shape = rng.choice(SHAPES)
    side = min(size, max(1, round(rng.uniform(*SIZE_RANGE) * size)))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    img = Image.new("RGB", (size, size), bg)
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side - 1, y0 + side - 1), fg)
    return img, f"a {shape}", {"shape": shape, "rgb": list(fg), "background_rgb": list(bg),
                                "bbox": [x0, y0, x0 + side, y0 + side]}


def iter_synthetic(num: int, *, size: int, seed: int = 0, exclude: Sequence = (), only: Sequence = (),
                   start: int = 0) -> Iterator[tuple[Image.Image, str, dict]]:
    exclude = [parse_triple(t) for t in exclude]
    only = [parse_triple(t) for t in only]
    if exclude and only:
        raise ValueError("give either exclude (train set) or only (held-out set), not both")
    if exclude and len(set(exclude)) >= len(all_triples()):
        raise ValueError("every triple is excluded")
    for i in range(start, start + num):
        yield sample(i, size=size, seed=seed, exclude=exclude, only=only)


def write_synthetic(out_dir: str | os.PathLike, num: int, *, size: int = 64, seed: int = 0, shard_size: int = 1000,
                    image_format: str = "png", exclude: Sequence = (), only: Sequence = (),
                    max_shard_bytes: Optional[int] = None, tier: str = "shapes") -> dict:
    """Write `num` samples as img2dataset-layout shards; deterministic for (num, size, seed, exclude, only).

    tier 'shapes': one shape per image, exclude/only hold COLOR:SHAPE:BACKGROUND triples; tier
    'compositional' (data_pipeline.compositional): exclude/only hold its held-out items (HoldOut.parse);
    tier 'colors': the colour sweep of stage one (color_sweep_sample), no exclude/only."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    if tier == "shapes":
        samples = iter_synthetic(num, size=size, seed=seed, exclude=exclude, only=only)
        excluded, only_items = [list(parse_triple(t)) for t in exclude], [list(parse_triple(t)) for t in only]
    elif tier == "compositional":
        from .compositional import HoldOut, iter_compositional

        samples = iter_compositional(num, size=size, seed=seed, exclude=exclude, only=only)
        excluded, only_items = HoldOut.parse(exclude).items(), HoldOut.parse(only).items()
    elif tier == "colors":
        if exclude or only:
            raise ValueError("the colour sweep (tier 'colors') takes no exclude/only: its colours are random")
        samples = (color_sweep_sample(i, size=size, seed=seed) for i in range(num))
        excluded, only_items = [], []
    else:
        raise ValueError(f"tier must be shapes, compositional or colors, got {tier!r}")
    with ShardWriter(out_dir, shard_size=shard_size, max_shard_bytes=max_shard_bytes) as writer:
        for i, (img, caption, attrs) in enumerate(samples):
            buf = io.BytesIO()
            if image_format == "png":
                img.save(buf, "PNG", compress_level=1)
            else:
                img.save(buf, "JPEG", quality=95)
            meta = {"url": f"synthetic://{seed}/{i}", "width": size, "height": size, **attrs}
            writer.write(image=buf.getvalue(), ext=image_format, caption=caption, meta=meta)
    summary = writer.close()
    summary.update(size=size, seed=seed, image_format=image_format, tier=tier, excluded=excluded, only=only_items)
    return summary
