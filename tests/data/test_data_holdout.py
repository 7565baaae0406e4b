"""data.val_fraction (issue #20 item 1): held-out shards chosen from the training shards by a documented rule."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from data_pipeline import DataConfig, SourceConfig, build_eval_loader, build_train_loader, heldout_urls
from data_pipeline.loader import training_sources
from data_pipeline.shards import holdout_score, shard_name, split_holdout
from datakit import good, write_tar

REPO = Path(__file__).resolve().parents[2]


def names(n: int, start: int = 0, root: str = "/data/laion") -> list[str]:
    return [f"{root}/{i:05d}.tar" for i in range(start, start + n)]


def test_shard_name_is_the_last_two_path_parts_wherever_the_shard_lives():
    same = ["/data/laion/00012.tar", "laion/00012.tar", "file:///mnt/x/laion/00012.tar",
            "s3://bucket/laion/00012.tar", "pipe:aws s3 cp s3://bucket/laion/00012.tar -",
            "pipe:cat '/scratch/copy/laion/00012.tar'", "https://host/a/b/laion/00012.tar"]
    assert {shard_name(u) for u in same} == {"laion/00012.tar"}
    assert len({holdout_score(u) for u in same}) == 1
    assert shard_name("/data/coyo/00012.tar") == "coyo/00012.tar"   # another data set: another name
    assert 0 <= holdout_score("/data/coyo/00012.tar") < 1


def test_split_is_deterministic_disjoint_order_free_and_stable_when_shards_are_added():
    urls = names(1000)
    train, val = split_holdout(urls, 0.02)
    assert (train, val) == split_holdout(list(urls), 0.02)                 # deterministic
    assert not set(train) & set(val) and sorted(train + val) == sorted(urls)  # disjoint, complete
    assert train == [u for u in urls if u in set(train)]                    # order kept
    shuffled = random.Random(0).sample(urls, len(urls))
    t2, v2 = split_holdout(shuffled, 0.02)
    assert set(v2) == set(val) and set(t2) == set(train)                    # order does not matter
    assert 8 <= len(val) <= 35, len(val)                                    # about 2% of 1000
    # 500 shards added: none of the old ones changes side
    t3, v3 = split_holdout(urls + names(500, start=1000), 0.02)
    assert set(val) == set(v3) & set(urls) and set(train) == set(t3) & set(urls)
    # a moved root or a pipe: command reading the same shards: the same choice
    moved = [u.replace("/data/laion/", "pipe:aws s3 cp s3://b/laion/") + " -" for u in urls]
    assert [moved[urls.index(u)] for u in val] == split_holdout(moved, 0.02)[1]
    # a larger fraction holds out a superset
    assert set(val) <= set(split_holdout(urls, 0.1)[1])
    print(f"\nval_fraction 0.02 of 1000 shards: {len(val)} held out; +500 shards: {len(v3)}, old ones unmoved")


def test_at_least_one_held_out_and_one_kept():
    assert split_holdout(names(1), 0.5) == (names(1), [])           # one shard: nothing to spare
    assert split_holdout(names(5), 0.0) == (names(5), [])           # off
    train, val = split_holdout(names(2), 1e-9)
    assert len(val) == 1 and len(train) == 1
    assert val == [min(names(2), key=holdout_score)]                # the smallest hash
    train, val = split_holdout(names(3), 0.999999)
    assert len(train) == 1 and len(val) == 2


def test_config_rules():
    from launch.runtime.configio import ConfigError, build_dataclass

    with pytest.raises(ConfigError, match=r"'data.val_fraction' = 1.0 is out of range: must be >= 0 and < 1"):
        build_dataclass(DataConfig, {"val_fraction": 1.0}, "data")
    with pytest.raises(ConfigError, match="set either val_urls .* or val_fraction = 0.1 .* not both"):
        build_dataclass(DataConfig, {"val_fraction": 0.1, "val_urls": ["x.tar"], "urls": ["y.tar"]}, "data")
    assert DataConfig().val_fraction == 0.0
    cfg = DataConfig(urls=["a.tar"], val_urls=["v.tar"])
    assert heldout_urls(cfg) == ["v.tar"] and heldout_urls(DataConfig(urls=names(4))) == []


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("holdout")
    urls = []
    for s in range(8):
        write_tar(root / f"{s:05d}.tar", [good(f"s{s}_{i}", 8 * s + i) for i in range(4)])
        urls.append(str(root / f"{s:05d}.tar"))
    return urls


def test_held_out_shards_leave_training_and_feed_validation(eight_shards):
    cfg = DataConfig(urls=[str(Path(eight_shards[0]).parent / "{00000..00007}.tar")], image_size=16,
                     num_workers=0, val_fraction=0.25, batches_per_epoch=40)
    val = heldout_urls(cfg)
    (train, _), = training_sources(cfg)
    assert val and train and sorted(train + val) == sorted(eight_shards) and not set(train) & set(val)
    held = {Path(u).stem for u in val}
    loader = build_train_loader(cfg, rank=0, world_size=1, seed=0, batch_size=4)
    seen = {k.split("_")[0][1:] for _ in range(40) for k in next(loader)["key"]}
    loader.close()
    assert seen and not seen & {str(int(h)) for h in held}, (seen, held)
    keys = [k for b in build_eval_loader(cfg, val, rank=0, world_size=1, batch_size=2) for k in b["key"]]
    assert len(keys) == 4 * len(val) and {k.split("_")[0][1:] for k in keys} == {str(int(h)) for h in held}
    # a mix: each source holds out its own shards
    mix = DataConfig(sources=[SourceConfig(urls=eight_shards[:4]), SourceConfig(urls=eight_shards[4:], weight=2)],
                     val_fraction=0.01)
    split = training_sources(mix)
    assert [len(u) for u, _ in split] == [3, 3] and [w for _, w in split] == [1.0, 2.0]
    assert len(heldout_urls(mix)) == 2


def test_a_run_with_val_fraction_logs_validation_metrics(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    import harness as H
    from data_pipeline.synthetic import write_synthetic

    write_synthetic(tmp_path / "data", 64, size=32, seed=0, shard_size=16)   # 4 shards
    urls = str(tmp_path / "data" / "{00000..00003}.tar")
    run = tmp_path / "run"
    proc = H.run(["train", "configs/demo/autoencoder.yaml", f"run_dir={run}", f"data.urls={urls}", "data.val_urls=[]",
                  "data.val_fraction=0.25", "train.max_steps=2", "train.micro_batch_size=4", "train.log_every=1",
                  "validation.every=2", "validation.batches=2", "validation.sample_every=0",
                  "train.precision=fp32", "autoencoder.latent_stats_batches=1", "data.num_workers=0"],
                 nproc=1, script=H.LDM)
    H.assert_ok(proc)
    records = H.metrics(run)
    vals = [r for r in records if any(k.startswith("val/") for k in r)]
    assert vals and vals[-1]["step"] == 2, records
    assert "val/psnr" in vals[-1] or "val/l1" in vals[-1], vals[-1]
    held = split_holdout([str(tmp_path / "data" / f"{s:05d}.tar") for s in range(4)], 0.25)[1]
    print(f"\nval_fraction run: held out {[Path(u).name for u in held]}; logged {sorted(vals[-1])}")
