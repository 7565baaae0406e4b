"""Writing shards from a folder / CSV / parquet, and the `ldm data` command."""
from __future__ import annotations

import csv
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import DataConfig, build_eval_loader
from data_pipeline.write import write_from_source
from launch.cli import main
from datakit import jpeg, png, rgb


def make_folder(root):
    root.mkdir()
    (root / "sub").mkdir()
    for i in range(5):
        (root / ("sub" if i % 2 else "") / f"img{i}.jpg").write_bytes(jpeg(rgb(i, 40, 30)))
        (root / ("sub" if i % 2 else "") / f"img{i}.txt").write_text(f"caption {i}\n")
    (root / "big.png").write_bytes(png(rgb(9, 80, 60)))
    (root / "big.txt").write_text("a big one")
    (root / "nocap.jpg").write_bytes(jpeg(rgb(7)))                 # no sidecar: skipped
    (root / "broken.jpg").write_bytes(b"not an image")             # unreadable: skipped
    (root / "broken.txt").write_text("broken")


def test_write_from_folder_img2dataset_layout(tmp_path):
    make_folder(tmp_path / "src")
    out = tmp_path / "out"
    summary = write_from_source(tmp_path / "src", out, shard_size=4)
    assert summary["samples"] == 6 and summary["shards"] == 2
    assert summary["skipped"] == {"missing_caption": 1, "unreadable_image": 1}
    for stem in ("00000", "00001"):
        assert (out / f"{stem}.tar").is_file()
        table = pq.read_table(out / f"{stem}.parquet")
        assert {"url", "caption", "key", "status", "width", "height", "original_width",
                "original_height"} <= set(table.column_names)
        stats = json.loads((out / f"{stem}_stats.json").read_text())
        assert stats["successes"] == table.num_rows
    with tarfile.open(out / "00000.tar") as t:
        names = t.getnames()
        meta = json.loads(t.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert len(names) == 12 and {n.split(".", 1)[1] for n in names} >= {"jpg", "txt", "json"}
    assert meta["status"] == "success" and meta["width"] == 80 and meta["original_height"] == 60
    cfg = DataConfig(urls=[str(out)], image_size=16, num_workers=0)
    captions = sorted(c for b in build_eval_loader(cfg, cfg.urls, rank=0, world_size=1, batch_size=4)
                      for c in b["caption"])
    assert captions == ["a big one"] + [f"caption {i}" for i in range(5)]


def test_write_from_csv_and_parquet_with_resize_and_max_bytes(tmp_path):
    make_folder(tmp_path / "src")
    rows = [{"path": f"src/img{i}.jpg" if i % 2 == 0 else f"src/sub/img{i}.jpg", "caption": f"row {i}"}
            for i in range(5)] + [{"path": "src/big.png", "caption": "big"}]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    a = write_from_source(tmp_path / "list.csv", tmp_path / "a", shard_size=100, resize=20)
    b = write_from_source(tmp_path / "list.parquet", tmp_path / "b", shard_size=100, max_shard_bytes=3000)
    assert a["samples"] == b["samples"] == 6
    assert a["shards"] == 1 and b["shards"] > 1
    with tarfile.open(tmp_path / "a" / "00000.tar") as t:
        metas = [json.loads(t.extractfile(n).read()) for n in t.getnames() if n.endswith(".json")]
    big = [m for m in metas if m["caption"] == "big"][0]
    assert (big["width"], big["height"], big["original_width"]) == (27, 20, 80)


def test_cli_synth_and_inspect_json(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--num", "10", "--size", "16", "--shard-size", "4", "--seed", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out / "{00000..00002}.tar"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 10 and report["bad"] == {} and report["bad_total"] == 0 and report["shards"] == 3
    assert report["image_width"]["max"] == 16 and report["caption_words"]["min"] == 7


def test_cli_inspect_counts_faults(faulty_shards, capsys, monkeypatch):
    from data_pipeline.shards import ReadPolicy

    # the failing pipe is retried as in training, without the backoff waits (1 + 2 + 4 s)
    monkeypatch.setattr(ReadPolicy, "from_config", classmethod(
        lambda cls, cfg: cls(retries=cfg.shard_retries, backoff_s=0.0, timeout_s=cfg.shard_timeout_s)))
    assert main(["data", "inspect", *faulty_shards["urls"], "--json", "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == len(faulty_shards["good_keys"])
    assert report["bad"] == faulty_shards["bad"]
    assert report["bad_total"] == sum(faulty_shards["bad"].values())
    assert report["shards"] == len(faulty_shards["urls"])
    assert report["bad_shards"] == 4 and report["retries"] == 3   # the failing pipe: 3 retries; a missing file: none
    assert report["formats"]["png"] >= 4 and report["formats"]["webp"] == 1
    assert main(["data", "inspect", faulty_shards["urls"][0]]) == 0
    assert "good samples" in capsys.readouterr().out
