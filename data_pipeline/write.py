"""Write img2dataset-layout shards: NNNNN.tar ({key}.jpg|png|webp, {key}.txt, {key}.json), NNNNN.parquet,
NNNNN_stats.json; from a folder of images with sidecar .txt captions, or a CSV / parquet with
`path` and `caption` columns.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

from PIL import Image
from webdataset.writer import TarWriter

from .transforms import exif_orientation, to_rgb, upright_size, _ORIENT

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# json fields img2dataset writes for every sample, in its order; extra fields follow.
BASE_FIELDS = ("url", "caption", "key", "status", "error_message", "width", "height",
               "original_width", "original_height")


class ShardWriter:
    """Samples -> numbered shards of at most `shard_size` samples and `max_shard_bytes` bytes."""

    def __init__(self, out_dir: str | os.PathLike, *, shard_size: int = 10_000, max_shard_bytes: Optional[int] = None,
                 start_shard: int = 0, verbose: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.max_shard_bytes = max_shard_bytes
        self.key_digits = max(4, len(str(shard_size - 1)))
        self.shard = start_shard - 1
        self.verbose = verbose
        self.tar: Optional[TarWriter] = None
        self.rows: list[dict] = []
        self.bytes = 0
        self.failed = 0          # source items skipped while this shard was open (img2dataset's failed_to_*)
        self.started = 0.0
        self.shards: list[str] = []
        self.total = 0

    def _open(self) -> None:
        self._close_shard()
        self.shard += 1
        name = self.out / f"{self.shard:05d}.tar"
        self.tar = TarWriter(str(name), encoder=False, mtime=0)  # fixed mtime: same input, same bytes
        self.rows, self.bytes, self.failed, self.started = [], 0, 0, time.time()
        self.shards.append(str(name))

    def write(self, *, image: bytes, ext: str, caption: str, meta: Optional[dict] = None) -> str:
        """Add one sample; returns its key. `meta` may carry url, width, height, ... and any extra fields."""
        text = caption.encode()
        size = len(image) + len(text) + 2048  # + tar headers and the json, roughly
        if (self.tar is None or len(self.rows) >= self.shard_size
                or (self.max_shard_bytes and self.rows and self.bytes + size > self.max_shard_bytes)):
            self._open()
        key = f"{self.shard:05d}{len(self.rows):0{self.key_digits}d}"
        record = {f: None for f in BASE_FIELDS}
        record.update(meta or {})
        record.update(key=key, caption=caption, status="success")
        for a, b in (("original_width", "width"), ("original_height", "height")):
            if record[a] is None:
                record[a] = record[b]
        payload = json.dumps(record).encode()
        self.tar.write({"__key__": key, ext: image, "txt": text, "json": payload})
        self.rows.append(record)
        self.bytes += len(image) + len(text) + len(payload) + 3 * 512
        self.total += 1
        return key

    def skip(self) -> None:
        """Count a source item that could not be written."""
        self.failed += 1

    def _close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        stem = self.out / f"{self.shard:05d}"
        _write_parquet(self.rows, f"{stem}.parquet")
        end = time.time()
        stats = {"count": len(self.rows) + self.failed, "successes": len(self.rows), "failed_to_download": 0,
                 "failed_to_resize": self.failed, "duration": round(end - self.started, 3),
                 "start_time": self.started, "end_time": end, "status_dict": {"success": len(self.rows)}}
        with open(f"{stem}_stats.json", "w") as f:
            json.dump(stats, f, indent=2)
        if self.verbose:
            print(f"wrote {stem}.tar ({len(self.rows)} samples)")

    def close(self) -> dict:
        self._close_shard()
        return {"shards": len(self.shards), "samples": self.total, "out": str(self.out)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _write_parquet(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(BASE_FIELDS) + sorted({k for r in rows for k in r} - set(BASE_FIELDS))
    flat = [{c: (json.dumps(r.get(c)) if isinstance(r.get(c), (list, dict)) else r.get(c)) for c in columns}
            for r in rows]
    table = pa.Table.from_pylist(flat) if flat else pa.table({c: pa.array([], pa.string()) for c in columns})
    pq.write_table(table, path)


# ----------------------------------------------------------------------------- sources

def iter_source(src: str | os.PathLike) -> Iterator[tuple[Path, Optional[str], dict]]:
    """(image path, caption or None, extra json fields) from a folder, a .csv or a .parquet file."""
    src = Path(src)
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
            side = path.with_suffix(".txt")
            caption = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else None
            yield path, caption, {"url": str(path.relative_to(src))}
        return
    if src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            rows: Iterable[dict] = list(csv.DictReader(f))
    elif src.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        rows = pq.read_table(src).to_pylist()
    else:
        raise ValueError(f"{src}: expected a folder, a .csv or a .parquet file")
    for i, row in enumerate(rows):
        if "path" not in row or "caption" not in row:
            raise ValueError(f"{src}: needs columns 'path' and 'caption'; has {', '.join(row)}")
        path = Path(str(row["path"]))
        if not path.is_absolute():
            path = src.parent / path
        extra = {k: v for k, v in row.items()
                 if k not in ("path", "caption") and isinstance(v, (str, int, float, bool))}
        extra.setdefault("url", str(row["path"]))
        caption = row["caption"]
        yield path, (str(caption).strip() if caption is not None else None), extra


def _prepare(path: Path, resize: Optional[int], image_format: str) -> tuple[bytes, str, dict]:
    """Source file -> (bytes, ext, sizes). Bytes are kept as they are unless resizing/re-encoding is asked."""
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    img.verify()  # cheap integrity check of the whole file
    img = Image.open(io.BytesIO(data))
    orient = exif_orientation(img)
    ow, oh = upright_size(img, orient)
    ext = IMAGE_EXTS[path.suffix.lower()]
    shrink = resize is not None and min(ow, oh) > resize
    if not shrink and image_format in ("keep", ext):
        return data, ext, {"width": ow, "height": oh, "original_width": ow, "original_height": oh}
    img = to_rgb(img)
    for op in _ORIENT.get(orient, ()):
        img = img.transpose(op)
    if shrink:
        s = resize / min(ow, oh)
        img = img.resize((max(1, round(ow * s)), max(1, round(oh * s))), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out_ext = "jpg" if image_format == "keep" and ext == "jpg" else (image_format if image_format != "keep" else "png")
    buf = io.BytesIO()
    options = {"quality": 95} if out_ext != "png" else {}
    img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[out_ext], **options)
    sizes = {"width": img.width, "height": img.height, "original_width": ow, "original_height": oh}
    return buf.getvalue(), out_ext, sizes


def write_from_source(src: str | os.PathLike, out_dir: str | os.PathLike, *, shard_size: int = 10_000,
                      max_shard_bytes: Optional[int] = None, resize: Optional[int] = None,
                      image_format: str = "keep", verbose: bool = False) -> dict:
    """Folder / CSV / parquet -> img2dataset-layout shards. Returns counts, including what was skipped."""
    if image_format not in ("keep", "jpg", "png", "webp"):
        raise ValueError(f"image_format must be keep, jpg, png or webp, got {image_format!r}")
    skipped = {"missing_caption": 0, "unreadable_image": 0}
    with ShardWriter(out_dir, shard_size=shard_size, max_shard_bytes=max_shard_bytes, verbose=verbose) as writer:
        for path, caption, extra in iter_source(src):
            if not caption:
                skipped["missing_caption"] += 1
                writer.skip()
                continue
            try:
                data, ext, sizes = _prepare(path, resize, image_format)
            except Exception:
                skipped["unreadable_image"] += 1
                writer.skip()
                continue
            writer.write(image=data, ext=ext, caption=caption, meta={**extra, **sizes})
    summary = writer.close()
    summary["skipped"] = skipped
    return summary
