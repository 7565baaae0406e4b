"""metrics.jsonl bookkeeping and wandb in offline mode without leaking secrets."""
from __future__ import annotations

import json

from launch.runtime.metrics import MetricsWriter, WandbLogger, read_metrics, scrub_secrets


def test_truncate_after_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for step in range(1, 8):
        w.write({"step": step, "loss": 1.0 / step, "nan": float("nan")})
    w.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "loss"')          # a line torn by kill -9
    assert MetricsWriter.truncate_after(path, 5) == 3
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["nan"] == "nan"


def test_scrub_secrets_at_any_depth():
    tree = {"a": 1, "wandb_api_key": "x", "nested": {"HF_TOKEN": "y", "ok": [{"password": 1, "keep": 2}]}}
    assert scrub_secrets(tree) == {"a": 1, "nested": {"ok": [{"keep": 2}]}}


def test_wandb_offline_never_writes_the_api_key(tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", secret)
    logger = WandbLogger(tmp_path, project="t", entity=None, name="run",
                         config={"train": {"max_steps": 3}, "wandb_api_key": secret})
    logger.log({"step": 1, "loss": 0.5}, step=1)
    logger.finish()
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert files, "offline wandb wrote its run under RUN_DIR/wandb"
    for p in files:
        assert secret.encode() not in p.read_bytes(), f"secret leaked into {p}"
    assert (tmp_path / "wandb_run_id").read_text()
    config_files = [p for p in files if p.name == "config.yaml"]
    if config_files:
        assert "max_steps" in config_files[0].read_text()
