"""Where numbers go: `RUN_DIR/metrics.jsonl` always, wandb when configured (offline by default)."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

_SECRET = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def scrub_secrets(tree: Any) -> Any:
    """Drop any key that looks like a credential, at any depth (never log a secret)."""
    if isinstance(tree, dict):
        return {k: scrub_secrets(v) for k, v in tree.items() if not _SECRET.search(str(k))}
    if isinstance(tree, list):
        return [scrub_secrets(v) for v in tree]
    return tree


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    """Append-only JSON lines, one object per logged step, flushed on every write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def truncate_after(path: str | Path, step: int) -> int:
        """Keep only records with `step <= step` (a resumed run re-logs what came after its
        checkpoint, so each step appears once). Atomic rewrite; returns the records dropped."""
        path = Path(path)
        if not path.exists():
            return 0
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a kill
                dropped += 1
                continue
            if int(rec.get("step", -1)) <= step:
                kept.append(line)
            else:
                dropped += 1
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        return dropped


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class WandbLogger:
    """Thin wrapper: offline unless WANDB_MODE / WANDB_API_KEY say otherwise; resumes the same run."""

    def __init__(self, run_dir: str | Path, project: str, entity: str | None, name: str | None,
                 config: dict):
        import wandb

        run_dir = Path(run_dir)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self._run = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow",
                               dir=str(run_dir), mode=mode, config=scrub_secrets(config))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        self._run.log({k: _jsonable(v) for k, v in record.items() if k != "step"}, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import wandb

        self._run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        self._run.finish()


def data_counters(train_data) -> dict[str, int]:
    """The loader's cumulative counters, flat for one all-reduce: bad samples by reason (`bad/<reason>`), shards
    read, shards skipped after their retries, and read retries."""
    if hasattr(train_data, "counts"):
        c = train_data.counts()
        return {**{f"bad/{k}": v for k, v in c.get("bad", {}).items()},
                **{k: int(c.get(k, 0)) for k in ("shards", "bad_shards", "retries")}}
    if hasattr(train_data, "fault_counts"):
        return {f"bad/{k}": v for k, v in train_data.fault_counts().items()}
    return {}


def data_record(summed: Mapping[str, int]) -> dict[str, int]:
    """metrics.jsonl keys from the all-rank sums of `data_counters`: data/bad/<reason>, data/bad_total (when
    any), data/shards_read, data/bad_shards, data/retries."""
    record = {f"data/{k}": v for k, v in sorted(summed.items()) if k.startswith("bad/")}
    if record:
        record["data/bad_total"] = sum(record.values())
    if "shards" in summed:
        record.update({"data/shards_read": summed["shards"], "data/bad_shards": summed.get("bad_shards", 0),
                       "data/retries": summed.get("retries", 0)})
    return record
