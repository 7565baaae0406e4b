"""Several text encoders (ldm/text_encoders.py, ldm/t5.py): T5 against transformers, the SD3 join, per-encoder
dropout, storage of every part, the config, and a stage conditioned on CLIP + T5."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ldm.config import TextEncoderEntry
from ldm.t5 import T5TextEncoder
from ldm.text_encoders import (TextEncoders, build_text_encoders, drop_parts, encode_for_storage, join_text,
                               parts_to_arrays)

CAPTIONS = ["a red circle on the blue background", "", "two green squares and a star left of the circle"]


def _root(encoders, **extra):
    from launch.runtime.config import load_config
    base = {"stage": "diffusion", "run_dir": "runs/x", "data": {"urls": ["x.tar"]}, "text": {"encoders": encoders}}
    base.update(extra)
    return load_config(None, base=base)


def _clip_entry(tiny_text_checkpoint, **kw):
    arch, path, _ = tiny_text_checkpoint
    return {"kind": "open_clip", "arch": arch, "pretrained": str(path), "layer": "penultimate", **kw}


# ----------------------------------------------------------------------------------------- T5

def test_t5_output_equals_a_direct_transformers_call(tiny_t5):
    from transformers import AutoTokenizer, T5EncoderModel
    enc = T5TextEncoder(str(tiny_t5), max_length=16)
    out = enc(CAPTIONS)
    tok = AutoTokenizer.from_pretrained(str(tiny_t5))
    ids = tok(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = T5EncoderModel.from_pretrained(str(tiny_t5)).eval()(input_ids=ids["input_ids"]).last_hidden_state
    assert out["text_hidden"].shape == (3, 16, 96) and "text_pooled" not in out
    assert torch.equal(out["text_hidden"], ref)
    assert torch.equal(out["text_mask"], ids["attention_mask"].bool())
    assert out["text_mask"].sum(1).tolist()[:2] == [8, 1]         # 7 words + </s>; the empty prompt is </s>
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training


def test_missing_t5_folder_names_the_path(tmp_path, tiny_text_checkpoint):
    missing = tmp_path / "models" / "t5-v1_1-xxl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        T5TextEncoder(str(missing))
    cfg = _root([_clip_entry(tiny_text_checkpoint), {"kind": "t5", "path": str(missing)}])
    with pytest.raises(FileNotFoundError, match=r"text\.encoders\[1\]\.path.*" + str(missing)):
        build_text_encoders(cfg)
    from launch.runtime.configio import ConfigError
    from launch.runtime.stages import check
    with pytest.raises(ConfigError, match=r"text\.encoders\[1\]\.path.*" + str(missing)):
        check(cfg)                                                      # before any compute


def test_config_checks():
    from launch.runtime.configio import ConfigError
    with pytest.raises(ConfigError, match=r"text\.encoders\[0\].*kind: t5 needs path"):
        _root([{"kind": "t5"}])
    with pytest.raises(ConfigError, match=r"text\.encoders\[0\]\.kind.*'open_clip', 't5'"):
        _root([{"kind": "bert"}])
    with pytest.raises(ConfigError, match=r"text\.encoders\[1\]\.dropout_prob"):
        _root([{"arch": "ViT-L-14"}, {"arch": "ViT-L-14", "dropout_prob": 1.5}])
    with pytest.raises(ConfigError, match="both set"):
        _root([{"arch": "ViT-L-14"}], text_encoder={"arch": "ViT-H-14"})
    from ldm.text_encoders import text_encoder_entries
    old = _root([])                                                     # the single section, a one-entry list
    (entry,) = text_encoder_entries(old)
    assert entry.kind == "open_clip" and entry.arch == old.text_encoder.arch and entry.dropout_prob == 0


# ----------------------------------------------------------------------------------------- join

def _parts(b=3, g=None):
    g = g or torch.Generator().manual_seed(0)
    la = {"text_hidden": torch.randn(b, 77, 8, generator=g), "text_mask": torch.arange(77)[None] < torch.tensor(
        [[5], [1], [77]]), "text_pooled": torch.randn(b, 4, generator=g)}
    lb = {"text_hidden": torch.randn(b, 77, 12, generator=g), "text_mask": la["text_mask"].clone(),
          "text_pooled": torch.randn(b, 6, generator=g)}
    t5 = {"text_hidden": torch.randn(b, 16, 32, generator=g), "text_mask": torch.arange(16)[None] < torch.tensor(
        [[3], [1], [16]])}
    return [la, lb, t5]


def test_join_pads_clip_to_t5_width_and_concatenates_the_sequence():
    la, lb, t5 = parts = _parts()
    out = join_text(parts, ["open_clip", "open_clip", "t5"])
    assert out["text_hidden"].shape == (3, 77 + 16, 32)
    h = out["text_hidden"]
    assert torch.equal(h[:, :77, :8], la["text_hidden"]) and torch.equal(h[:, :77, 8:20], lb["text_hidden"])
    assert torch.count_nonzero(h[:, :77, 20:]) == 0                     # CLIP zero-padded to T5's width
    assert torch.equal(h[:, 77:], t5["text_hidden"])
    assert torch.equal(out["text_mask"], torch.cat([la["text_mask"], t5["text_mask"]], dim=1))
    assert out["text_mask"].sum(1).tolist() == [5 + 3, 1 + 1, 77 + 16]
    assert torch.equal(out["text_pooled"], torch.cat([la["text_pooled"], lb["text_pooled"]], dim=1))
    # T5 listed first still goes after the CLIP group (SD3's order); a lone CLIP is unchanged
    assert torch.equal(join_text([t5, la, lb], ["t5", "open_clip", "open_clip"])["text_hidden"], h)
    alone = join_text([la], ["open_clip"])
    assert all(torch.equal(alone[k], la[k]) for k in la)
    # CLIP wider than T5: T5 is padded instead
    wide = join_text([la, {"text_hidden": torch.randn(3, 4, 5), "text_mask": torch.ones(3, 4, dtype=torch.bool)}],
                     ["open_clip", "t5"])
    assert wide["text_hidden"].shape == (3, 81, 8) and torch.count_nonzero(wide["text_hidden"][:, 77:, 5:]) == 0


def test_real_encoders_join_and_storage_round_trip(tiny_text_checkpoint, tiny_t5):
    cfg = _root([_clip_entry(tiny_text_checkpoint), _clip_entry(tiny_text_checkpoint, layer="last"),
                 {"kind": "t5", "path": str(tiny_t5), "max_length": 16}])
    enc = build_text_encoders(cfg)
    assert isinstance(enc, TextEncoders) and enc.kinds == ["open_clip", "open_clip", "t5"]
    out = enc(CAPTIONS)
    assert out["text_hidden"].shape == (3, 77 + 16, 128)                # 64 + 64 CLIP channels, T5 96 padded
    assert out["text_pooled"].shape == (3, 64) and enc.pooled_dim == 64
    assert enc.context_length == 93 and enc.width == 128
    t5_alone = T5TextEncoder(str(tiny_t5), max_length=16)(CAPTIONS)
    assert torch.equal(out["text_hidden"][:, 77:, :96], t5_alone["text_hidden"])
    assert torch.count_nonzero(out["text_hidden"][:, 77:, 96:]) == 0
    stored = encode_for_storage(enc, CAPTIONS)                          # what precompute writes: every part
    assert sorted(stored) == ["text_hidden", "text_hidden_1", "text_hidden_2", "text_mask", "text_mask_1",
                              "text_mask_2", "text_pooled", "text_pooled_1"]
    assert stored["text_hidden_2"].shape == (3, 16, 96)
    back = enc.join(enc.parts_from_batch(stored))
    assert all(torch.equal(back[k], out[k]) for k in out)
    with pytest.raises(KeyError, match="lacks text_hidden_2"):
        enc.parts_from_batch({k: v for k, v in stored.items() if not k.endswith("_2")})
    # one open_clip encoder without dropout: the bare tower, whose output is stored as before
    single = build_text_encoders(_root([_clip_entry(tiny_text_checkpoint)]))
    assert not isinstance(single, TextEncoders)
    assert sorted(encode_for_storage(single, CAPTIONS)) == ["text_hidden", "text_mask", "text_pooled"]


# ----------------------------------------------------------------------------------------- dropout

def test_per_encoder_dropout_is_independent_with_the_given_rates():
    n, probs = 20000, [0.464, 0.464, 0.2]
    g = torch.Generator().manual_seed(0)

    def small(width, pooled):
        part = {"text_hidden": torch.randn(n, 3, width, generator=g), "text_mask": torch.rand(n, 3, generator=g) > .5}
        if pooled:
            part["text_pooled"] = torch.randn(n, 2, generator=g)
        return part
    parts = [small(2, True), small(3, True), small(4, False)]
    empty = [{k: v[:1] for k, v in small(w, p).items()} for w, p in ((2, True), (3, True), (4, False))]
    out, drops = drop_parts(parts, empty, probs, generator=torch.Generator().manual_seed(1))
    assert drops.shape == (3, n)
    rates = drops.float().mean(1)
    for r, p in zip(rates.tolist(), probs):
        assert abs(r - p) < 4 * math.sqrt(p * (1 - p) / n), (r, p)
    all3 = drops.all(0).float().mean().item()                          # independence: SD3's ~10 % all dropped
    assert abs(all3 - 0.464 * 0.464 * 0.2) < 0.01
    assert abs(drops[:2].all(0).float().mean().item() - 0.464 ** 2) < 0.015
    for i in range(3):
        for key, v in out[i].items():
            d = drops[i]
            assert torch.equal(v[d], empty[i][key].expand_as(v)[d]) and torch.equal(v[~d], parts[i][key][~d])
    same, _ = drop_parts(parts, empty, probs, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(same[i][k], out[i][k]) for i in range(3) for k in out[i])   # seeded: reproducible
    print(f"\nper-encoder drop rates {[round(r, 4) for r in rates.tolist()]} (want {probs}); all three {all3:.4f} "
          f"(want {0.464 * 0.464 * 0.2:.4f})")


def test_stage_with_clip_and_t5(tiny_text_checkpoint, tiny_t5):
    """A small MMDiT conditioned on CLIP + T5: captions and stored parts give one condition; the empty
    prompt is cached per encoder; per-encoder dropout (T5 only, p = 1) replaces just T5's tokens."""
    from ldm.training import DiffusionStage
    cfg = _root([_clip_entry(tiny_text_checkpoint), {"kind": "t5", "path": str(tiny_t5), "max_length": 16,
                                                     "dropout_prob": 1.0}],
                denoiser={"kind": "mmdit", "pooled_dim": 32,
                          "mmdit": {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64,
                                    "depth": 2, "num_heads": 4, "context_dim": 96}},
                objective={"kind": "flow", "shift": "auto", "shift_base_latent": 8},
                conditioning={"dropout_prob": 0.0})
    stage = DiffusionStage.from_config(cfg)
    stage.setup(torch.device("cpu"))
    enc = stage.text_encoder
    batch = {"latent_mean": torch.randn(3, 4, 8, 8), "caption": CAPTIONS}
    a = stage.condition(batch)
    b = stage.condition({"latent_mean": batch["latent_mean"], **encode_for_storage(enc, CAPTIONS)})
    assert a["context"].shape == (3, 93, 96) and a["pooled"].shape == (3, 32)
    assert all(torch.equal(a[k], b[k]) for k in a)
    empty = enc.empty_parts()
    dropped = stage.condition(batch, train=True)
    assert torch.equal(dropped["context"][:, :77], a["context"][:, :77])          # CLIP kept
    assert torch.equal(dropped["context"][:, 77:], empty[1]["text_hidden"].expand(3, -1, -1))
    assert torch.equal(dropped["pooled"], a["pooled"])
    losses, logs = stage.training_step(stage.trainable_modules(), batch, 0)
    assert torch.isfinite(losses["denoiser"]) and logs["t_shift"] == 1.0
    z = stage.generate(stage.denoiser, {"caption": CAPTIONS[:2]}, seed=0, steps=2)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()


def test_sd3_medium_config_counts_without_the_t5_folder(capsys):
    """`ldm info configs/ldm/mmdit-sd3-medium.yaml --json`: the denoiser has diffusers' SD3-medium count, and
    the T5 folder (a placeholder path) is not needed for it."""
    import json

    from launch.cli import info
    repo = Path(__file__).resolve().parents[2]
    path = repo / "configs" / "ldm" / "mmdit-sd3-medium.yaml"
    from launch.runtime.config import load_config
    cfg = load_config(path)
    kinds = [e.kind for e in cfg.text.encoders]
    assert kinds == ["open_clip", "open_clip", "t5"] and not (repo / cfg.text.encoders[2].path).exists()
    assert cfg.objective.shift == "auto" and cfg.denoiser.pooled_dim == 768 + 1280
    args = type("A", (), {"config": str(path), "overrides": [], "json": True})()
    assert info.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"]["denoiser"]["total"] == 2_028_328_000


def test_precomputed_shards_hold_every_encoder_and_condition_like_captions(tiny_text_checkpoint, tiny_t5,
                                                                         tmp_path):
    """Shards written with every encoder's part (what `ldm data precompute` stores) read back through the
    loader and give the stage the same joined condition as encoding the captions online."""
    from data_pipeline import DataConfig, build_eval_loader
    from data_pipeline.precompute import precompute_shards
    from data_pipeline.synthetic import write_synthetic
    from ldm.training import DiffusionStage

    cfg = _root([_clip_entry(tiny_text_checkpoint), {"kind": "t5", "path": str(tiny_t5), "max_length": 16}],
                denoiser={"kind": "mmdit", "pooled_dim": 32,
                          "mmdit": {"input_size": 4, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
                                    "depth": 1, "num_heads": 2, "context_dim": 96}})
    stage = DiffusionStage.from_config(cfg)
    stage.setup(torch.device("cpu"))
    write_synthetic(tmp_path / "src", 6, size=16, seed=1, shard_size=6)
    dcfg = DataConfig(urls=[str(tmp_path / "src")], image_size=16, num_workers=0)

    def images(x):
        return {"latent_mean": torch.nn.functional.avg_pool2d(x, 4).repeat(1, 2, 1, 1)[:, :4]}
    precompute_shards(dcfg, dcfg.urls, tmp_path / "pre", encode_images=images,
                      encode_captions=lambda caps: encode_for_storage(stage.text_encoder, caps), rank=0,
                      world_size=1, batch_size=4)
    pcfg = DataConfig(urls=[str(tmp_path / "pre")], kind="precomputed", num_workers=0)
    n = 0
    for b in build_eval_loader(pcfg, pcfg.urls, rank=0, world_size=1, batch_size=3):
        assert b["text_hidden"].shape[1:] == (77, 64) and b["text_hidden_1"].shape[1:] == (16, 96)
        stored, online = stage.condition(b), stage.condition({"caption": b["caption"]})
        assert all(torch.allclose(stored[k].float(), online[k].float(), atol=1e-6) for k in online)
        n += len(b["caption"])
    assert n == 6
