"""`ldm demo --finetune`: teach the finished demo model a color it has never seen, with LoRA.

The base demo trains on eight colors (data_pipeline/palette.py COLORS); NEW_COLORS holds one more (pink)
that no base image or caption contains. This phase group starts from the base export (`init.from`),
trains rank-`rank` adapters (peft, the runtime's `lora` section) on shapes in that color mixed with replayed
images of the old colors (without replay the adapters are free to move the old colors too), exports the
merged weights and judges samples before and after with the judge's palette widened to the new color.

Phases, reused by a second run like the base demo's:
  ft_data        shards: the new color (every shape on every old background) + replay of the old data
  ft_precompute  their latents and text embeddings (the base autoencoder and text tower)
  ft_before      samples of the new color's prompts from the base export, judged
  ft_train       `ldm train` with lora.rank and init.from = the base export
  ft_export      the merged export (`--merge-lora`): OUT/finetune/export/
  ft_after       the same new-color prompts, and every old triple once, from the merged export, judged
  ft_report      OUT/finetune/report.md, and its section in OUT/report.md (grids before / after)
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .run import DemoSettings, Phases, _fingerprint, _shards, _train

REPORT_START = "<!-- finetune:start -->"
REPORT_END = "<!-- finetune:end -->"


@dataclass
class FinetuneSettings:
    color: str = "pink"
    images: int = 2000            # of the new color: 24 triples x ~83
    replay_images: int = 2000     # of the old colors, drawn as the base training set (held-out triples excluded)
    steps: int = 700
    rank: int = 8
    lr: float = 1.0e-2            # adapters start at zero: 2e-3 moved pink from 1 % to only 23 % in 400 steps
    samples_per_triple: int = 4   # 24 new-color triples x 4 = 96 images judged before and after
    old_samples_per_triple: int = 1


def _triples(color: str) -> list[tuple[str, str, str]]:
    from data_pipeline.palette import COLORS, SHAPES

    return [(color, shape, bg) for shape in SHAPES for bg in COLORS]


def _prompt(t: tuple[str, str, str]) -> str:
    return f"a {t[0]} {t[1]} on a {t[2]} background"


def _judge(samples: Path, colors: list[str]) -> dict:
    from launch.evaluate.adherence import evaluate_dir

    report = evaluate_dir(samples, colors=colors)
    report.pop("per_triple", None)
    return report


def run_finetune(s: DemoSettings, f: FinetuneSettings | None = None, redo: set[str] | None = None,
                 log: Callable[[str], None] | None = None) -> dict:
    """The finetune phases on top of a finished `ldm demo` in s.out (run_demo first: its phases are reused)."""
    import sys

    from data_pipeline.palette import ALL_COLORS, COLORS, NEW_COLORS

    f = f or FinetuneSettings()
    if f.color not in NEW_COLORS:
        raise ValueError(f"finetune color {f.color!r}: one the base never saw, {', '.join(NEW_COLORS)}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = s.out.resolve()
    base_export, ae_export = out / "export", out / "stage1_export"
    for need in (base_export / "config.json", ae_export / "config.json"):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found: `ldm demo --finetune` fine-tunes a finished demo; "
                                    f"run `ldm demo --out {s.out}` first")
    ft = out / "finetune"
    data, samples = ft / "data", ft / "samples"
    estimates = {"ft_data": 10, "ft_precompute": 15, "ft_before": 10, "ft_train": 170, "ft_export": 5,
                 "ft_after": 30, "ft_report": 2}
    ph = Phases(ft, redo or set(), estimates, log)
    colors = list(ALL_COLORS)
    new = _triples(f.color)
    holdout = [":".join(t) for t in s.holdout]
    fp = _fingerprint(json.loads((base_export / "config.json").read_text()).get("step"),
                      (base_export / "model.safetensors").stat().st_mtime, asdict(f), s.image_size, s.seed)

    def make_data() -> dict:
        from data_pipeline.synthetic import write_synthetic

        shutil.rmtree(data, ignore_errors=True)
        a = write_synthetic(data / "new", f.images, size=s.image_size, seed=s.seed + 20, shard_size=s.shard_size,
                            only=[":".join(t) for t in new])
        b = write_synthetic(data / "replay", f.replay_images, size=s.image_size, seed=s.seed + 21,
                            shard_size=s.shard_size, exclude=holdout)
        # one folder, the two sets' shards interleaved, so every stretch of training sees both
        (data / "train").mkdir()
        pairs = zip(sorted((data / "new").glob("*.tar")), sorted((data / "replay").glob("*.tar")))
        for i, tar in enumerate(t for pair in pairs for t in pair):
            tar.rename(data / "train" / f"{i:05d}.tar")
        return {"new": a["samples"], "replay": b["samples"]}
    counts = ph.run("ft_data", f"synthetic shapes in {f.color} + replay of the old colors", fp, make_data)

    base_overrides = [f"data.image_size={s.image_size}", f"train.seed={s.seed}", *s.overrides_stage2]
    latents = data / "latents"

    def precompute() -> dict:
        from launch.runtime.config import load_config
        from launch.runtime.precompute import precompute as run_precompute

        shutil.rmtree(latents, ignore_errors=True)
        cfg = load_config(s.diffusion_config, [*base_overrides, f"data.urls={_shards(data / 'train')}",
                                               "data.kind=raw"])
        return run_precompute(cfg, ae_export, latents, batch_size=256)
    ph.run("ft_precompute", "precompute latents and text embeddings", fp, precompute)

    def sample_and_judge(export: Path, folder: Path, with_old: bool) -> dict:
        from launch.interop.sample import sample_export
        from launch.runtime.exportdir import load_pipeline

        shutil.rmtree(folder, ignore_errors=True)
        pipeline = load_pipeline(export, "cpu")
        grid_prompts = [_prompt(t) for t in new[:: max(1, len(new) // 8)][:8]]
        sample_export(export, grid_prompts, folder / "grid", num=4, seed=s.seed, batch_size=32,
                      grid=folder / "grid.png", pipeline=pipeline, progress=True)
        sample_export(export, [_prompt(t) for t in new], folder / "new", num=f.samples_per_triple,
                      seed=s.seed + 1, batch_size=128, pipeline=pipeline, progress=True)
        result = {"new": _judge(folder / "new", colors)}
        if with_old:
            from data_pipeline.synthetic import all_triples

            sample_export(export, [_prompt(t) for t in all_triples()], folder / "old",
                          num=f.old_samples_per_triple, seed=s.seed + 2, batch_size=128, pipeline=pipeline,
                          progress=True)
            result["old"] = _judge(folder / "old", colors)
        return result
    before = ph.run("ft_before", f"base model on {f.color} prompts (judged with {f.color} known)", fp,
                    lambda: sample_and_judge(base_export, samples / "before", with_old=False))

    run = ft / "run"
    finetune_keys = ("train.max_steps=", "optimizer.lr=", "optimizer.warmup_steps=", "train.checkpoint_every=",
                     "validation.", "lora.", "init.", "data.val_urls=", "ema.posthoc.")
    train = [*(o for o in base_overrides if not o.startswith(finetune_keys)), f"data.urls={_shards(latents)}", "data.kind=precomputed",
             "latents.source=precomputed", f"latents.autoencoder={ae_export}", f"init.from={base_export}",
             f"lora.rank={f.rank}", f"train.max_steps={f.steps}", f"optimizer.lr={f.lr}",
             "optimizer.warmup_steps=20", f"train.checkpoint_every={f.steps}", "validation.sample_every=0",
             "validation.every=0"]
    ph.run("ft_train", f"LoRA rank {f.rank}, {f.steps} steps from the base export", fp,
           lambda: _train(s.diffusion_config, run, train, s.threads))

    export = ft / "export"

    def export_merged() -> dict:
        from launch.interop.export import export_run

        shutil.rmtree(export, ignore_errors=True)
        export_run(run, export, autoencoder=ae_export, merge_lora=True)
        return json.loads((export / "config.json").read_text())
    ph.run("ft_export", "export with the adapters merged", fp, export_merged)
    after = ph.run("ft_after", f"merged model on {f.color} prompts and every old triple", fp,
                   lambda: sample_and_judge(export, samples / "after", with_old=True))

    def report() -> dict:
        return write_finetune_report(out, f, counts, before, after, ph.timings, run)
    summary = ph.run("ft_report", "write OUT/finetune/report.md", _fingerprint(time.time()), report)
    log(f"[demo] finetune done: {f.color} color accuracy {before['new']['accuracy']['color']:.1%} -> "
        f"{after['new']['accuracy']['color']:.1%}, old colors {after['old']['accuracy']['color']:.1%} "
        f"({ft / 'report.md'})")
    return summary


def write_finetune_report(out: Path, f: FinetuneSettings, counts: dict, before: dict, after: dict,
                          timings: dict, run: Path) -> dict:
    pct = lambda v: f"{100 * v:.1f} %"      # noqa: E731
    b, a, old = before["new"]["accuracy"], after["new"]["accuracy"], after["old"]["accuracy"]
    trained = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    summary = {"color": f.color, "settings": asdict(f), "images": counts,
               "new_color_before": {"n": before["new"]["n"], **b}, "new_color_after": {"n": after["new"]["n"], **a},
               "old_colors_after": {"n": after["old"]["n"], **old},
               "train_seconds": timings.get("ft_train", {}).get("seconds"), "train_result": trained,
               "timings_s": {k: t["seconds"] for k, t in timings.items()}}
    (out / "finetune" / "report.json").write_text(json.dumps(summary, indent=1))
    section = [
        REPORT_START, "## Fine-tuning a new color with LoRA (`ldm demo --finetune`)", "",
        f"The base model never saw **{f.color}**. LoRA rank {f.rank} on its attention projections, "
        f"{f.steps} steps from the base export, on {counts['new']} images in {f.color} and {counts['replay']} "
        f"replayed images of the old colors; training took {summary['train_seconds']:.0f} s "
        "(the ft_train phase, process start included). The judge reads the new color as well.", "",
        "| model | prompts | n | color | shape | background | all three |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| base | {f.color} | {before['new']['n']} | {pct(b['color'])} | {pct(b['shape'])} | "
        f"{pct(b['background'])} | {pct(b['all'])} |",
        f"| fine-tuned | {f.color} | {after['new']['n']} | {pct(a['color'])} | {pct(a['shape'])} | "
        f"{pct(a['background'])} | {pct(a['all'])} |",
        f"| fine-tuned | old colors | {after['old']['n']} | {pct(old['color'])} | {pct(old['shape'])} | "
        f"{pct(old['background'])} | {pct(old['all'])} |", "",
        f"Before (base export), four samples per {f.color} prompt: ![before](finetune/samples/before/grid.png)",
        "", "After (merged export): ![after](finetune/samples/after/grid.png)", "", REPORT_END,
    ]
    (out / "finetune" / "report.md").write_text(
        "\n".join(section[1:-1]).replace("(finetune/", "(") + "\n")
    main = out / "report.md"
    if main.is_file():
        text = main.read_text()
        if REPORT_START in text and REPORT_END in text:
            text = text[:text.index(REPORT_START)] + text[text.index(REPORT_END) + len(REPORT_END) + 1:]
        main.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n")
    return summary
