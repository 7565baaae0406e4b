"""One self-contained HTML page describing a run directory (ARCHITECTURE.md §4), readable from disk with no
server and no network: plots are matplotlib PNGs embedded as base64, sample grids are embedded the same way.

Sections (each a `<section id=...>`, the ids in `SECTIONS`): summary (status, step, ETA), loss (training and
validation, live and EMA), val_per_t (the fixed-t validation losses per unit time at the newest evaluation
and over steps), lr, throughput (img/s), grad_norm, nonfinite (skipped steps), data_faults (by reason),
samples (RUN_DIR/samples/*.png by step), config (the resolved config and its diff against the config of the
oldest checkpoint, i.e. what changed on resume), checkpoints. This room reads files only; it imports no
other room, so the runtime may call `write_report` at each checkpoint.
"""
from __future__ import annotations

import base64
import difflib
import html
import io
import json
import re
import time
from pathlib import Path
from typing import Any

SECTIONS = ("summary", "loss", "val_per_t", "lr", "throughput", "grad_norm", "nonfinite", "data_faults",
            "samples", "config", "checkpoints")


def read_metrics(run_dir: Path) -> list[dict]:
    out = []
    p = run_dir / "metrics.jsonl"
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue        # a line being written
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if key in r and isinstance(r[key], (int, float)):
            xs.append(int(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plot(records, keys: list[str], title: str, ylabel: str, logy: bool = False) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = [(k, *series(records, k)) for k in keys]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return "<p class=none>not logged in this run</p>"
    fig, ax = plt.subplots(figsize=(7, 3))
    for k, xs, ys in drawn:
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy and all(y > 0 for _, _, ys in drawn for y in ys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(drawn) > 1:
        ax.legend(fontsize=7)
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{_png(fig)}">'


def _per_t(records) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({k for r in records for k in r if re.fullmatch(r"val(_ema)?/val_loss_u[0-9.]+", k)})
    if not keys:
        return "<p class=none>no fixed-t validation in this run</p>"
    last = [r for r in records if any(k in r for k in keys)][-1]
    first = [r for r in records if any(k in r for k in keys)][0]
    fig, ax = plt.subplots(figsize=(7, 3))
    for prefix in ("val/", "val_ema/"):
        ks = [k for k in keys if k.startswith(prefix)]
        us = [float(k.rsplit("_u", 1)[1]) for k in ks]
        if ks:
            ax.plot(us, [last[k] for k in ks if k in last], marker="o", label=f"{prefix} step {last['step']}")
            if first is not last and prefix == "val/":
                ax.plot(us, [first[k] for k in ks if k in first], marker="x", ls="--",
                        label=f"{prefix} step {first['step']}")
    ax.set_xlabel("unit time u (1 = pure noise)")
    ax.set_ylabel("loss")
    ax.set_title("validation loss per timestep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    img = f'<img alt="per-t validation" src="data:image/png;base64,{_png(fig)}">'
    return img + _plot(records, [k for k in keys if k.startswith("val/")], "per-t validation over steps", "loss")


def _faults(records) -> str:
    keys = sorted({k for r in records for k in r if k.startswith("data/bad/")})
    if not keys:
        return "<p>no broken samples counted</p>"
    last = {k: max((r[k] for r in records if k in r), default=0) for k in keys}
    rows = "".join(f"<tr><td>{html.escape(k[len('data/bad/'):])}</td><td>{v}</td></tr>" for k, v in last.items())
    return f"<table><tr><th>reason</th><th>count</th></tr>{rows}</table>" + _plot(records, keys, "data faults", "count")


def _samples(run_dir: Path) -> str:
    files = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    if not files:
        return "<p class=none>no sample grids yet</p>"
    return "".join(f'<figure><img alt="{html.escape(f.name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(f.read_bytes()).decode()}"><figcaption>{html.escape(f.name)}</figcaption></figure>'
                   for f in files)


def _checkpoint_tags(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(d for d in root.glob("step_*") if d.is_dir()) if root.is_dir() else []


def _config(run_dir: Path) -> str:
    p = run_dir / "config.yaml"
    text = p.read_text() if p.is_file() else ""
    out = f"<pre>{html.escape(text) or 'no config.yaml'}</pre>"
    first = None
    for d in _checkpoint_tags(run_dir):
        try:
            first = json.loads((d / "meta.json").read_text()).get("config")
            break
        except (OSError, json.JSONDecodeError):
            continue
    if first is not None and text:
        import yaml
        old = yaml.safe_dump(first, sort_keys=True).splitlines()
        new = yaml.safe_dump(yaml.safe_load(text), sort_keys=True).splitlines()
        diff = list(difflib.unified_diff(old, new, "oldest checkpoint", "config.yaml", lineterm="", n=1))
        out = (f"<h3>diff against the oldest checkpoint's config</h3><pre class=diff>"
               f"{html.escape(chr(10).join(diff)) if diff else 'no change since the first checkpoint'}</pre>") + out
    return out


def _checkpoints(run_dir: Path) -> str:
    tags = _checkpoint_tags(run_dir)
    if not tags:
        return "<p class=none>no checkpoints yet</p>"
    latest = (run_dir / "checkpoints" / "latest")
    latest = latest.read_text().strip() if latest.is_file() else ""
    rows = []
    for d in tags:
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        rows.append(f"<tr><td>{d.name}{' (latest)' if d.name == latest else ''}</td>"
                    f"<td>{'yes' if (d / 'COMPLETE').exists() else 'no'}</td><td>{size / 2**20:.2f}</td>"
                    f"<td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(d.stat().st_mtime))}</td></tr>")
    return "<table><tr><th>tag</th><th>complete</th><th>MiB</th><th>written (UTC)</th></tr>" + "".join(rows) + "</table>"


def summary(run_dir: Path, records: list[dict]) -> dict[str, Any]:
    """Status, step, max_steps, throughput and ETA (seconds, from the last logged img/s)."""
    train = [r for r in records if "loss" in r]
    step = max((int(r["step"]) for r in records), default=0)
    max_steps = None
    try:
        import yaml
        max_steps = int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"])
    except Exception:
        pass
    status = None
    if (run_dir / "result.json").is_file():
        try:
            status = json.loads((run_dir / "result.json").read_text()).get("status")
        except json.JSONDecodeError:
            pass
    eta = None
    if max_steps and len(train) >= 1 and train[-1].get("img_per_s") and len(train) >= 2:
        a, b = train[-2], train[-1]
        per_step = (b["samples_seen"] - a["samples_seen"]) / max(b["step"] - a["step"], 1) if "samples_seen" in b else 0
        if per_step:
            eta = max(max_steps - step, 0) * per_step / b["img_per_s"]
    return {"status": status or "running", "step": step, "max_steps": max_steps, "eta_s": eta,
            "last_loss": train[-1]["loss"] if train else None}


def render(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    s = summary(run_dir, records)
    eta = "-" if s["eta_s"] is None else time.strftime("%H:%M:%S", time.gmtime(s["eta_s"]))
    body = {
        "summary": (f"<table><tr><th>run</th><td>{html.escape(str(run_dir))}</td></tr>"
                    f"<tr><th>status</th><td>{s['status']}</td></tr>"
                    f"<tr><th>step</th><td>{s['step']} / {s['max_steps']}</td></tr>"
                    f"<tr><th>last loss</th><td>{s['last_loss']}</td></tr>"
                    f"<tr><th>ETA</th><td>{eta}</td></tr>"
                    f"<tr><th>rendered (UTC)</th><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}</td></tr></table>"),
        "loss": _plot(records, ["loss", "val/val_loss", "val_ema/val_loss"], "training and validation loss", "loss", True),
        "val_per_t": _per_t(records),
        "lr": _plot(records, ["lr"], "learning rate", "lr"),
        "throughput": _plot(records, ["img_per_s"], "throughput", "img/s"),
        "grad_norm": _plot(records, ["grad_norm"], "gradient norm", "norm", True),
        "nonfinite": _plot(records, ["nonfinite_skipped"], "non-finite steps skipped (cumulative)", "steps"),
        "data_faults": _faults(records),
        "samples": _samples(run_dir),
        "config": _config(run_dir),
        "checkpoints": _checkpoints(run_dir),
    }
    titles = {"summary": "Summary", "loss": "Loss", "val_per_t": "Validation loss per timestep",
              "lr": "Learning rate", "throughput": "Throughput", "grad_norm": "Gradient norm",
              "nonfinite": "Non-finite skips", "data_faults": "Data faults by reason",
              "samples": "Sample grids over steps", "config": "Resolved config", "checkpoints": "Checkpoints"}
    nav = " | ".join(f'<a href="#{k}">{titles[k]}</a>' for k in SECTIONS)
    sections = "\n".join(f'<section id="{k}"><h2>{titles[k]}</h2>{body[k]}</section>' for k in SECTIONS)
    style = ("body{font-family:sans-serif;margin:1em 2em;background:#fff;color:#222}section{border-top:1px solid #ccc;"
             "padding:.5em 0}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}"
             "pre{background:#f6f6f6;padding:.5em;max-height:30em;overflow:auto;font-size:11px}figure{display:inline-block;"
             "margin:4px}figure img{image-rendering:pixelated;width:256px}.none{color:#888}")
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>ldm run report: {html.escape(run_dir.name)}</title>"
            f"<style>{style}</style></head><body><h1>Run report: {html.escape(run_dir.name)}</h1><nav>{nav}</nav>"
            f"{sections}</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render and write atomically (RUN_DIR/report.html by default)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(run_dir))
    tmp.replace(out)
    return out


def write_report_safely(run_dir, log) -> None:
    """The runtime's call: a failure to render is a warning, never a stop."""
    try:
        write_report(run_dir)
    except Exception as e:   # noqa: BLE001 - the report must never stop training
        log(f"warning: run report not written ({type(e).__name__}: {e})")
