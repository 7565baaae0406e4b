"""`ldm plan` counts every text encoder: open_clip towers and T5 (from its config.json, or a T5 v1.1 size
named by the folder before it is downloaded), in their dtypes, and the joined token count."""
from __future__ import annotations

import torch

from launch.plan import frozen as FZ
from plankit import load

TINY_CLIP = "{arch: ldm-tiny-text, model_config: configs/ldm/open_clip/ldm-tiny-text.json}"


def _t5_folder(tmp_path):
    from transformers import T5Config
    cfg = T5Config(vocab_size=40, d_model=48, d_kv=16, d_ff=80, num_layers=2, num_heads=3,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    cfg.save_pretrained(str(tmp_path / "t5"))
    return tmp_path / "t5", cfg


def test_t5_tower_params_match_transformers(tmp_path):
    from transformers import T5EncoderModel
    from ldm.config import TextEncoderEntry
    folder, t5cfg = _t5_folder(tmp_path)
    tower = FZ.t5_tower(TextEncoderEntry(kind="t5", path=str(folder), max_length=20, dtype="bfloat16"))
    with torch.device("meta"):
        model = T5EncoderModel(t5cfg)
    assert tower.params == sum(p.numel() for p in model.parameters())
    assert tower.context_length == 20 and tower.bytes_per_param == 2
    relu = FZ.T5Tower(48, 80, 2, 3, 16, 40, gated=False)
    with torch.device("meta"):
        model = T5EncoderModel(type(t5cfg)(vocab_size=40, d_model=48, d_kv=16, d_ff=80, num_layers=2, num_heads=3))
    assert relu.params == sum(p.numel() for p in model.parameters())
    # before the download: the folder's name gives T5 v1.1 XXL (4.76 B encoder parameters)
    xxl = FZ.t5_tower(TextEncoderEntry(kind="t5", path=str(tmp_path / "models" / "t5-v1_1-xxl")))
    assert 4.7e9 < xxl.params < 4.8e9


def test_plan_counts_every_text_encoder(tmp_path):
    from launch.plan.description import describe
    from launch.plan.planner import frozen_bytes
    from ldm.text import build_text_encoder
    folder, _ = _t5_folder(tmp_path)
    one = describe(load("ldm/unet-small"))
    clip_params = sum(p.numel() for p in build_text_encoder(load("ldm/unet-small").text_encoder).parameters())
    assert one.frozen.text_params == clip_params and one.frozen.text_bytes == 4 * clip_params
    cfg = load("ldm/unet-small", "text_encoder={}",
               f"text.encoders=[{TINY_CLIP}, {TINY_CLIP}, {{kind: t5, path: '{folder}', max_length: 20, "
               "dtype: bfloat16}]")
    desc = describe(cfg)
    t5 = FZ.t5_tower(cfg.text.encoders[2])
    assert [t["kind"] for t in desc.frozen.text_encoders] == ["open_clip", "open_clip", "t5"]
    assert desc.frozen.text_params == 2 * clip_params + t5.params
    assert desc.frozen.text_bytes == 8 * clip_params + 2 * t5.params
    assert frozen_bytes(desc.frozen) == desc.frozen.text_bytes + 4 * desc.frozen.ae_params
    assert desc.frozen.text_flops == 2 * one.frozen.text_flops + t5.forward_flops()


def test_sd3_medium_text_encoders_before_download(capsys):
    """configs/ldm/mmdit-sd3-medium.yaml: CLIP-L + bigG from open_clip's configs, T5-XXL (bf16) by the folder's
    name; the joined text is 77 + 256 tokens; the MMDiT is walked (launch/plan/denoisers.mmdit_forward)."""
    import pytest
    from launch.plan.description import _text_towers, describe
    from launch.runtime.configio import ConfigError
    cfg = load("ldm/mmdit-sd3-medium")
    notes = []
    towers, length = _text_towers(cfg, notes)
    assert length == 77 + 256 and not notes
    params = [t["params"] for t in towers]
    assert 1.2e8 < params[0] < 1.3e8 and 6.9e8 < params[1] < 7.0e8 and 4.7e9 < params[2] < 4.8e9
    assert towers[2]["bytes"] == 2 * params[2]
    with capsys.disabled():
        names = ", ".join(f"{t['name']} {t['params']:,}" for t in towers)
        print(f"\nSD3-medium text encoders: {names}; resident "
              f"{sum(t['bytes'] for t in towers) / 2 ** 30:.2f} GiB")
    desc = describe(cfg)       # the MMDiT forward walk: activations over 64 x 64 image + 333 text tokens
    assert desc.kind == "mmdit" and desc.params.trainable == 2_028_328_000
    assert desc.forward[False].saved_bytes > desc.forward[True].saved_bytes > 0
    with pytest.raises(ConfigError, match="stage"):
        describe(load("autoencoder/kl-f8"))
