"""Image transforms: decode to RGB, EXIF orientation, resize + crop, flip, aspect buckets, json filters.

Decoding is the pipeline's floor (ARCHITECTURE.md §8): a JPEG is asked for a reduced scale first
(`Image.draft`, the decoder's DCT scaling), and the crop is resized straight from its source box,
so no pixel is decoded or resampled twice.
"""
from __future__ import annotations

import io
import math
import random
import re
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .config import parse_json_filter

INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                 "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}

# EXIF orientation tag (0x0112) -> the transposes that make the image upright.
_ORIENT = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
           4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
           6: [Image.Transpose.ROTATE_270], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_90]}


def exif_orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block should not cost the image
        return 1
    return value if value in _ORIENT else 1


def upright_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited over white, 16-bit is scaled down."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I") or mode == "F":  # 16-bit (I;16*, I) or float grey
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


# ----------------------------------------------------------------------------- captions against flips

# Horizontal flips make these words wrong for every mirrored sample ("a cat to the left of a dog" pictured the
# other way round): a model trained on both cannot learn left from right. With data.mirror_captions (the
# default) a mirrored sample's caption says the other side instead, so the flip stays an augmentation.
_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|wards?)?\b)", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left"}


def says_left_or_right(caption: str) -> bool:
    return bool(_LEFT_RIGHT.search(caption or ""))


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: 'left' and 'right' (also in leftmost, rightwards, left-hand) trade
    places, in the case they were written in; every other word stays."""
    def other(match: re.Match) -> str:
        word = match.group(1)
        swapped = _OTHER_SIDE[word.lower()]
        if word.isupper():
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped
    return _LEFT_RIGHT.sub(other, caption or "")


def flip_contradiction(count: int, samples: int, what: str) -> str:
    """The warning for captions that name a side while their images (or latents) are mirrored and the
    captions are kept as they are (data.mirror_captions false)."""
    return (f"{count} of {samples} captions say 'left' or 'right', and {what} with data.mirror_captions false: "
            "training contradicts those captions whenever a sample is mirrored. Set data.mirror_captions: true "
            "(a mirrored sample's caption then says the other side) or data.flip_prob: 0 (no mirrors).")


# ----------------------------------------------------------------------------- aspect buckets

def make_buckets(size: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) pairs of about size**2 pixels, sides multiples of `step`, ratio <= max_ratio."""
    area = size * size
    found = {(size // step * step or step,) * 2}
    w = step
    while w <= size * max_ratio + step:
        h = max(step, round(area / w / step) * step)
        if w >= h and w / h <= max_ratio + 1e-9:
            found.update({(w, h), (h, w)})
        w += step
    return sorted(found, key=lambda b: b[0] / b[1])


def nearest_bucket(buckets: Sequence[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


# ----------------------------------------------------------------------------- decode + resize + crop

def open_image(data: bytes) -> Image.Image:
    """Parse the header only (cheap); pixels are decoded by `decode_to`."""
    return Image.open(io.BytesIO(data))


def decode_to(img: Image.Image, target: tuple[int, int], *, crop: str = "center",
              rng: Optional[random.Random] = None, flip_prob: float = 0.0, flip: Optional[bool] = None,
              interpolation: str = "bicubic") -> np.ndarray:
    """An opened image -> uint8 array [th, tw, 3]: upright, shorter side fitted, cropped, maybe flipped.

    Random draws (in this order: flip, crop x, crop y) come from `rng`, so a seeded rng per sample
    makes the result reproducible. A caller that must know whether the image was mirrored (to mirror its
    caption) draws the flip itself with `draw_flip` and passes `flip`: the draws stay the same."""
    tw, th = target
    orient = exif_orientation(img)
    uw, uh = upright_size(img, orient)
    scale = max(tw / uw, th / uh)
    if img.format == "JPEG" and scale <= 0.5:
        need = (math.ceil(uw * scale), math.ceil(uh * scale))
        img.draft(None, need[::-1] if orient in (5, 6, 7, 8) else need)
    img = to_rgb(img)  # loads the pixels (at the draft scale)
    for op in _ORIENT.get(orient, ()):
        img = img.transpose(op)
    w, h = img.size
    if flip is None:
        flip = draw_flip(rng, flip_prob)
    s = max(tw / w, th / h)
    rw, rh = max(tw, round(w * s)), max(th, round(h * s))
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    else:
        left, top = (rw - tw) // 2, (rh - th) // 2
    if (rw, rh) == (w, h):
        if (w, h) != (tw, th):
            img = img.crop((left, top, left + tw, top + th))
    else:
        sx, sy = w / rw, h / rh  # the crop box in source pixels: resample only what is kept
        box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
        img = img.resize((tw, th), INTERPOLATION[interpolation], box=box, reducing_gap=3.0)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def draw_flip(rng: Optional[random.Random], flip_prob: float) -> bool:
    """The flip coin of one training sample (no draw without an rng or at probability 0)."""
    return rng is not None and flip_prob > 0 and rng.random() < flip_prob


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], in one pass.

    numpy, single-threaded: torch's elementwise kernels spread over OpenMP threads, which on a
    busy host (a trainer next door) is ~10x slower than one core for a copy this size."""
    src = images_u8.numpy().transpose(0, 3, 1, 2)
    out = np.empty(src.shape, dtype=np.float32)
    np.divide(src, np.float32(127.5), out=out, dtype=np.float32)
    np.subtract(out, np.float32(1.0), out=out)
    return torch.from_numpy(out)


def to_float_on_device(images_u8: torch.Tensor) -> torch.Tensor:
    """The same scaling as `to_float`, bit for bit, in torch on the tensor's own device.

    The training loader hands raw images over as uint8 (TrainLoader(uint8_images=True)): a quarter
    of the bytes over PCIe, and the host cores that decode JPEGs do not also make float copies. The
    runtime calls this after moving the batch to the GPU, where it costs microseconds."""
    b, h, w, c = images_u8.shape
    out = torch.empty((b, c, h, w), dtype=torch.float32, device=images_u8.device)
    out.copy_(images_u8.permute(0, 3, 1, 2))
    return out.div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- json filters

_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _lookup(meta: dict, path: str):
    node = meta
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def original_size(meta: dict) -> Optional[tuple[int, int]]:
    for kw, kh in (("original_width", "original_height"), ("width", "height")):
        w, h = meta.get(kw), meta.get(kh)
        if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
            return int(w), int(h)
    return None


class JsonFilter:
    """Keep a sample only when its json passes every rule; returns the rule that failed."""

    def __init__(self, rules: Sequence[str] = (), min_original_size: int = 0, max_aspect_ratio: float = 0.0):
        self.rules = [parse_json_filter(r) for r in rules]
        self.min_original_size = min_original_size
        self.max_aspect_ratio = max_aspect_ratio

    @property
    def needs_json(self) -> bool:
        return bool(self.rules)

    @property
    def needs_size(self) -> bool:
        return self.min_original_size > 0 or self.max_aspect_ratio > 0

    def rejects(self, meta: dict) -> Optional[str]:
        for field, op, value in self.rules:
            x = _lookup(meta, field)
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                return f"{field} missing"
            if not _OPS[op](x, value):
                return f"{field} {op} {value:g}"
        return None

    def rejects_size(self, size: tuple[int, int]) -> Optional[str]:
        w, h = size
        if min(w, h) < self.min_original_size:
            return "min_original_size"
        if self.max_aspect_ratio > 0 and max(w, h) / max(1, min(w, h)) > self.max_aspect_ratio:
            return "max_aspect_ratio"
        return None
