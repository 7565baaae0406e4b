"""Helpers that build img2dataset-layout test shards (a module name unique in tests/, unlike conftest)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset.writer import TarWriter

SIZE = 24  # tiny images: the tests are about counts and plumbing, not pixels


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=90)
    return buf.getvalue()


def rgb(i: int, w: int = SIZE, h: int = SIZE) -> Image.Image:
    return Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256))


def odd_mode_images() -> dict[str, tuple[str, bytes]]:
    """name -> (ext, bytes) for every mode conversion the decoder handles."""
    rgba = Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 128))
    la = Image.new("LA", (SIZE, SIZE), (0, 0))
    p = Image.new("P", (SIZE, SIZE), 0)
    p.putpalette([0, 0, 255] * 256)
    p.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgba": ("png", png(rgba)),
        "la": ("png", png(la)),
        "p": ("png", png(p)),
        "l": ("jpg", jpeg(Image.new("L", (SIZE, SIZE), 77))),
        "cmyk": ("jpg", jpeg(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)))),
        "i16": ("png", png(Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)))),
        "exif": ("jpg", jpeg(rgb(3, SIZE * 2, SIZE), exif=exif.tobytes())),
        "webp": ("webp", webp(rgb(4))),
    }


def write_tar(path: Path, samples: list[dict]) -> None:
    with TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)


def good(key: str, i: int, ext: str = "jpg", data: bytes | None = None, caption: str | None = None,
         json_caption: bool = False) -> dict:
    caption = caption or f"sample {key}"
    meta = {"key": key, "width": SIZE, "height": SIZE, "original_width": SIZE, "original_height": SIZE,
            "status": "success", "url": f"http://x/{key}"}
    s = {"__key__": key, ext: data if data is not None else jpeg(rgb(i))}
    if json_caption:
        meta["caption"] = caption
    else:
        s["txt"] = caption.encode()
    s["json"] = json.dumps(meta).encode()
    return s


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as t:
        return {m.name: (m.offset, m.offset_data) for m in t.getmembers()}
