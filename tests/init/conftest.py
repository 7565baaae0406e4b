"""Fixtures for the init.from tests: tiny diffusers models saved with save_pretrained, built in the test."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "runtime") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "runtime"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is much faster than two spinning."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
