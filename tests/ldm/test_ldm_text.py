"""open_clip text encoder: save a tiny tower, load it back through open_clip's own loader, compare."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.config import TextEncoderConfig
from ldm.text import OpenCLIPTextEncoder, build_text_encoder

CAPTIONS = ["a red circle on a blue background", "", "a white triangle on a black background!!"]


def _reference(model, tokens, layer):
    """Token states computed by hand from the original model's modules."""
    x = model.token_embedding(tokens) + model.positional_embedding
    blocks = model.transformer.resblocks
    for block in (blocks if layer == "last" else blocks[:-1]):
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@pytest.mark.parametrize("layer", ["last", "penultimate"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_through_open_clip_loader(tiny_text_checkpoint, tiny_text_config, tmp_path, layer, fmt):
    import open_clip
    arch, path, model = tiny_text_checkpoint
    if fmt == "safetensors":
        path = tmp_path / "tiny_text.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    enc = build_text_encoder(TextEncoderConfig(arch=arch, pretrained=str(path), layer=layer,
                                               model_config=str(tiny_text_config)))
    out = enc(CAPTIONS)
    tokens = open_clip.get_tokenizer(arch)(CAPTIONS)
    with torch.no_grad():
        hidden = _reference(model, tokens, layer)
        pooled = model.encode_text(tokens)
    assert out["text_hidden"].shape == (3, 77, 64) and out["text_pooled"].shape == (3, 32)
    assert torch.allclose(out["text_hidden"], hidden, atol=1e-5)
    assert torch.allclose(out["text_pooled"], pooled, atol=1e-5)
    # a freshly initialised tower gives different numbers: the weights really came from the file
    torch.manual_seed(99)
    fresh = OpenCLIPTextEncoder(arch, pretrained=None, layer=layer)
    assert not torch.allclose(fresh(CAPTIONS)["text_pooled"], pooled, atol=1e-3)


def test_layers_mask_and_freezing(tiny_text_checkpoint):
    arch, path, _ = tiny_text_checkpoint
    last = OpenCLIPTextEncoder(arch, pretrained=str(path), layer="last")
    pen = OpenCLIPTextEncoder(arch, pretrained=str(path), layer="penultimate")
    a, b = last(CAPTIONS), pen(CAPTIONS)
    assert not torch.allclose(a["text_hidden"], b["text_hidden"])
    assert torch.allclose(a["text_pooled"], b["text_pooled"])          # pooled is always the final feature
    # mask: start-of-text + word tokens + end-of-text ("background!!" is two tokens)
    assert a["text_mask"].sum(1).tolist() == [9, 2, 10]
    assert a["text_mask"].dtype == torch.bool and a["text_mask"][:, 0].all()
    assert getattr(last.clip, "visual", None) is None                   # image tower dropped
    assert not any(p.requires_grad for p in last.parameters())
    last.train()
    assert not last.training and not last.clip.training


def test_missing_checkpoint_names_the_path(tiny_text_config, tmp_path):
    from ldm.config import TextEncoderConfig
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_text_encoder(TextEncoderConfig(arch="ldm-test-tiny-text", pretrained=str(missing)))
    with pytest.raises(FileNotFoundError, match="no open_clip model config at"):
        build_text_encoder(TextEncoderConfig(arch="x", model_config=str(tmp_path / "absent.json")))
