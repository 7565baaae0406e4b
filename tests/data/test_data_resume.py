"""Resuming twice in a row gives exactly the batches of an uninterrupted loader."""
from __future__ import annotations

import json

import pytest
import torch

from data_pipeline import DataConfig, SourceConfig, build_train_loader
from datakit import good, jpeg, rgb, write_tar


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k
            else:
                assert v == y[k], k


def run_interrupted(cfg, seed, batch_size, pieces):
    """Take pieces[0] batches, save, rebuild from the state, take pieces[1], save, rebuild, ..."""
    out, state, loader = [], None, None
    for n in pieces:
        loader = build_train_loader(cfg, rank=1, world_size=2, seed=seed, batch_size=batch_size, state=state)
        out += take(loader, n)
        state = json.loads(json.dumps(loader.state_dict()))  # must survive a plain-JSON round trip
        loader.close()
    return out, state, loader


@pytest.mark.parametrize("resampled", [True, False])
def test_resume_twice_equals_uninterrupted(faulty_shards, resampled):
    urls = faulty_shards["urls"] if resampled else faulty_shards["urls"][:6]
    cfg = DataConfig(urls=urls, image_size=16, num_workers=2, batches_per_epoch=5, shuffle_buffer=6,
                     resampled=resampled, max_bad_fraction=1.0, fault_log_per_minute=0, crop="random", flip_prob=0.5,
                     shard_retries=0)  # the failing pipe is permanent; retries (real reads, counted again on a
    pieces = [3, 4, 6]                 # replay) are tested in test_flaky_storage.py  # crosses the epoch boundary at batch 5 and resumes at an odd worker
    whole = build_train_loader(cfg, rank=1, world_size=2, seed=11, batch_size=3)
    expected = take(whole, sum(pieces))
    got, state, last = run_interrupted(cfg, 11, 3, pieces)
    same(got, expected)
    assert state["batches_consumed"] == sum(pieces) and state["epoch"] == 2
    assert last.fault_counts() == whole.fault_counts()  # counts carried through the checkpoints
    assert last.counts() == whole.counts()
    whole.close()


def test_resume_with_aspect_buckets_and_pending_samples(tmp_path):
    # three aspect ratios: batches come from one bucket each, so samples wait in partial buckets
    shapes = [(48, 24), (24, 24), (24, 48)]
    for s in range(3):
        samples = []
        for i in range(10):
            w, h = shapes[(i + s) % 3]
            samples.append(good(f"k{s}_{i}", 10 * s + i, data=jpeg(rgb(10 * s + i, w, h))))
        write_tar(tmp_path / f"{s:05d}.tar", samples)
    cfg = DataConfig(urls=[str(tmp_path / "{00000..00002}.tar")], image_size=32, aspect_buckets=True, bucket_step=8,
                     num_workers=2, batches_per_epoch=4, shuffle_buffer=5, fault_log_per_minute=0)
    whole = build_train_loader(cfg, rank=0, world_size=1, seed=3, batch_size=3)
    expected = take(whole, 9)
    for b in expected:
        assert b["image"].shape[0] == 3
    assert len({tuple(b["image"].shape[2:]) for b in expected}) > 1  # several buckets were used
    out, state, pending_seen = [], None, False
    for n in (2, 3, 4):
        if state is not None:
            pending_seen |= any(p["pending"] for p in state["workers"])
        loader = build_train_loader(cfg, rank=0, world_size=1, seed=3, batch_size=3, state=state)
        out += take(loader, n)
        state = loader.state_dict()
        loader.close()
    assert pending_seen  # the resume had to rebuild partial buckets
    same(out, expected)
    whole.close()


def test_weighted_mix_resumes_and_respects_weights(clean_shards):
    a, b = clean_shards["urls"][:2], clean_shards["urls"][2:]
    cfg = DataConfig(sources=[SourceConfig(urls=a, weight=3.0), SourceConfig(urls=b, weight=1.0)], image_size=16,
                     num_workers=2, batches_per_epoch=100, shuffle_buffer=0, fault_log_per_minute=0)
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=5, batch_size=8)
    keys = [k for batch in take(loader, 40) for k in batch["key"]]
    share_a = sum(k.startswith(("s0_", "s1_")) for k in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.08
    loader.close()
    got, _, _ = run_interrupted(cfg, 5, 8, [2, 3])
    ref = build_train_loader(cfg, rank=1, world_size=2, seed=5, batch_size=8)
    same(got, take(ref, 5))
    ref.close()


def test_changed_layout_resumes_at_next_epoch_with_warning(clean_shards):
    cfg = DataConfig(urls=clean_shards["urls"], image_size=16, num_workers=2, batches_per_epoch=4,
                     fault_log_per_minute=0)
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=2)
    take(loader, 3)
    state = loader.state_dict()
    loader.close()
    other = DataConfig(**{**cfg.__dict__, "num_workers": 1})
    with pytest.warns(RuntimeWarning, match="another layout"):
        resumed = build_train_loader(other, rank=0, world_size=1, seed=0, batch_size=2, state=state)
    assert resumed.batches_consumed == 4 and resumed.epoch == 1
    assert len(take(resumed, 2)) == 2
    resumed.close()


def test_shard_order_is_a_function_of_seed_epoch_rank_worker(clean_shards):
    cfg = DataConfig(urls=clean_shards["urls"], image_size=16, num_workers=2, batches_per_epoch=3,
                     fault_log_per_minute=0, shuffle_buffer=4)

    def keys(rank, seed):
        loader = build_train_loader(cfg, rank=rank, world_size=2, seed=seed, batch_size=2)
        out = [k for b in take(loader, 6) for k in b["key"]]
        loader.close()
        return out

    assert keys(0, 1) == keys(0, 1)
    assert keys(0, 1) != keys(1, 1)
    assert keys(0, 1) != keys(0, 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_the_global_rng_alone(clean_shards, workers):
    """Starting a loader's iterator must not draw from the global torch RNG: a resumed run starts its
    iterator at the resume step, so such a draw would shift every later noise / timestep draw of training
    away from the uninterrupted run (seen as a USR1-resumed stage-two run diverging at the first step)."""
    cfg = DataConfig(urls=clean_shards["urls"], image_size=16, num_workers=workers, batches_per_epoch=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=5, batch_size=2)
    take(loader, 4)
    from data_pipeline import build_eval_loader

    for _ in build_eval_loader(cfg, urls=clean_shards["urls"][:1], batch_size=2, rank=0, world_size=1):
        pass
    assert torch.equal(torch.get_rng_state(), before)
    loader.close()


def test_uint8_training_batches_scale_to_the_float_loaders_bit_for_bit(clean_shards):
    """The runtime's loader hands raw images over as uint8 [B, H, W, 3] and scales them on the training
    device; that gives exactly the float batches of the host-scaling loader, and the same sample order."""
    from data_pipeline.transforms import to_float_on_device

    cfg = DataConfig(urls=clean_shards["urls"], image_size=16, crop="random", flip_prob=0.5, shuffle_buffer=8)
    host = build_train_loader(cfg, rank=0, world_size=1, seed=3, batch_size=4)
    raw = build_train_loader(cfg, rank=0, world_size=1, seed=3, batch_size=4, uint8_images=True)
    for a, b in zip(take(host, 5), take(raw, 5)):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 16, 16, 3)
        assert a["image"].dtype == torch.float32 and a["image"].shape == (4, 3, 16, 16)
        assert a["key"] == b["key"]
        assert torch.equal(to_float_on_device(b["image"]), a["image"])
    assert host.state_dict() == raw.state_dict()
    host.close()
    raw.close()
