"""Precompute latents and text embeddings into new shards, keyed like the source.

Model-agnostic: the caller passes `encode_images(images [B,3,H,W] in [-1,1]) -> {"latent_mean",
"latent_std"?, ...}` and `encode_captions(list[str]) -> {"text_hidden", "text_mask", "text_pooled"}`.
Storing the posterior (mean, std) rather than one sample lets training draw a fresh latent every
step; with `flip="pair"` the flipped image is encoded too (`{name}_flip`), because flipping a
latent is not the same as encoding the flipped image; a caption that says left or right then gets its
mirrored text too (`text_*_flip`, of the caption with the sides swapped; data.mirror_captions). Caption
dropout is not applied here: done once at precompute time, the same samples would always be unconditional
(ARCHITECTURE.md §3).

Each source shard `NAME.tar` becomes `OUT/NAME.tar` (written to a temporary name, renamed when
complete; `NAME.tar.empty` when it had no good sample), so a rerun skips finished shards.
Ranks own fixed slices of the source list; there is
no torch.distributed here. A sample's arrays are one safetensors member (`{key}.arrays.safetensors`,
no pickle); the loader with `kind: precomputed` reads them back.
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from webdataset.writer import TarWriter

from .config import DataConfig
from .loader import OnePassLoader
from .samples import FLIP_SUFFIX
from .shards import expand_urls, split_by_rank
from .tensors import ARRAYS_MEMBER, arrays_bytes
from .transforms import flip_contradiction, mirror_caption, says_left_or_right

EncodeImages = Callable[[torch.Tensor], dict]
EncodeCaptions = Callable[[list], dict]
EMPTY_SUFFIX = ".empty"  # marks a source shard that had no good sample
_SHARD_NAME = re.compile(r"([\w.-]+?)\.(?:tar|tar\.gz|tgz)\b")


def output_names(urls: Sequence[str]) -> dict[str, str]:
    """Source URL -> output shard file name: the source's own name, or its index when names collide."""
    names = {}
    for i, url in enumerate(urls):
        found = _SHARD_NAME.findall(url)
        names[url] = f"{found[-1]}.tar" if found else f"{i:05d}.tar"
    if len(set(names.values())) < len(names):
        names = {url: f"{i:05d}.tar" for i, url in enumerate(urls)}
    return names


def _to_numpy(t, dtype: str) -> np.ndarray:
    a = t.detach().to("cpu").numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    if a.dtype.kind == "f":
        a = a.astype(np.float16 if dtype == "float16" else np.float32)
    return a


def precompute_shards(cfg: DataConfig, urls: str | Sequence[str], out_dir: str | os.PathLike, *,
                      encode_images: EncodeImages, encode_captions: EncodeCaptions,
                      rank: int = 0, world_size: int = 1, batch_size: int = 32,
                      flip: Literal["none", "pair"] = "pair", dtype: Literal["float32", "float16"] = "float32",
                      overwrite: bool = False, num_workers: Optional[int] = None,
                      progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Encode this rank's share of the source shards; returns counts for the log."""
    if flip not in ("none", "pair"):
        raise ValueError(f"flip must be 'none' or 'pair', got {flip!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_urls = expand_urls(urls)
    names = output_names(all_urls)
    mine = split_by_rank(all_urls, rank, world_size)  # fixed slice: independent of what others finished
    todo = [u for u in mine
            if overwrite or not ((out / names[u]).exists() or (out / (names[u] + EMPTY_SUFFIX)).exists())]
    summary = {"rank": rank, "shards": len(mine), "skipped_done": len(mine) - len(todo), "written": 0,
               "samples": 0, "bad": {}, "seconds": 0.0}
    if not todo:
        return summary
    t0 = time.time()
    loader = OnePassLoader(cfg, todo, rank=0, world_size=1, batch_size=batch_size, with_meta=True,
                           num_workers=num_workers, expanded=True)
    writers: dict[str, TarWriter] = {}

    def writer_for(url: str) -> TarWriter:
        if url not in writers:
            writers[url] = TarWriter(str(out / (names[url] + ".tmp")), encoder=False, mtime=0)
        return writers[url]

    def finish(url: str, status: str) -> None:
        w = writers.pop(url, None)
        if status in ("unreadable_url", "shard_timeout"):  # may be transient: leave it for a rerun
            if w is not None:
                w.close()
                os.remove(out / (names[url] + ".tmp"))
            return
        if w is None:  # no good sample: mark it done without an empty tar (which training would flag)
            (out / (names[url] + EMPTY_SUFFIX)).touch()
            return
        w.close()
        os.replace(out / (names[url] + ".tmp"), out / names[url])
        summary["written"] += 1

    try:
        with torch.inference_mode():
            for batch, done in loader.events():
                if batch is not None:
                    mirrored = _write_batch(batch, encode_images, encode_captions, flip, dtype, writer_for,
                                            mirror_captions=cfg.mirror_captions)
                    summary["samples"] += len(batch["key"])
                    if flip == "pair":
                        key = "mirrored_captions" if cfg.mirror_captions else "left_right_captions"
                        summary[key] = summary.get(key, 0) + (mirrored if cfg.mirror_captions else sum(
                            says_left_or_right(c) for c in batch["caption"]))
                    if progress:
                        progress(dict(summary))
                for url, status in done:
                    finish(url, status)
    finally:
        for url, w in list(writers.items()):  # only after an error: leave no half-written shard behind
            w.close()
            try:
                os.remove(out / (names[url] + ".tmp"))
            except FileNotFoundError:
                pass
    summary["bad"] = loader.fault_counts()
    summary["seconds"] = round(time.time() - t0, 3)
    if summary.get("left_right_captions"):
        warnings.warn(flip_contradiction(summary["left_right_captions"], summary["samples"],
                                         "mirrored latents were written for every sample"), stacklevel=2)
    return summary


def _write_batch(batch: dict, encode_images: EncodeImages, encode_captions: EncodeCaptions, flip: str, dtype: str,
                 writer_for: Callable[[str], TarWriter], mirror_captions: bool = True) -> int:
    """Encode and write one batch; returns how many captions got a mirrored partner."""
    images = batch["image"]
    arrays = {k: _to_numpy(v, dtype) for k, v in encode_images(images).items()}
    if "latent_mean" not in arrays:
        raise ValueError(f"encode_images must return 'latent_mean' (got {', '.join(arrays)})")
    if flip == "pair":
        flipped = encode_images(torch.flip(images, dims=[-1]))
        arrays.update({k + FLIP_SUFFIX: _to_numpy(v, dtype) for k, v in flipped.items()})
    arrays.update(_text_arrays(encode_captions(list(batch["caption"])), dtype))
    # The mirrored image's caption says the other side: encode it for the captions that name one, stored
    # beside the mirrored latents ({name}_flip; the loader takes both together). The others need no partner.
    partners: dict[int, dict] = {}
    if flip == "pair" and mirror_captions:
        mirrored = {i: mirror_caption(c) for i, c in enumerate(batch["caption"]) if says_left_or_right(c)}
        if mirrored:
            encoded = _text_arrays(encode_captions(list(mirrored.values())), dtype)
            partners = {i: {name + FLIP_SUFFIX: a[j] for name, a in encoded.items()} for j, i in enumerate(mirrored)}
    for i, key in enumerate(batch["key"]):
        record = dict(batch["json"][i])
        record.update(key=key, caption=batch["caption"][i], source_url=batch["url"][i], flip=flip,
                      latent_shape=list(arrays["latent_mean"][i].shape))
        sample_arrays = {name: a[i] for name, a in arrays.items()}
        if i in partners:
            record["caption_flip"] = mirror_caption(batch["caption"][i])
            sample_arrays.update(partners[i])
        member = {"__key__": key, "txt": batch["caption"][i].encode(), "json": json.dumps(record).encode(),
                  ARRAYS_MEMBER: arrays_bytes(sample_arrays)}
        writer_for(batch["url"][i]).write(member)
    return len(partners)


def _text_arrays(encoded: dict, dtype: str) -> dict:
    text = {k: _to_numpy(v, dtype) for k, v in encoded.items()}
    if "text_hidden" not in text:
        raise ValueError(f"encode_captions must return 'text_hidden' (got {', '.join(text)})")
    if "text_mask" in text:
        text["text_mask"] = text["text_mask"].astype(bool)
    return text
