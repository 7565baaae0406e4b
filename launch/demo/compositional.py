"""`ldm demo --tier compositional`: the demo's two stages on one to three objects per image, judged by
GenEval's tasks from the pixels (launch/evaluate/compositional.py).

Data (data_pipeline/compositional.py): single objects, pairs, counts and relative positions; the default
held-out items (three colour-shape pairings, two arrangements) never occur in training. Scored prompts are
captions drawn fresh from the same grammar: SEEN of training compositions (new images, new layouts) and
HELD_OUT that each contain a held-out pairing or arrangement, so the held-out score is generalisation.
The text tower is the demo's: a frozen open_clip tower, randomly initialised and seeded unless
`--stage2 text_encoder.pretrained=FILE` gives it weights; the report says which it was.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .compositional_report import README_END, README_START

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo" / "compositional"
# DemoSettings of this tier (launch/demo/run.py DemoSettings.for_tier)
SETTINGS = dict(image_size=40, train_images=12000, val_images=256, holdout_images=192,
                autoencoder_config=CONFIGS / "autoencoder.yaml", diffusion_config=CONFIGS / "diffusion.yaml")
HOLDOUT = ["default"]


def _grid_prompts() -> list[str]:
    held_out = ["a red circle and a blue square on a white background",               # red circle
                "a white circle to the left of a blue square on a black background",  # circle left of square
                "three yellow triangles on a blue background"]                         # yellow triangle
    seen = ["two green circles on a black background",
            "a purple triangle above a orange square on a white background",
            "a blue triangle on a yellow background",
            "a orange circle and a green triangle on a purple background",
            "a black square to the right of a white triangle on a red background"]
    return held_out + seen


@dataclass
class CompositionalTier:
    name: str = "compositional"
    seen: int = 480          # scored prompts of training compositions, one sample each
    held_out: int = 240      # scored prompts that contain a held-out item
    readme_markers: tuple[str, str] = (README_START, README_END)
    estimates: Optional[dict] = None

    def __post_init__(self):
        # seconds per phase on 2 cores (the ETA of the progress lines): stage two measured 644 s on an EPYC
        # (1,800 steps of batch 64), sampling 156 s
        self.estimates = self.estimates or {"data": 5, "stage1": 300, "export1": 5, "recon": 5, "precompute": 35,
                                            "stage2": 650, "export2": 5, "sample": 150, "adherence": 5,
                                            "report": 5}

    def key(self, s) -> list:
        return ["compositional", HOLDOUT, self.seen, self.held_out]

    def write_data(self, data: Path, s) -> dict:
        from data_pipeline.synthetic import write_synthetic

        for sub in ("train", "val", "holdout"):
            shutil.rmtree(data / sub, ignore_errors=True)
        common = dict(size=s.image_size, tier="compositional")
        a = write_synthetic(data / "train", s.train_images, seed=s.seed, shard_size=s.shard_size, exclude=HOLDOUT,
                            **common)
        b = write_synthetic(data / "val", s.val_images, seed=s.seed + 1, shard_size=s.val_images, exclude=HOLDOUT,
                            **common)
        c = write_synthetic(data / "holdout", s.holdout_images, seed=s.seed + 2, shard_size=s.holdout_images,
                            only=HOLDOUT, **common)
        return {"train": a["samples"], "val": b["samples"], "holdout": c["samples"]}

    def grid_prompts(self, s) -> list[str]:
        return _grid_prompts()

    def score_sets(self, s) -> list[tuple[str, list[str], int, int]]:
        """Captions of fresh draws from the grammar (seeds no data split uses), one sample per caption."""
        from data_pipeline.compositional import iter_compositional

        def captions(n: int, seed: int, **which) -> list[str]:
            return [cap for _, cap, _ in iter_compositional(n, size=s.image_size, seed=seed, **which)]
        return [("scored", captions(self.seen, s.seed + 10, exclude=HOLDOUT), 1, s.seed + 1),
                ("scored_holdout", captions(self.held_out, s.seed + 11, only=HOLDOUT), 1, s.seed + 2)]

    def judge(self, samples: Path, s) -> dict:
        from launch.evaluate.compositional import evaluate_dir

        prompts = {}
        for sub, *_ in self.score_sets(s):
            names = json.loads((samples / sub / "prompts.json").read_text())
            prompts.update({f"{sub}/{k}": v for k, v in names.items()})
        return evaluate_dir(samples, prompts=prompts).to_dict()

    def write_report(self, out: Path, timings: dict, *, counts: dict, recon: dict, judged: dict, ae_config: dict,
                     settings) -> dict:
        from .compositional_report import write_report

        return write_report(out, timings, counts=counts, recon=recon, judged=judged, ae_config=ae_config,
                            settings=settings, text_tower=text_tower(settings), holdout=self.holdout_items())

    def holdout_items(self) -> list[str]:
        from data_pipeline.compositional import HoldOut

        return HoldOut.parse(HOLDOUT).items()

    def update_readme(self, out: Path, readme: Path, assets: Path) -> None:
        from .compositional_report import update_readme

        update_readme(out, readme, assets)


def text_tower(s) -> str:
    """What the denoiser was conditioned by, in words, from the resolved stage-two config."""
    from launch.runtime.config import load_config

    cfg = load_config(s.diffusion_config, [o for o in s.overrides_stage2 if re.match(r"text_encoder\.", o)])
    te = cfg.text_encoder
    weights = (f"weights from {te.pretrained}" if te.pretrained
               else f"randomly initialised (seed {te.init_seed}), as the demo's")
    return f"frozen open_clip tower `{te.arch}`, {weights}, layer `{te.layer}`, {te.context_length} tokens"
