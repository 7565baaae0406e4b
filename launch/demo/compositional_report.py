"""The report of `ldm demo --tier compositional`: OUT/report.md, OUT/report.json and its README block."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from data_pipeline.compositional import TASKS
from launch.runtime.lockfile import warn_if_drifted

from .report import _describe_sampling, _pct, _sampling, loss_curves, running_versions

README_START, README_END = "<!-- demo-compositional:start -->", "<!-- demo-compositional:end -->"
AIMS = "overall >= 80 %, held-out compositions within 10 points of the seen ones, <= 20 minutes on 2 CPU cores"


def _row(name: str, part: dict) -> str:
    cells = " | ".join(_pct(part["tasks"][t]["accuracy"]) for t in TASKS)
    return f"| {name} | {part['n']} | {cells} | **{_pct(part['overall'])}** |"


def write_report(out: Path, timings: dict, *, counts: dict, recon: dict, judged: dict, ae_config: dict,
                 settings, text_tower: str, holdout: list[str] | None = None) -> dict:
    """holdout: the held-out items, as HoldOut.items() lists them (default: the tier's default set)."""
    from data_pipeline.compositional import HoldOut

    holdout = HoldOut.parse(["default"]).items() if holdout is None else holdout
    curves = loss_curves(out)
    compute = sum(t["seconds"] for t in timings.values() if not t.get("reused"))
    total = sum(t["seconds"] for t in timings.values())
    parts = {k: judged[k] for k in ("all", "seen", "held_out")}
    summary = {
        "tier": "compositional", "images": counts, "image_size": settings.image_size,
        "holdout": holdout, "text_tower": text_tower,
        "recon_psnr_holdout": recon["holdout"]["psnr"], "recon_psnr_val": recon["val"]["psnr"],
        "scaling_factor": ae_config.get("scaling_factor"),
        "scores": {k: {"n": p["n"], "overall": p["overall"],
                       **{t: p["tasks"][t]["accuracy"] for t in TASKS},
                       "background": p["checks"]["background"]["accuracy"]} for k, p in parts.items()},
        "sampling": _sampling(out),
        "timings_s": {k: t["seconds"] for k, t in timings.items()},
        "reused": sorted(k for k, t in timings.items() if t.get("reused")),
        "seconds_this_run": round(compute, 1), "seconds_all_phases": round(total, 1),
        "versions": running_versions(),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    head = "| set | n | " + " | ".join(TASKS) + " | overall |"
    lines = [
        "# ldm demo report: compositional tier", "",
        f"One to three objects per image at {settings.image_size} px, captions from a small grammar (single "
        f"object, two objects, counting, relative position): {counts['train']} training images without the "
        f"held-out items ({', '.join(summary['holdout'])}), {counts['val']} validation and {counts['holdout']} "
        "held-out images.", "",
        f"Text conditioning: {text_tower}.", "",
        "## Samples (EMA weights, classifier-free guidance)", "",
        "Four samples per prompt, one prompt per row (`samples/grid/prompts.json`); the first three rows hold "
        f"held-out items. Sampling: {_describe_sampling(summary['sampling'])}.", "",
        "![samples](samples/grid.png)", "",
        "## GenEval-style scores, judged from the pixels", "",
        "One sample per caption; captions are fresh draws of the grammar (seen: training compositions in new "
        "layouts; held-out: each contains a held-out pairing or arrangement).", "",
        head, "| --- " * (len(TASKS) + 3) + "|",
        *[_row(name, parts[k]) for name, k in (("all", "all"), ("seen", "seen"), ("held-out", "held_out"))
          if parts[k]["n"]],
        "", f"Background colour right: {_pct(parts['all']['checks']['background']['accuracy'])}. Aims: {AIMS}.", "",
        "## Stage one", "",
        f"Reconstruction PSNR on held-out images **{recon['holdout']['psnr']:.2f} dB** (validation "
        f"{recon['val']['psnr']:.2f} dB), latent scaling_factor {ae_config.get('scaling_factor'):.4f}.", "",
        "## Loss curves", "", f"![loss curves]({curves.relative_to(out)})", "",
        "## Timings", "", "| phase | seconds | |", "| --- | --- | --- |",
        *[f"| {k} | {t['seconds']:.1f} | {'reused from an earlier run' if t.get('reused') else ''} |"
          for k, t in timings.items()],
        "", f"Compute in this run: {compute:.0f} s; all phases as first run: {total:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def update_readme(out: Path, readme: Path, assets: Path) -> None:
    """Copy the grid next to the README and rewrite its compositional block from report.json."""
    summary = json.loads((out / "report.json").read_text())
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "samples" / "grid.png", assets / "demo_compositional_grid.png")
    rel = assets.relative_to(readme.parent)
    versions = summary.get("versions") or {}
    drifted = warn_if_drifted(versions) if versions else ["this report.json records no package versions"]
    for w in drifted:
        print(f"warning: ldm demo --readme: {w}")
    scores = summary["scores"]
    table = ["| set | n | " + " | ".join(TASKS) + " | overall |", "| --- " * (len(TASKS) + 3) + "|"]
    for name, k in (("all", "all"), ("seen", "seen"), ("held-out", "held_out")):
        s = scores[k]
        if s["n"]:
            table.append(f"| {name} | {s['n']} | " + " | ".join(_pct(s[t]) for t in TASKS)
                         + f" | **{_pct(s['overall'])}** |")
    t = summary["timings_s"]
    block = "\n".join([
        README_START,
        "_Generated by `ldm demo --tier compositional --readme` from its report.json; do not edit by hand._", "",
        f"![compositional samples]({rel}/demo_compositional_grid.png)", "",
        *table, "",
        f"- {summary['image_size']} px, {summary['images']['train']} training images; held out of training: "
        f"{', '.join(summary['holdout'])}; text: {summary['text_tower']}",
        f"- Sampling: {_describe_sampling(summary.get('sampling'))}; stage one PSNR on held-out images "
        f"{summary['recon_psnr_holdout']:.2f} dB",
        f"- Compute: {summary['seconds_all_phases']:.0f} s for all phases (stage one {t.get('stage1', 0):.0f} s, "
        f"stage two {t.get('stage2', 0):.0f} s)",
        f"- What it aims at: {AIMS}",
        "- Measured with " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown versions")
        + ("" if drifted else " (the versions of requirements/cpu.lock)"),
        *[f"  - **Not the locked versions:** {w}" for w in drifted],
        README_END])
    text = readme.read_text()
    if README_START in text:
        text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
