"""Faulty shards: exact counts in one-pass mode over 2 ranks x 2 workers; training survives them."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from data_pipeline import DataConfig, DataFaultError, build_eval_loader, build_train_loader
from data_pipeline.shards import read_shard


def cfg_for(urls, **kw) -> DataConfig:
    base = dict(urls=list(urls), image_size=16, num_workers=2, max_bad_fraction=1.0, fault_log_per_minute=0,
                shard_retries=0)  # the failing `pipe:` shard is permanent here: no backoff waits
    base.update(kw)
    cfg = DataConfig(**base)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("buckets", [False, True])
def test_one_pass_two_ranks_two_workers_exact_counts(faulty_shards, buckets):
    urls = faulty_shards["urls"]
    cfg = cfg_for(urls, aspect_buckets=buckets, bucket_step=8)
    keys: list[str] = []
    bad: Counter = Counter()
    for rank in range(2):
        loader = build_eval_loader(cfg, urls, rank=rank, world_size=2, batch_size=3)
        assert loader.num_workers == 2
        for batch in loader:
            n = len(batch["key"])
            assert batch["image"].shape[:2] == (n, 3) and batch["image"].dtype == torch.float32
            assert buckets or batch["image"].shape[2:] == (16, 16)
            assert batch["image"].min() >= -1 and batch["image"].max() <= 1
            assert len(batch["caption"]) == n and all(batch["caption"])
            keys += batch["key"]
        bad.update(loader.fault_counts())
    assert sorted(keys) == faulty_shards["good_keys"]          # every good sample exactly once
    assert len(keys) == len(set(keys))
    assert dict(bad) == faulty_shards["bad"]                    # every fault counted once, by reason


def test_json_caption_fallback_and_caption_key(faulty_shards):
    cfg = cfg_for(faulty_shards["urls"][:1], num_workers=0)
    captions = {k: c for b in build_eval_loader(cfg, cfg.urls, rank=0, world_size=1, batch_size=4)
                for k, c in zip(b["key"], b["caption"])}
    assert captions["a_jsoncap"] == "sample a_jsoncap"
    # with the caption taken only from the json, samples with just a .txt caption become faults
    only_json = cfg_for(faulty_shards["urls"][:1], num_workers=0, caption_key="")
    loader = build_eval_loader(only_json, only_json.urls, rank=0, world_size=1, batch_size=4)
    assert [k for b in loader for k in b["key"]] == ["a_jsoncap"]
    assert loader.fault_counts() == {"missing_caption": 11}


def test_shard_reader_reports_one_fault_per_broken_shard(faulty_shards):
    urls = faulty_shards["urls"]
    tails = {u: [x for x in read_shard(u) if not isinstance(x, dict)] for u in urls}
    reasons = {u: [f.reason for f in t] for u, t in tails.items()}
    assert reasons[urls[2]] == ["truncated_tar"] and reasons[urls[3]] == ["truncated_tar"]
    assert reasons[urls[4]] == ["unreadable_url"] and reasons[urls[6]] == ["unreadable_url"]
    assert reasons[urls[0]] == [] and reasons[urls[5]] == []
    assert tails[urls[2]][0].key == "c2"  # the dropped, possibly incomplete sample is named


def test_training_mode_uneven_faulty_shards_same_batches_per_rank(faulty_shards):
    cfg = cfg_for(faulty_shards["urls"], batches_per_epoch=3, shuffle_buffer=4)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, seed=7, batch_size=4)
        counts = []
        for _ in range(2):
            batches = list(loader.iter_epoch())
            assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
            counts.append(len(batches))
        assert loader.epoch == 2
        assert sum(loader.fault_counts().values()) > 0
        assert set(loader.fault_counts()) <= set(faulty_shards["bad"])
        per_rank.append(counts)
        loader.close()
    assert per_rank == [[3, 3], [3, 3]]


def test_samples_per_epoch_gives_equal_global_split(clean_shards):
    cfg = cfg_for(clean_shards["urls"], samples_per_epoch=50, num_workers=0)
    lens = [len(build_train_loader(cfg, rank=r, world_size=2, seed=0, batch_size=4)) for r in range(2)]
    assert lens == [7, 7]  # ceil(50 / (4 * 2))


def test_max_bad_fraction_raises_clear_error(faulty_shards):
    cfg = cfg_for(faulty_shards["urls"][1:2], num_workers=0, max_bad_fraction=0.3, bad_fraction_min_samples=5)
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=2)
    with pytest.raises(DataFaultError, match="max_bad_fraction"):
        for _ in range(20):
            next(loader)
    # the one-pass loader judges at the end of the pass
    with pytest.raises(DataFaultError, match="undecodable_image"):
        list(build_eval_loader(cfg, cfg.urls, rank=0, world_size=1, batch_size=2))


def test_all_unreadable_fails_instead_of_hanging(tmp_path):
    cfg = cfg_for([str(tmp_path / "nope.tar")], num_workers=0, max_bad_fraction=0.5, bad_fraction_min_samples=50)
    with pytest.raises(DataFaultError, match="unreadable_url"):
        next(build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=2))


def test_clear_errors_when_a_rank_or_worker_has_no_shard(clean_shards):
    urls = clean_shards["urls"][:3]
    with pytest.raises(ValueError, match="rank 3 of 4 gets no shard"):
        build_eval_loader(cfg_for(urls), urls, rank=3, world_size=4, batch_size=2)
    # one-pass: workers are capped at the rank's shard count instead of idling
    assert build_eval_loader(cfg_for(urls), urls, rank=1, world_size=2, batch_size=2).num_workers == 1
    with pytest.raises(ValueError, match="rank 1 worker 1 gets no shard"):
        build_train_loader(cfg_for(urls, resampled=False), rank=1, world_size=2, seed=0, batch_size=2)
    with pytest.raises(ValueError, match="empty"):
        build_train_loader(cfg_for([]), rank=0, world_size=1, seed=0, batch_size=2)
    with pytest.raises(ValueError, match="pipe:aws s3 cp"):
        build_train_loader(cfg_for(["s3://bucket/{000..009}.tar"]), rank=0, world_size=1, seed=0, batch_size=2)
