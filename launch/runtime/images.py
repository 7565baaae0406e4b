"""Tensors in [-1, 1] to PNG files and grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] in [-1,1] -> [N,H,W,3] uint8 (round to nearest, so a fixed seed gives fixed bytes)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow).save(path)
    return path


def save_images(images: torch.Tensor, directory: str | Path, start: int = 0) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        p = directory / f"{start + i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths
