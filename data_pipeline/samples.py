"""One raw sample (tar members) -> a decoded sample, a Fault or a filtered mark; batching; collation.

Runs in DataLoader workers. Everything here is deterministic given the raw sample and its rng.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from . import faults as F
from .config import DataConfig
from .faults import Fault
from .tensors import ARRAYS_MEMBER, arrays_load, npy_load
from .transforms import (JsonFilter, decode_to, draw_flip, exif_orientation, make_buckets, mirror_caption,
                         nearest_bucket, open_image, original_size, upright_size)

# Precomputed shards must hold these arrays; others (latent_std, text_pooled, ...) are optional.
REQUIRED_ARRAYS = ("latent_mean", "text_hidden")
FLIP_SUFFIX = "_flip"


@dataclass
class Sample:
    key: str
    caption: str
    bucket: tuple                      # batches are formed per bucket: target size or latent shape
    image: Optional[np.ndarray] = None  # uint8 [H, W, 3] (raw kind)
    arrays: dict = field(default_factory=dict)  # name -> array (precomputed kind)
    url: str = ""
    meta: dict = field(default_factory=dict)    # the parsed json (with_meta only)
    original_size: tuple = ()
    format: str = ""


@dataclass(frozen=True)
class Filtered:
    reason: str


class Decoder:
    """Turns raw samples into `Sample`s for the configured kind; train mode crops/flips at random."""

    def __init__(self, cfg: DataConfig, *, train: bool, with_meta: bool = False):
        self.cfg = cfg
        self.kind = cfg.kind
        self.with_meta = with_meta
        self.crop = cfg.crop if train else "center"
        self.flip_prob = cfg.flip_prob if train else 0.0
        self.filter = JsonFilter(cfg.json_filters, cfg.min_original_size, cfg.max_aspect_ratio)
        self.buckets = (make_buckets(cfg.image_size, cfg.bucket_step, cfg.bucket_max_ratio)
                        if cfg.aspect_buckets else None)

    def __call__(self, raw: dict, rng: Optional[random.Random]) -> Sample | Fault | Filtered:
        key, url = raw["__key__"], raw.get("__url__", "")
        txt = self._caption_from(raw)
        meta: Optional[dict] = None
        if "json" in raw and (self.with_meta or self.filter.needs_json or self.filter.needs_size or not txt):
            try:
                meta = json.loads(raw["json"])
                if not isinstance(meta, dict):
                    raise ValueError("not a json object")
            except Exception as e:
                if self.filter.needs_json or not txt:
                    return Fault(F.BAD_JSON, url, key, f"{type(e).__name__}: {e}")
                meta = None  # the json is not needed: ignore the damage
        from_json = meta.get(self.cfg.caption_json_field) if meta and self.cfg.caption_json_field else None
        from_json = from_json.strip() if isinstance(from_json, str) else None
        caption = txt or from_json
        if not caption:
            if self.cfg.allow_empty_caption and (txt is not None or from_json is not None):
                caption = ""
            elif self.kind == "raw" and self._image_ext(raw) is None:
                return Fault(F.MISSING_IMAGE, url, key, "no image member (and no caption)")
            else:
                return Fault(F.MISSING_CAPTION, url, key, f"no .{self.cfg.caption_key} and no json "
                                                          f"'{self.cfg.caption_json_field}'")
        if self.filter.needs_json:
            reason = self.filter.rejects(meta or {})
            if reason:
                return Filtered(reason)
        if self.kind == "precomputed":
            return self._arrays(raw, key, url, caption, meta, rng)
        return self._image(raw, key, url, caption, meta, rng)

    # ------------------------------------------------------------------ pieces

    def _caption_from(self, raw: dict) -> Optional[str]:
        data = raw.get(self.cfg.caption_key) if self.cfg.caption_key else None
        if data is None:
            return None
        return data.decode("utf-8", errors="replace").strip()

    def _image_ext(self, raw: dict) -> Optional[str]:
        for ext in self.cfg.image_keys:
            if ext in raw:
                return ext
        return None

    def _image(self, raw, key, url, caption, meta, rng) -> Sample | Fault | Filtered:
        ext = self._image_ext(raw)
        if ext is None:
            return Fault(F.MISSING_IMAGE, url, key, f"none of {', '.join(self.cfg.image_keys)}")
        data = raw[ext]
        if not data:
            return Fault(F.EMPTY_IMAGE, url, key, f"{key}.{ext} is empty")
        try:
            img = open_image(data)   # the header only: no pixel is decoded yet
        except Image.DecompressionBombError as e:  # PIL's own limit (2 x Image.MAX_IMAGE_PIXELS)
            return Fault(F.IMAGE_TOO_LARGE, url, key, f"{e}")
        except Exception as e:
            return Fault(F.UNDECODABLE_IMAGE, url, key, f"{type(e).__name__}: {e}")
        w, h = img.size
        if w * h > self.cfg.max_image_pixels:
            return Fault(F.IMAGE_TOO_LARGE, url, key, f"{w} x {h} = {w * h} pixels > data.max_image_pixels = "
                                                      f"{self.cfg.max_image_pixels}")
        size = upright_size(img, exif_orientation(img))
        if self.filter.needs_size:
            reason = self.filter.rejects_size(original_size(meta or {}) or size)
            if reason:
                return Filtered(reason)
        target = nearest_bucket(self.buckets, *size) if self.buckets else (self.cfg.image_size,) * 2
        try:
            flip = draw_flip(rng, self.flip_prob)   # decode_to's first draw, made here so the caption can follow
            pixels = decode_to(img, target, crop=self.crop, rng=rng, flip=flip,
                               interpolation=self.cfg.interpolation)
        except Exception as e:  # truncated data, bad palette, decompression bomb, ...
            return Fault(F.UNDECODABLE_IMAGE, url, key, f"{type(e).__name__}: {e}")
        if flip and self.cfg.mirror_captions:
            caption = mirror_caption(caption)
        return Sample(key=key, caption=caption, bucket=tuple(target), image=pixels, url=url,
                      meta=(meta or {}) if self.with_meta else {}, original_size=size, format=ext)

    def _arrays(self, raw, key, url, caption, meta, rng) -> Sample | Fault:
        arrays = {}
        for member, data in raw.items():
            try:
                if member == ARRAYS_MEMBER:
                    arrays.update(arrays_load(data))
                elif member.endswith(".npy"):
                    arrays[member[:-4]] = npy_load(data)
            except Exception as e:
                return Fault(F.UNDECODABLE_TENSOR, url, key, f"{member}: {type(e).__name__}: {e}")
        missing = [n for n in REQUIRED_ARRAYS if n not in arrays]
        if missing:
            return Fault(F.MISSING_TENSOR, url, key, f"no {', '.join(missing)} (in {ARRAYS_MEMBER} or as .npy)")
        # Flips were encoded at precompute time as a pair (name, name_flip); pick one per sample. Text arrays
        # have a partner only where the caption names a side (data.mirror_captions): the caption follows them.
        flip = draw_flip(rng, self.flip_prob)
        if flip and any(n.startswith("text") and n.endswith(FLIP_SUFFIX) for n in arrays):
            caption = mirror_caption(caption)
        out = {}
        for name, a in arrays.items():
            if name.endswith(FLIP_SUFFIX):
                continue
            partner = arrays.get(name + FLIP_SUFFIX)
            out[name] = partner if flip and partner is not None else a
        return Sample(key=key, caption=caption, bucket=tuple(out["latent_mean"].shape), arrays=out, url=url,
                      meta=(meta or {}) if self.with_meta else {}, original_size=tuple(out["latent_mean"].shape))


class Batcher:
    """Fills one batch per bucket; a batch leaves as soon as its bucket is full."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.buckets: dict[tuple, list[tuple[int, Sample]]] = {}

    def add(self, index: int, sample: Sample) -> Optional[list[Sample]]:
        items = self.buckets.setdefault(sample.bucket, [])
        items.append((index, sample))
        if len(items) < self.batch_size:
            return None
        del self.buckets[sample.bucket]
        return [s for _, s in items]

    def pending(self) -> list:
        """Raw indices waiting in partial buckets (plain lists, for the loader state)."""
        return [[list(key), [i for i, _ in items]] for key, items in self.buckets.items()]

    def pending_urls(self) -> set:
        return {s.url for items in self.buckets.values() for _, s in items}

    def flush(self) -> list[list[Sample]]:
        out = [[s for _, s in items] for items in self.buckets.values()]
        self.buckets.clear()
        return out


def _stack_padded(name: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Stack; arrays differing only in their first dim (token count) are zero-padded to the longest."""
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
        raise ValueError(f"precomputed '{name}' arrays of one batch have shapes "
                         f"{sorted({a.shape for a in arrays})}; only the first dim may differ")
    n = max(a.shape[0] for a in arrays)
    out = np.zeros((len(arrays), n) + arrays[0].shape[1:], dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return out


def _uint8_batch(shape: tuple) -> torch.Tensor:
    """An empty uint8 tensor; in a DataLoader worker, allocated in shared memory right away (as torch's
    default_collate does), so handing it to the main process copies nothing more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    proto = torch.empty(0, dtype=torch.uint8)
    storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device=proto.device)
    return proto.new(storage).resize_(shape)


def collate(samples: list[Sample], with_meta: bool) -> dict[str, Any]:
    """Samples -> batch; raw images stay uint8 [B, H, W, 3] here, the main process scales them."""
    batch: dict[str, Any] = {"caption": [s.caption for s in samples], "key": [s.key for s in samples]}
    if samples[0].image is not None:
        images = _uint8_batch((len(samples),) + samples[0].image.shape)
        array = images.numpy()
        for i, s in enumerate(samples):
            array[i] = s.image
        batch["image"] = images
    else:
        for name in samples[0].arrays:
            stacked = _stack_padded(name, [s.arrays[name] for s in samples])
            if stacked.dtype.kind == "f":
                stacked = stacked.astype(np.float32, copy=False)
            batch[name] = torch.from_numpy(np.ascontiguousarray(stacked))
    if with_meta:
        batch["url"] = [s.url for s in samples]
        batch["json"] = [s.meta for s in samples]
        batch["original_size"] = [tuple(s.original_size) for s in samples]
        batch["format"] = [s.format for s in samples]
    return batch
