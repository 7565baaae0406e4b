"""The one-shape tier of `ldm demo` (the default): one shape in one colour on a background, judged by
launch/evaluate/adherence.py for colour, shape and background; three colour-shape-background triples are
held out of training and scored apart."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")


def _prompt(c: str, sh: str, b: str) -> str:
    return f"a {c} {sh} on a {b} background"


class ShapesTier:
    """`color_sweep_images`: shapes in random RGB colours that only stage one trains on (see
    data_pipeline/synthetic.py color_sweep_sample: the finetune demo's new colour needs an autoencoder that
    can draw it)."""
    name = "shapes"
    readme_markers = ("<!-- demo:start -->", "<!-- demo:end -->")
    # seconds per phase on 2 cores (the ETA of the progress lines)
    estimates = {"data": 20, "stage1": 250, "export1": 5, "recon": 5, "precompute": 20, "stage2": 270,
                 "export2": 5, "sample": 25, "adherence": 5, "report": 5}

    def __init__(self, color_sweep_images: int = 500):
        self.color_sweep_images = color_sweep_images

    def holdout(self, s) -> list[str]:
        return [":".join(t) for t in s.holdout]

    def key(self, s) -> list:
        """What the data depends on besides the settings' counts (the phase fingerprint)."""
        return [self.holdout(s), self.color_sweep_images]

    def write_data(self, data: Path, s) -> dict:
        from data_pipeline.synthetic import write_synthetic

        holdout = self.holdout(s)
        for sub in ("train", "val", "holdout", "color_sweep"):
            shutil.rmtree(data / sub, ignore_errors=True)
        a = write_synthetic(data / "train", s.train_images, size=s.image_size, seed=s.seed, shard_size=s.shard_size,
                            exclude=holdout)
        b = write_synthetic(data / "val", s.val_images, size=s.image_size, seed=s.seed + 1,
                            shard_size=s.val_images, exclude=holdout)
        c = write_synthetic(data / "holdout", s.holdout_images, size=s.image_size, seed=s.seed + 2,
                            shard_size=s.holdout_images, only=holdout)
        counts = {"train": a["samples"], "val": b["samples"], "holdout": c["samples"]}
        if self.color_sweep_images:
            counts["color_sweep"] = write_synthetic(data / "color_sweep", self.color_sweep_images, size=s.image_size,
                                                    seed=s.seed + 3, shard_size=s.shard_size,
                                                    tier="colors")["samples"]
        return counts

    def grid_prompts(self, s) -> list[str]:
        """One row per prompt; the first three are held-out triples."""
        return [_prompt(c, sh, b) for c, sh, b in
                [("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "purple"),
                 ("blue", "triangle", "yellow"), ("white", "circle", "black"), ("orange", "square", "green"),
                 ("purple", "circle", "orange"), ("black", "triangle", "red")]]

    def score_sets(self, s) -> list[tuple[str, list[str], int, int]]:
        """(subfolder, prompts, samples per prompt, seed): every triple, then more of the held-out ones so
        their accuracy is not read off a handful of images."""
        every = [_prompt(c, sh, b) for c in COLORS for sh in SHAPES for b in COLORS if b != c]
        sets = [("scored", every, s.samples_per_triple, s.seed + 1)]
        extra = max(0, s.holdout_samples_per_triple - s.samples_per_triple)
        if extra:
            sets.append(("scored_holdout", [_prompt(*t) for t in s.holdout], extra, s.seed + 2))
        return sets

    def judge(self, samples: Path, s) -> dict:
        from launch.evaluate.adherence import evaluate_dir

        prompts = {}
        for sub, *_ in self.score_sets(s):
            if (samples / sub / "prompts.json").is_file():
                prompts.update({f"{sub}/{k}": v for k, v in json.loads((samples / sub / "prompts.json").read_text()).items()})
        report = evaluate_dir(samples, holdout=self.holdout(s), prompts=prompts)
        report.pop("per_triple", None)
        return report

    def write_report(self, out: Path, timings: dict, *, counts: dict, recon: dict, judged: dict, ae_config: dict,
                     settings) -> dict:
        from dataclasses import asdict

        from .report import write_report

        return write_report(out, timings, counts=counts, recon=recon, adherence=judged, ae_config=ae_config,
                            holdout=self.holdout(settings), settings=asdict(settings))

    def update_readme(self, out: Path, readme: Path, assets: Path) -> None:
        from .report import update_readme

        update_readme(out, readme, assets)
