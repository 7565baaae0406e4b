"""Precompute round trip: shards of latents + text embeddings read back into the same tensors, and a
stage-two-like loss from them equals the loss computed online from the raw shards."""
from __future__ import annotations

import torch
from torch import nn

from data_pipeline import DataConfig, build_eval_loader, build_train_loader
from data_pipeline.precompute import precompute_shards
from data_pipeline.synthetic import write_synthetic


class TinyEncoder(nn.Module):
    """Random-init stand-in for the autoencoder: a posterior (mean, std) at 1/4 resolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return {"latent_mean": mean, "latent_std": torch.exp(0.5 * logvar.clamp(-10, 4))}


def encode_captions(captions: list[str]) -> dict:
    """Deterministic stand-in for a text encoder: token states from character codes, varying lengths."""
    L, D = 8, 5
    hidden = torch.zeros(len(captions), L, D)
    mask = torch.zeros(len(captions), L, dtype=torch.bool)
    for i, c in enumerate(captions):
        words = c.split()[:L]
        for j, w in enumerate(words):
            hidden[i, j] = torch.tensor([float(ord(ch)) for ch in (w * D)[:D]]) / 100
        mask[i, :len(words)] = True
    return {"text_hidden": hidden, "text_mask": mask, "text_pooled": hidden.sum(1)}


def toy_loss(latent_mean, latent_std, text_pooled, noise, eps):
    """A stand-in stage-two loss: sample the latent, noise it, predict the noise with a fixed map."""
    z = latent_mean + latent_std * eps
    t = 0.3
    x = (1 - t) * z + t * noise
    pred = x * 0.5 + text_pooled.mean(-1)[:, None, None, None] * 0.01
    return torch.mean((pred - noise) ** 2)


def test_precompute_round_trip_and_loss_equality(tmp_path):
    src = tmp_path / "src"
    write_synthetic(src, 14, size=16, seed=1, shard_size=5)  # 3 shards: 5, 5, 4
    cfg = DataConfig(urls=[str(src)], image_size=16, num_workers=1)
    enc = TinyEncoder().eval()
    out = tmp_path / "pre"
    summaries = [precompute_shards(cfg, cfg.urls, out, encode_images=enc, encode_captions=encode_captions,
                                   rank=r, world_size=2, batch_size=4, flip="pair") for r in range(2)]
    assert sum(s["samples"] for s in summaries) == 14 and sum(s["written"] for s in summaries) == 3
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(out.glob("*.tmp"))

    # reference: encode the raw eval batches online
    ref = {}
    with torch.no_grad():
        for b in build_eval_loader(cfg, cfg.urls, rank=0, world_size=1, batch_size=3):
            lat, lat_flip, text = enc(b["image"]), enc(torch.flip(b["image"], dims=[-1])), encode_captions(b["caption"])
            for i, k in enumerate(b["key"]):
                ref[k] = {"latent_mean": lat["latent_mean"][i], "latent_std": lat["latent_std"][i],
                          "flip_mean": lat_flip["latent_mean"][i], "text_hidden": text["text_hidden"][i],
                          "text_mask": text["text_mask"][i], "text_pooled": text["text_pooled"][i],
                          "caption": b["caption"][i]}

    pcfg = DataConfig(urls=[str(out)], kind="precomputed", num_workers=2)
    seen = set()
    for b in build_eval_loader(pcfg, pcfg.urls, rank=0, world_size=1, batch_size=4):
        assert b["latent_mean"].dtype == torch.float32 and b["text_mask"].dtype == torch.bool
        assert b["latent_mean"].shape[1:] == (4, 4, 4) and b["text_hidden"].shape[1:] == (8, 5)
        for i, k in enumerate(b["key"]):
            r = ref[k]
            seen.add(k)
            assert b["caption"][i] == r["caption"]
            for name in ("latent_mean", "latent_std", "text_hidden", "text_mask", "text_pooled"):
                assert torch.equal(b[name][i], r[name]), name
            noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(len(seen)))
            eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(100 + len(seen)))
            pre = toy_loss(b["latent_mean"][i:i + 1], b["latent_std"][i:i + 1], b["text_pooled"][i:i + 1], noise, eps)
            raw = toy_loss(r["latent_mean"][None], r["latent_std"][None], r["text_pooled"][None], noise, eps)
            assert abs(pre.item() - raw.item()) <= 1e-5
    assert seen == set(ref)

    # training from precomputed shards: flip_prob 1 always takes the stored flipped pair
    tcfg = DataConfig(urls=[str(out)], kind="precomputed", num_workers=0, flip_prob=1.0, batches_per_epoch=3)
    b = next(build_train_loader(tcfg, rank=0, world_size=1, seed=0, batch_size=4))
    for i, k in enumerate(b["key"]):
        assert torch.equal(b["latent_mean"][i], ref[k]["flip_mean"])
        assert "latent_mean_flip" not in b

    # data.flip_prob decides how often the stored mirror is taken: never at 0 (no mirrors), always at 1, about p
    # between, per sample over an epoch's draws
    for p, lo, hi in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.2, 0.13, 0.27), (0.5, 0.42, 0.58)):
        pcfg_p = DataConfig(urls=[str(out)], kind="precomputed", num_workers=0, flip_prob=p, batches_per_epoch=40)
        loader = build_train_loader(pcfg_p, rank=0, world_size=1, seed=0, batch_size=10)
        drawn = [(b["latent_mean"][i], ref[k]) for b in loader.iter_epoch() for i, k in enumerate(b["key"])]
        assert len(drawn) == 400
        # a mirror-symmetric image has equal latents both ways: count only the samples whose mirror differs
        taken = [torch.equal(z, r["flip_mean"]) for z, r in drawn if not torch.equal(r["flip_mean"], r["latent_mean"])]
        assert len(taken) > 300 and lo <= sum(taken) / len(taken) <= hi, p
        loader.close()

    # a rerun skips finished shards
    again = precompute_shards(cfg, cfg.urls, out, encode_images=enc, encode_captions=encode_captions,
                              rank=0, world_size=1)
    assert again["skipped_done"] == 3 and again["samples"] == 0


def test_precompute_over_faulty_shards_keeps_exactly_the_good_samples(faulty_shards, tmp_path):
    cfg = DataConfig(urls=faulty_shards["urls"], image_size=16, num_workers=2, max_bad_fraction=1.0,
                     fault_log_per_minute=0, shard_retries=0)
    enc = TinyEncoder().eval()
    total = 0
    for r in range(2):
        s = precompute_shards(cfg, cfg.urls, tmp_path, encode_images=enc, encode_captions=encode_captions,
                              rank=r, world_size=2, batch_size=3, flip="none", dtype="float16")
        total += s["samples"]
    assert total == len(faulty_shards["good_keys"])
    written = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert written == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "00005.tar"]  # unreadable: left to retry
    pcfg = DataConfig(urls=[str(tmp_path)], kind="precomputed", num_workers=0)
    loader = build_eval_loader(pcfg, pcfg.urls, rank=0, world_size=1, batch_size=5)
    keys = sorted(k for b in loader for k in b["key"])
    assert keys == faulty_shards["good_keys"] and loader.fault_counts() == {}
    from data_pipeline.inspect import inspect_shards
    report = inspect_shards([str(tmp_path)], pcfg)
    assert report["samples"] == len(keys) and report["bad_total"] == 0 and report["latent_shapes"] == {"4x4x4": len(keys)}


def test_precomputed_reader_takes_one_member_npy_members_and_counts_damage(tmp_path):
    """Precompute writes one safetensors member per sample; shards of `.npy` members (the earlier format)
    read back to the same arrays; a damaged arrays member is skipped and counted, not fatal."""
    import numpy as np
    from webdataset.writer import TarWriter

    from data_pipeline.tensors import ARRAYS_MEMBER, arrays_bytes, npy_bytes

    rng = np.random.default_rng(0)
    samples = {f"k{i}": {"latent_mean": rng.standard_normal((4, 2, 2)).astype(np.float32),
                         "text_hidden": rng.standard_normal((3, 5)).astype(np.float32),
                         "text_mask": np.array([True, True, False])} for i in range(4)}
    with TarWriter(str(tmp_path / "00000.tar"), encoder=False) as w:
        for i, (key, arrays) in enumerate(samples.items()):
            member = {"__key__": key, "txt": b"a red circle on a blue background"}
            if i % 2:   # the earlier layout: one .npy member per array
                member.update({f"{n}.npy": npy_bytes(a) for n, a in arrays.items()})
            else:
                member[ARRAYS_MEMBER] = arrays_bytes(arrays)
            w.write(member)
        w.write({"__key__": "broken", "txt": b"a red circle on a blue background", ARRAYS_MEMBER: b"\x00" * 7})
    cfg = DataConfig(urls=[str(tmp_path / "00000.tar")], kind="precomputed", num_workers=0, max_bad_fraction=1.0,
                     fault_log_per_minute=0)
    loader = build_eval_loader(cfg, cfg.urls, rank=0, world_size=1, batch_size=4)
    batches = list(loader)
    assert len(batches) == 1 and loader.fault_counts() == {"undecodable_tensor": 1}
    b = batches[0]
    for i, key in enumerate(b["key"]):
        for name, a in samples[key].items():
            assert np.array_equal(b[name][i].numpy(), a), (key, name)


def test_precompute_mirrors_left_right_captions_with_their_latents(tmp_path):
    """A mirrored image of "a yellow square to the left of a purple circle" shows the square on the right:
    precompute with flip pairs encodes the caption with the sides swapped for exactly the captions that name
    a side, and the loader takes it together with the mirrored latents (flip_prob 1) or neither (flip_prob 0).
    With data.mirror_captions false it warns instead, naming how many captions and both keys; without pairs
    nothing is said."""
    import warnings

    import pytest

    from data_pipeline.transforms import mirror_caption, says_left_or_right

    src = tmp_path / "src"
    write_synthetic(src, 40, size=32, seed=3, shard_size=40, tier="compositional")
    cfg = DataConfig(urls=[str(src)], image_size=32, num_workers=0)
    enc = TinyEncoder().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = precompute_shards(cfg, cfg.urls, tmp_path / "pairs", encode_images=enc, encode_captions=encode_captions,
                              batch_size=8, flip="pair")
    sides = 0
    for flip_prob in (1.0, 0.0):
        tcfg = DataConfig(urls=[str(tmp_path / "pairs")], kind="precomputed", num_workers=0, flip_prob=flip_prob,
                          batches_per_epoch=1, shuffle_buffer=0)
        b = next(build_train_loader(tcfg, rank=0, world_size=1, seed=0, batch_size=40))
        for i, caption in enumerate(b["caption"]):
            original = mirror_caption(caption) if flip_prob and says_left_or_right(caption) else caption
            sides += bool(flip_prob) and says_left_or_right(caption)
            expect = encode_captions([caption])
            assert torch.equal(b["text_hidden"][i], expect["text_hidden"][0]), (flip_prob, caption)
            assert torch.equal(b["text_mask"][i], expect["text_mask"][0])
            assert (caption != original) == (flip_prob == 1.0 and says_left_or_right(original))
        assert not any(k.endswith("_flip") for k in b)
    assert 0 < sides == s["mirrored_captions"] < s["samples"] == 40 and "left_right_captions" not in s

    kept = DataConfig(urls=[str(src)], image_size=32, num_workers=0, mirror_captions=False)
    with pytest.warns(UserWarning, match=r"captions say 'left' or 'right'.*data.mirror_captions: true.*"
                                         r"data.flip_prob: 0") as record:
        s = precompute_shards(kept, kept.urls, tmp_path / "kept", encode_images=enc, encode_captions=encode_captions,
                              batch_size=8, flip="pair")
    assert s["left_right_captions"] == sides and "mirrored_captions" not in s
    assert f"{sides} of 40 captions" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = precompute_shards(kept, kept.urls, tmp_path / "none", encode_images=enc, encode_captions=encode_captions,
                              batch_size=8, flip="none")
    assert "left_right_captions" not in s and s["samples"] == 40


def test_train_loader_warns_once_when_flipped_images_have_left_right_captions(tmp_path):
    """Online (raw) training mirrors images itself: with data.mirror_captions false the first batch's
    captions are checked, once; at the default the caption is mirrored with the image and nothing is said."""
    import warnings

    from data_pipeline.transforms import mirror_caption, says_left_or_right

    write_synthetic(tmp_path / "src", 24, size=32, seed=3, shard_size=24, tier="compositional")
    source = {}
    for b in build_eval_loader(DataConfig(urls=[str(tmp_path / "src")], image_size=32, num_workers=0),
                               [str(tmp_path / "src")], rank=0, world_size=1, batch_size=24):
        source.update({k: (c, img) for k, c, img in zip(b["key"], b["caption"], b["image"])})
    assert sum(says_left_or_right(c) for c, _ in source.values()) > 0
    for flip_prob, mirror, expect in ((0.5, False, True), (0.0, False, False), (0.5, True, False), (1.0, True, False)):
        cfg = DataConfig(urls=[str(tmp_path / "src")], image_size=32, num_workers=0, flip_prob=flip_prob,
                         mirror_captions=mirror, crop="center")
        loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=12)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            batches = [next(loader), next(loader)]
        said = [w for w in record if "say 'left' or 'right'" in str(w.message)]
        assert len(said) == (1 if expect else 0), flip_prob
        if flip_prob == 1.0:   # every image mirrored, and every caption with it
            for b in batches:
                for k, c, img in zip(b["key"], b["caption"], b["image"]):
                    assert c == mirror_caption(source[k][0]) and torch.equal(img, torch.flip(source[k][1], [-1]))
        loader.close()
