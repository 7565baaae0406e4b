"""Fixtures for the autoencoder tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from ae_helpers import write_vgg16_file


@pytest.fixture(scope="session")
def vgg16_file(tmp_path_factory) -> Path:
    return write_vgg16_file(tmp_path_factory.mktemp("vgg"))

