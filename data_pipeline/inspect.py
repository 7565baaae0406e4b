"""One pass over shards: how many good samples, what is broken and why, caption and image sizes.

Decodes every image exactly as training would (a small target size keeps it cheap), so the
counts it reports are the counts training will see.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from typing import Optional, Sequence

from .config import DataConfig
from .loader import OnePassLoader
from .shards import expand_urls


def _summary(values: list) -> dict:
    if not values:
        return {"min": None, "mean": None, "median": None, "max": None}
    return {"min": min(values), "mean": round(statistics.fmean(values), 2),
            "median": statistics.median(values), "max": max(values)}


def inspect_shards(urls: str | Sequence[str], cfg: Optional[DataConfig] = None, *, num_workers: int = 0,
                   batch_size: int = 64) -> dict:
    """{"shards", "bad_shards", "retries", "samples", "filtered", "bad": {reason: n}, "bad_total", "bad_fraction",
    caption and size stats}; shard reads are retried as in training (data.shard_retries)."""
    cfg = dataclasses.replace(cfg or DataConfig(), image_size=32, aspect_buckets=False)
    expanded = expand_urls(urls)
    t0 = time.time()
    loader = OnePassLoader(cfg, expanded, rank=0, world_size=1, batch_size=batch_size, with_meta=True,
                           check_bad_fraction=False, num_workers=num_workers, expanded=True)
    chars, words, widths, heights = [], [], [], []
    formats: Counter = Counter()
    latent_shapes: Counter = Counter()  # precomputed shards: shapes instead of image sizes
    for batch in loader:
        for caption, size, fmt in zip(batch["caption"], batch["original_size"], batch["format"]):
            chars.append(len(caption))
            words.append(len(caption.split()))
            if len(size) == 2:
                widths.append(size[0])
                heights.append(size[1])
                formats[fmt] += 1
            else:
                latent_shapes["x".join(map(str, size))] += 1
    counts = loader.counts()
    seen = counts["good"] + counts["filtered"] + counts["bad_total"]
    return {
        "shards": len(expanded),
        "bad_shards": counts["bad_shards"],   # unreadable, timed out, truncated or empty
        "retries": counts["retries"],
        "samples": counts["good"],
        "filtered": counts["filtered"],
        "bad": counts["bad"],
        "bad_total": counts["bad_total"],
        "bad_fraction": round(counts["bad_total"] / seen, 6) if seen else 0.0,
        "caption_chars": _summary(chars),
        "caption_words": _summary(words),
        "image_width": _summary(widths),
        "image_height": _summary(heights),
        "formats": dict(sorted(formats.items())),
        **({"latent_shapes": dict(sorted(latent_shapes.items()))} if latent_shapes else {}),
        "seconds": round(time.time() - t0, 3),
    }


def format_report(report: dict) -> str:
    """Human-readable lines for `ldm data inspect` without --json."""
    lines = [f"shards        {report['shards']} ({report.get('bad_shards', 0)} bad, "
             f"{report.get('retries', 0)} read retries)",
             f"good samples  {report['samples']}",
             f"filtered      {report['filtered']}",
             f"bad samples   {report['bad_total']} ({report['bad_fraction']:.2%})"]
    lines += [f"  {reason:<22}{n}" for reason, n in report["bad"].items()]
    for name in ("caption_chars", "caption_words", "image_width", "image_height"):
        s = report[name]
        lines.append(f"{name:<14}min {s['min']}  median {s['median']}  mean {s['mean']}  max {s['max']}")
    lines.append("formats       " + ", ".join(f"{k}: {v}" for k, v in report["formats"].items()))
    return "\n".join(lines)
