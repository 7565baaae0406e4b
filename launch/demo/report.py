"""The demo's report: OUT/report.md and OUT/report.json, loss curves as PNG, and the README block."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from launch.runtime.lockfile import warn_if_drifted
from launch.runtime.metrics import read_metrics

README_START, README_END = "<!-- demo:start -->", "<!-- demo:end -->"
VERSIONED = ("torch", "diffusers", "deepspeed", "open_clip_torch")   # what the figures depend on most


def running_versions() -> dict:
    import importlib.metadata as metadata
    return {name: metadata.version(name) for name in VERSIONED}


def loss_curves(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, run, keys, title in [(axes[0], "autoencoder", ("l1",), "stage one: L1 reconstruction"),
                                 (axes[1], "diffusion", ("loss",), "stage two: flow-matching loss")]:
        records = read_metrics(out / "runs" / run / "metrics.jsonl")
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=f"train {key}")
        val_key = "val/psnr" if run == "autoencoder" else "val/val_loss"
        vals = [(r["step"], r[val_key]) for r in records if isinstance(r.get(val_key), (int, float))]
        if vals and run == "diffusion":
            ax.plot(*zip(*vals), "o-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _sampling(out: Path) -> Optional[dict]:
    """The settings the scored samples were drawn with (samples/scored/sampling.json), if any."""
    path = out / "samples" / "scored" / "sampling.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return {k: d.get(k) for k in ("sampler", "steps", "cfg_scale", "guidance_interval")}


def _describe_sampling(d: Optional[dict]) -> str:
    if not d:
        return "sampler settings not recorded"
    text = f"{d['sampler']}, {d['steps']} steps, CFG {d['cfg_scale']:g}"
    if d.get("guidance_interval"):
        lo, hi = d["guidance_interval"]
        text += f" for unit time in [{lo:g}, {hi:g}] (1 = noise), none below"
    return text


def write_report(out: Path, timings: dict, *, counts: dict, recon: dict, adherence: dict, ae_config: dict,
                 holdout: list[str], settings: dict) -> dict:
    curves = loss_curves(out)
    recon_grids = sorted((out / "runs" / "autoencoder" / "samples").glob("*.png"))
    compute = sum(t["seconds"] for k, t in timings.items() if not t.get("reused"))
    total = sum(t["seconds"] for t in timings.values())
    acc, held, rest = adherence["accuracy"], adherence.get("held_out", {}), adherence.get("rest", {})
    summary = {
        "images": counts, "holdout_triples": holdout,
        "recon_psnr_holdout": recon["holdout"]["psnr"], "recon_ssim_holdout": recon["holdout"].get("ssim"),
        "recon_psnr_val": recon["val"]["psnr"],
        "scaling_factor": ae_config.get("scaling_factor"), "shift_factor": ae_config.get("shift_factor"),
        "adherence": {"n": adherence["n"], **{k: acc[k] for k in ("color", "shape", "background", "all")}},
        "adherence_held_out": {"n": held.get("n"), **(held.get("accuracy") or {})},
        "adherence_rest": {"n": rest.get("n"), **(rest.get("accuracy") or {})},
        "sampling": _sampling(out),
        "timings_s": {k: t["seconds"] for k, t in timings.items()},
        "reused": sorted(k for k, t in timings.items() if t.get("reused")),
        "seconds_this_run": round(compute, 1), "seconds_all_phases": round(total, 1),
        "versions": running_versions(),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# ldm demo report", "",
        f"Synthetic captioned shapes at {settings['image_size']} px: {counts['train']} training images "
        f"(without the held-out triples {', '.join(holdout)}), {counts['val']} validation and "
        f"{counts['holdout']} held-out images." + (
            f" Stage one also trains on {counts['color_sweep']} shapes in random RGB colours (no colour in "
            "their captions, never seen by stage two), so the autoencoder can draw colours outside the "
            "palette." if counts.get("color_sweep") else ""), "",
        "## Samples (EMA weights, classifier-free guidance)", "",
        "Four samples per prompt, one prompt per row (see `samples/grid/prompts.json`); the first three "
        f"prompts are held-out triples the denoiser never saw. Sampling: {_describe_sampling(summary['sampling'])}.",
        "",
        "![samples](samples/grid.png)", "",
        "## Stage one: autoencoder", "",
        f"- reconstruction PSNR on held-out images: **{recon['holdout']['psnr']:.2f} dB** "
        f"(SSIM {recon['holdout'].get('ssim', float('nan')):.4f}); validation images: "
        f"{recon['val']['psnr']:.2f} dB",
        f"- latent scaling_factor {ae_config.get('scaling_factor'):.4f}, shift_factor "
        f"{ae_config.get('shift_factor'):.4f}", "",
    ]
    if recon_grids:
        rel = recon_grids[-1].relative_to(out)
        lines += [f"Inputs and reconstructions (left / right): ![reconstructions]({rel})", ""]
    lines += [
        "## Stage two: prompt adherence", "",
        "Color, shape and background judged from the pixels of each sample "
        f"({adherence['n']} samples, every color-shape-background triple).", "",
        "| set | n | color | shape | background | all three |", "| --- | --- | --- | --- | --- | --- |",
        f"| all | {adherence['n']} | {_pct(acc['color'])} | {_pct(acc['shape'])} | {_pct(acc['background'])} | "
        f"{_pct(acc['all'])} |",
    ]
    for name, part in (("held-out triples", held), ("seen triples", rest)):
        if part:
            a = part["accuracy"]
            lines.append(f"| {name} | {part['n']} | {_pct(a['color'])} | {_pct(a['shape'])} | "
                         f"{_pct(a['background'])} | {_pct(a['all'])} |")
    lines += ["", "## Loss curves", "", f"![loss curves]({curves.relative_to(out)})", "",
              "## Timings", "", "| phase | seconds | |", "| --- | --- | --- |"]
    for k, t in timings.items():
        lines.append(f"| {k} | {t['seconds']:.1f} | {'reused from an earlier run' if t.get('reused') else ''} |")
    lines += ["", f"Compute in this run: {compute:.0f} s; all phases as first run: {total:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def update_readme(out: Path, readme: Path, assets: Path) -> None:
    """Copy the grid and curves next to the README and rewrite its demo block from report.json."""
    summary = json.loads((out / "report.json").read_text())
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "samples" / "grid.png", assets / "demo_grid.png")
    shutil.copy(out / "loss_curves.png", assets / "demo_loss_curves.png")
    rel = assets.relative_to(readme.parent)
    a, h, r = summary["adherence"], summary["adherence_held_out"], summary["adherence_rest"]
    versions = summary.get("versions") or {}
    drifted = warn_if_drifted(versions) if versions else ["this report.json records no package versions"]
    for w in drifted:
        print(f"warning: ldm demo --readme: {w}")
    measured = ", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown versions"
    block = "\n".join([
        README_START,
        "_Generated by `ldm demo --readme` from its report.json; do not edit by hand._", "",
        f"![demo samples]({rel}/demo_grid.png)", "",
        f"- Stage one reconstruction PSNR on held-out images: **{summary['recon_psnr_holdout']:.2f} dB**",
        f"- Prompt adherence over {a['n']} samples: color **{_pct(a['color'])}**, shape **{_pct(a['shape'])}**, "
        f"background **{_pct(a['background'])}** ({_describe_sampling(summary.get('sampling'))})",
        f"- Held-out triples ({h['n']} samples): color {_pct(h.get('color'))}, shape {_pct(h.get('shape'))}, "
        f"background {_pct(h.get('background'))}; seen triples: color {_pct(r.get('color'))}, "
        f"shape {_pct(r.get('shape'))}, background {_pct(r.get('background'))}",
        f"- Compute: {summary['seconds_all_phases']:.0f} s for all phases "
        f"(stage one {summary['timings_s'].get('stage1', 0):.0f} s, stage two "
        f"{summary['timings_s'].get('stage2', 0):.0f} s)",
        "- What the demo aims at: PSNR >= 30 dB; color and background >= 98 %, shape >= 95 %, held-out triples "
        "within 5 points of the seen ones; <= 10 minutes of compute on 2 CPU cores",
        f"- Measured with {measured}" + ("" if drifted else " (the versions of requirements/cpu.lock)"),
        *[f"  - **Not the locked versions:** {w}" for w in drifted], "",
        f"![loss curves]({rel}/demo_loss_curves.png)",
        *_finetune_lines(out, assets, rel),
        README_END])
    text = readme.read_text()
    if README_START in text:
        text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def _finetune_lines(out: Path, assets: Path, rel: Path) -> list[str]:
    """The `ldm demo --finetune` lines of the README block, when that phase group ran (finetune/report.json)."""
    path = out / "finetune" / "report.json"
    if not path.is_file():
        return []
    ft = json.loads(path.read_text())
    for when in ("before", "after"):
        shutil.copy(out / "finetune" / "samples" / when / "grid.png", assets / f"demo_finetune_{when}.png")
    b, a, o = ft["new_color_before"], ft["new_color_after"], ft["old_colors_after"]
    s = ft["settings"]
    return [
        "", f"Fine-tuning a color the model never saw (`ldm demo --finetune`): LoRA rank {s['rank']}, "
        f"{s['steps']} steps from the export, {ft['train_seconds']:.0f} s of training:", "",
        f"- {ft['color']} prompts ({a['n']} samples): color **{_pct(b['color'])} -> {_pct(a['color'])}** "
        f"(all three attributes {_pct(b['all'])} -> {_pct(a['all'])})",
        f"- the eight old colors after it ({o['n']} samples): color {_pct(o['color'])}, shape "
        f"{_pct(o['shape'])}, background {_pct(o['background'])}",
        "- What it aims at: the new color from near 0 to >= 90 %, the old ones stay >= 95 %, <= 3 minutes", "",
        "| before | after |", "| --- | --- |",
        f"| ![before]({rel}/demo_finetune_before.png) | ![after]({rel}/demo_finetune_after.png) |",
    ]
