"""Shards in, batches out: img2dataset-format WebDataset shards, distributed, fault-tolerant, resumable.

Knows no model and no torch.distributed: ranks are plain arguments. Names are imported lazily,
so reading the config (`data_pipeline.config`) does not pull in torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "DataConfig": "config", "SourceConfig": "config", "DataFaultError": "faults",
    "TrainLoader": "loader", "OnePassLoader": "loader", "build_train_loader": "loader", "build_eval_loader": "loader",
    "heldout_urls": "loader",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
