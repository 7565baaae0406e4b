"""Arrays in shards, without pickle.

Precompute writes all arrays of one sample as a single safetensors member (`{key}.arrays.safetensors`):
one tar member and one header parse per sample instead of one `.npy` member per array, which cut the
reading cost of a demo sample from ~0.6 ms to ~0.2 ms. `.npy` members (numpy's own format, loaded with
allow_pickle=False) are still read, for shards written before.
"""
from __future__ import annotations

import io

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

ARRAYS_MEMBER = "arrays.safetensors"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def arrays_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """name -> array as one safetensors blob."""
    return _st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def arrays_load(data: bytes) -> dict[str, np.ndarray]:
    return _st_load(data)
