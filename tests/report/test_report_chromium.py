"""`ldm report` renders in a real headless Chromium: a screenshot that is not blank, every section present
in the DOM Chromium built, and nothing fetched (all images are data: URIs). `make test` installs chromium
(Makefile target `chromium`); without it this test fails rather than skips."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from launch.report.html import SECTIONS, render, summary, write_report


def fake_run(root: Path) -> Path:
    """A run directory with the record shapes a real run writes (launch/runtime/train.py _log_step, _validate)."""
    run = root / "run"
    (run / "samples").mkdir(parents=True)
    us = [(k + 0.5) / 8 for k in range(8)]
    lines = []
    for step in range(0, 101, 10):
        if step:
            rec = {"step": step, "loss": 3.0 / (1 + step / 20), "lr": 1e-3 * min(1, step / 30),
                   "img_per_s": 600.0 + step, "samples_seen": step * 16, "nonfinite_skipped": int(step >= 60),
                   "grad_norm": 2.0 / (1 + step / 50), "steps_applied/denoiser": step}
            if step >= 50:
                rec.update({"data/bad/decode_error": step // 50, "data/bad_total": step // 50})
            lines.append(rec)
        if step % 50 == 0:
            v = {"step": step}
            for pre, f in (("val/", 1.0), ("val_ema/", 0.95)):
                per = [f * (1 + u) * 3 / (1 + step / 25) for u in us]
                v.update({f"{pre}val_loss_u{u:g}": x for u, x in zip(us, per)})
                v[f"{pre}val_loss"] = sum(per) / 8
            lines.append(v)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "config.yaml").write_text("stage: ldm\ntrain:\n  max_steps: 200\n  lr: 0.001\n")
    rng = np.random.default_rng(0)
    for step in (50, 100):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(run / "samples" / f"step_{step:08d}.png")
    for step in (50, 100):
        tag = run / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text("")
        (tag / "meta.json").write_text(json.dumps({"config": {"stage": "ldm", "train": {"max_steps": 100, "lr": 0.001}}}))
    (run / "checkpoints" / "latest").write_text("step_00000100")
    return run


def test_report_content(tmp_path):
    run = fake_run(tmp_path)
    page = render(run)
    for s in SECTIONS:
        assert f'<section id="{s}">' in page
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 10
    assert "-  max_steps: 100" in page and "+  max_steps: 200" in page      # the diff on resume
    assert "decode_error" in page and "step_00000100 (latest)" in page
    s = summary(run, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()])
    # 100 steps left at 16 img/step and 700 img/s
    assert s["step"] == 100 and abs(s["eta_s"] - 100 * 16 / 700) < 1e-9


def render_in_chromium(page: Path, workdir: Path) -> tuple[np.ndarray, str]:
    """(grey screenshot pixels at 1200 x 3000, the DOM Chromium built) of an HTML file, headless, offline."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: run `make chromium` (as root: apt-get install -y chromium)"
    shot = workdir / "shot.png"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={workdir / 'profile'}"]
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,3000", page.resolve().as_uri()],
                   check=True, timeout=120, capture_output=True)
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    dom = subprocess.run(flags + ["--dump-dom", page.resolve().as_uri()], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    return px, dom


def test_report_in_headless_chromium(tmp_path):
    out = write_report(fake_run(tmp_path))
    px, dom = render_in_chromium(out, tmp_path)
    assert px.shape == (3000, 1200)
    assert px.std() > 20, f"screenshot looks blank (pixel std {px.std():.2f})"
    ids = set(re.findall(r'<section id="([a-z_]+)"', dom))
    assert ids == set(SECTIONS)
    assert dom.count("<img") == 10      # 8 plots (per t: two) + 2 sample grids, all data: URIs
    assert "src=\"data:image/png;base64," in dom
