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


TINY_T5_WORDS = ("a red green blue yellow black white orange purple circle square triangle star on the of and "
                 "background left right above below two three").split()


def save_tiny_t5(folder, d_model: int = 96, seed: int = 0):
    """A tiny T5 encoder and its tokenizer saved with save_pretrained, built offline: transformers'
    T5Tokenizer (tokenizers-backed Unigram) over a word vocabulary, T5EncoderModel from a T5Config."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in TINY_T5_WORDS]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", decoder_start_token_id=0)
        T5EncoderModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """Folder of a tiny T5 encoder (d_model 96, 2 layers) and its tokenizer."""
    return save_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))
