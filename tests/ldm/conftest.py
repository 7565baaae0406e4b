"""Fixtures for the stage-two tests: a tiny open_clip text tower registered under its own name."""
from __future__ import annotations

import json

import pytest
import torch

TINY_TEXT_ARCH = "ldm-test-tiny-text"
TINY_TEXT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tests run small ops on a shared 2-core machine: two spinning threads are many times slower
    than one there (measured 25x on a tiny UNet), so run each test single-threaded and restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_text_config(tmp_path_factory):
    """Path of an open_clip model-config JSON (text width 64, 2 layers), registered with open_clip."""
    import open_clip
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_TEXT_ARCH}.json"
    path.write_text(json.dumps(TINY_TEXT_CFG))
    open_clip.add_model_config(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tiny_text_config, tmp_path_factory):
    """A randomly initialised tiny CLIP saved to disk: (arch, checkpoint path, the original model)."""
    import open_clip
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY_TEXT_ARCH).eval()
    path = tmp_path_factory.mktemp("open_clip_ckpt") / "tiny_text.pt"
    torch.save(model.state_dict(), path)
    return TINY_TEXT_ARCH, path, model
