"""Configuration of the data pipeline (the `data:` section).

Ranges live in field metadata (ge/gt/le/lt), choices in ``Literal``, cross-field rules in
``validate()``; ``launch/runtime/configio.py`` reads them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

# "field op number", e.g. "pwatermark < 0.5" or "aesthetic.score >= 5"; dots reach into nested json.
JSON_FILTER_RE = re.compile(
    r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def parse_json_filter(text: str) -> tuple[str, str, float]:
    m = JSON_FILTER_RE.match(text)
    if not m:
        raise ValueError(f"json filter {text!r} is not of the form 'field OP number' "
                         f"(OP one of < <= > >= == !=), e.g. 'pwatermark < 0.5'")
    return m.group(1), m.group(2), float(m.group(3))


@dataclass
class SourceConfig:
    """One data set of a weighted mix: its shard URLs and its share of the samples."""
    urls: list[str] = field(default_factory=list)
    weight: float = field(default=1.0, metadata={"gt": 0})

    def validate(self) -> None:
        if not self.urls:
            raise ValueError("a source needs at least one url")


@dataclass
class DataConfig:
    # WebDataset shard URLs: local paths, brace patterns ("shards/{00000..00099}.tar"), folders of
    # .tar files or `pipe:` commands ("pipe:aws s3 cp s3://bucket/{000..099}.tar -").
    urls: list[str] = field(default_factory=list)
    # Several data sets mixed per sample by weight; use instead of `urls` (not both).
    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out shards for validation. Either list them in `val_urls`, or set `val_fraction` (e.g. 0.02) to
    # hold out about that share of the training shards (data.urls, or each of data.sources) by this rule:
    # a shard is held out when blake2b("val_fraction" + its name) read as a number in [0, 1) is below the
    # fraction, its name being the last two path parts of the shard's location ("laion/00012.tar" for
    # /data/laion/00012.tar, s3://bucket/laion/00012.tar or a `pipe:` command reading either). So the choice
    # does not depend on the order or the number of shards, on the root folder or the read command, and
    # shards added later never move old ones between training and validation. With a fraction > 0 and
    # >= 2 shards, at least one shard is held out (the one of smallest hash, if none is below the fraction)
    # and at least one is kept for training. Held-out shards are removed from training. 0: off.
    val_urls: list[str] = field(default_factory=list)
    val_fraction: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    image_size: int = field(default=256, metadata={"ge": 8})
    num_workers: int = field(default=2, metadata={"ge": 0})
    # "raw": images + captions, encoded online; "precomputed": latents + text embeddings from `ldm data precompute`.
    kind: Literal["raw", "precomputed"] = "raw"

    # --- reading ---
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])  # first present wins
    caption_key: str = "txt"                # tar member holding the caption ("" to use only the json)
    caption_json_field: str = "caption"     # fallback inside {key}.json ("" to disable)
    allow_empty_caption: bool = False       # an empty caption counts as missing unless this is set

    # --- training stream ---
    # Resampled: every (rank, worker) draws shards with replacement from all shards, order a pure
    # function of (seed, epoch, rank, worker). Otherwise each worker cycles through its own slice.
    resampled: bool = True
    # An epoch is a fixed number of batches on every rank (else DDP collectives deadlock on uneven
    # shards). Give it per rank (batches_per_epoch) or globally (samples_per_epoch); neither: 1000 batches.
    batches_per_epoch: Optional[int] = field(default=None, metadata={"ge": 1})
    samples_per_epoch: Optional[int] = field(default=None, metadata={"ge": 1})
    shuffle_buffer: int = field(default=1000, metadata={"ge": 0})   # raw samples per worker; 0: no shuffle

    # --- transforms ---
    crop: Literal["center", "random"] = "random"   # evaluation always crops at the center
    flip_prob: float = field(default=0.5, metadata={"ge": 0, "le": 1})  # evaluation never flips
    # A mirrored sample's caption swaps 'left' and 'right' (raw: as the image is flipped; precomputed: the
    # swapped caption is encoded beside the mirrored latents), so layout captions stay true under flips.
    mirror_captions: bool = True
    interpolation: Literal["bilinear", "bicubic", "lanczos", "box"] = "bicubic"
    # Aspect-ratio buckets: sizes of about image_size**2 pixels, sides multiples of bucket_step, ratios up to
    # bucket_max_ratio; each batch comes from one bucket.
    aspect_buckets: bool = False
    bucket_step: int = field(default=64, metadata={"ge": 8})
    bucket_max_ratio: float = field(default=2.0, metadata={"ge": 1})

    # --- filters on {key}.json (a filtered sample is not a fault) ---
    min_original_size: int = field(default=0, metadata={"ge": 0})   # shorter side of original_width/height
    max_aspect_ratio: float = field(default=0.0, metadata={"ge": 0})  # long/short side of the original; 0: off
    json_filters: list[str] = field(default_factory=list)           # e.g. ["pwatermark < 0.5", "similarity >= 0.28"]

    # --- faults ---
    max_bad_fraction: float = field(default=0.2, metadata={"ge": 0, "le": 1})  # of raw samples; 1 disables
    bad_fraction_min_samples: int = field(default=1000, metadata={"ge": 1})     # judge only after this many
    fault_log_per_minute: int = field(default=10, metadata={"ge": 0})          # per process; 0: silent
    # max_bad_fraction also applies to shards: more than that share of the shards read unusable (unreadable,
    # timed out, truncated, empty) stops the run, judged after this many shards per worker and rank.
    bad_fraction_min_shards: int = field(default=10, metadata={"ge": 1})

    # --- flaky storage ---
    # A shard read that fails (open error, a `pipe:` command exiting non-zero, a `pipe:` stream that stalls
    # or breaks off) is tried again up to shard_retries times, waiting shard_retry_backoff_s * 2**k before
    # retry k; a retry skips the samples already handed out, so a read that succeeds on a retry gives the
    # same stream as a clean one (exact resume holds). Then the shard is skipped and counted as
    # `unreadable_url` / `shard_timeout`. A missing local file and a truncated local tar are not retried.
    shard_retries: int = field(default=3, metadata={"ge": 0, "le": 20})
    shard_retry_backoff_s: float = field(default=1.0, metadata={"ge": 0, "le": 600})
    # A `pipe:` (or http/gs/...) read that sends no byte for this long is killed (its process group) and
    # retried; 0: wait forever. Local files have no timeout (the kernel cannot interrupt their reads).
    shard_timeout_s: float = field(default=300.0, metadata={"ge": 0})
    # An image whose header says more pixels than this (width * height) is refused before it is decoded,
    # counted as `image_too_large`: 64 Mpx (8000 x 8000) is far above any training size and far below
    # PIL's decompression-bomb error (2 x Image.MAX_IMAGE_PIXELS = 179 Mpx, refused the same way).
    max_image_pixels: int = field(default=64_000_000, metadata={"ge": 1})

    # --- DataLoader ---
    prefetch_factor: int = field(default=2, metadata={"ge": 1})
    pin_memory: bool = False   # pin batches (after scaling) when CUDA is there
    multiprocessing_context: Literal["default", "fork", "spawn", "forkserver"] = "default"

    def all_sources(self) -> list[SourceConfig]:
        """The training mix: `sources`, or `urls` as a single source of weight 1."""
        return list(self.sources) if self.sources else ([SourceConfig(urls=list(self.urls))] if self.urls else [])

    def validate(self) -> None:
        if self.urls and self.sources:
            raise ValueError("set either urls or sources (a weighted mix), not both")
        if self.val_urls and self.val_fraction > 0:
            raise ValueError(f"set either val_urls (held-out shards) or val_fraction = {self.val_fraction} "
                             f"(held out of the training shards), not both")
        if self.batches_per_epoch is not None and self.samples_per_epoch is not None:
            raise ValueError("set either batches_per_epoch (per rank) or samples_per_epoch (global), not both")
        if not self.image_keys:
            raise ValueError("image_keys must name at least one image extension")
        if not self.caption_key and not self.caption_json_field:
            raise ValueError("caption_key and caption_json_field are both empty: no caption source")
        for text in self.json_filters:
            parse_json_filter(text)
        if self.aspect_buckets and self.image_size < self.bucket_step:
            raise ValueError(f"aspect_buckets: image_size = {self.image_size} is smaller than "
                             f"bucket_step = {self.bucket_step}")
