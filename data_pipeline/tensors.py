"""Arrays in shards as `.npy` bytes (numpy's own format, loaded with allow_pickle=False: no pickle)."""
from __future__ import annotations

import io

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
