"""Fixtures for the autoencoder tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ae_helpers import write_vgg16_file


@pytest.fixture(scope="session")
def vgg16_file(tmp_path_factory) -> Path:
    return write_vgg16_file(tmp_path_factory.mktemp("vgg"))


@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine's cores are shared: these models are tiny, and on a busy machine two
    # intra-op threads ran the training loop 4-8x slower than one (they wait for each other)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
