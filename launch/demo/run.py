"""`ldm demo`: the whole system end to end on embedded synthetic data, on a laptop-class CPU.

The data, the prompts scored and the judge come from a tier: shapes (launch/demo/shapes.py, one shape per
image, the default) or compositional (launch/demo/compositional.py, one to three objects, GenEval's tasks).

Phases (each one's outputs are reused by a second run unless `--redo` names it):
  data        the tier's captioned shards: train (without the held-out compositions), val, held-out (and for
              shapes a colour sweep, random RGB shapes stage one trains on besides train)
  stage1      `ldm train configs/demo/autoencoder.yaml` (DeepSpeed, checkpoints, metrics)
  export1     the autoencoder export (weights + latent scaling_factor / shift_factor)
  recon       reconstruction PSNR / SSIM on held-out images (never trained on)
  precompute  latents + text embeddings for stage two: the train shards, and the val shards for its validation
  stage2      `ldm train configs/demo/diffusion.yaml` (flow matching, CFG dropout, EMA; fixed-t validation loss
              on the val latents every VAL_EVERY steps, in metrics.jsonl and RUN_DIR/report.html)
  export2     the stage-two export: OUT/export/
  sample      a grid for a fixed prompt list, and the tier's prompts for scoring (held-out ones included)
  adherence   the tier's judge, from the pixels, held-out compositions reported apart
  report      OUT/report.md (+ report.json): grids, loss curves, numbers, timings per phase

Training runs as `python -m launch train ...` in a subprocess, exactly as a user would start it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
# Stage two's fixed-t validation (launch/runtime/validation.py) on the val latents: every VAL_EVERY steps (and at
# step 0), so the validation curve has points between the checkpoints (500, 1000 and the last, 1100, are
# multiples of it), on VAL_BATCHES fixed batches of 128 val latents (of the 256) x 8 timesteps, for the live and
# the EMA weights: 16 no-grad forwards of batch 128 per evaluation, about 7 training steps' worth (a no-grad bf16
# forward measured at 0.45 of a training step on 2 cores), so 12 evaluations add ~8 % to stage two's 1,100 steps
# (~20 s, ~3 % of the demo); two batches would double that.
VAL_EVERY = 100
VAL_BATCHES = 1


@dataclass
class DemoSettings:
    out: Path
    image_size: int = 32
    train_images: int = 8000
    val_images: int = 256
    holdout_images: int = 192
    shard_size: int = 1000
    samples_per_triple: int = 2            # 168 triples x 2 = 336 scored samples
    holdout_samples_per_triple: int = 16   # + 3 held-out triples x 14 more: 48 held-out samples to judge them by
    seed: int = 0
    autoencoder_config: Path = REPO / "configs" / "demo" / "autoencoder.yaml"
    diffusion_config: Path = REPO / "configs" / "demo" / "diffusion.yaml"
    overrides_stage1: list[str] = field(default_factory=list)
    overrides_stage2: list[str] = field(default_factory=list)
    threads: int = max(1, os.cpu_count() or 1)
    tier: str = "shapes"                   # shapes (launch/demo/shapes.py) | compositional (compositional.py)
    tier_options: dict = field(default_factory=dict)   # keywords of the tier's class (e.g. how many prompts to score)

    @classmethod
    def for_tier(cls, tier: str, out: Path, **kw) -> "DemoSettings":
        """The settings of a tier: its image size, data counts and configs, then the caller's keywords."""
        if tier == "shapes":
            return cls(out=out, **kw)
        if tier == "compositional":
            from .compositional import SETTINGS

            return cls(out=out, tier=tier, **{**SETTINGS, **kw})
        raise ValueError(f"demo tier {tier!r}: one of shapes, compositional")

    @property
    def holdout(self) -> tuple[tuple[str, str, str], ...]:
        from data_pipeline.synthetic import DEFAULT_HOLDOUT

        return tuple(DEFAULT_HOLDOUT)


# ----------------------------------------------------------------------------- bookkeeping

def _shards(folder: Path) -> str:
    n = len(sorted(folder.glob("*.tar")))
    return str(folder / (f"{{00000..{n - 1:05d}}}.tar" if n > 1 else "00000.tar"))


def _fingerprint(*parts) -> str:
    blob = json.dumps([str(p) if isinstance(p, Path) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


class Phases:
    """Runs named phases once; a phase is skipped when its marker holds the same fingerprint and no earlier
    phase ran in this call (each phase reads what the ones before it wrote: a new stage two needs new samples)."""

    def __init__(self, out: Path, redo: set[str], estimates: dict[str, float], log: Callable[[str], None]):
        self.marks = out / ".demo"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.redo, self.estimates, self.log = redo, estimates, log
        self.timings: dict[str, dict] = {}
        self.t0 = time.time()
        self.done_estimate = 0.0
        self.ran_any = False

    def run(self, name: str, title: str, fingerprint: str, fn: Callable[[], dict]) -> dict:
        mark = self.marks / f"{name}.json"
        index = list(self.estimates).index(name) + 1
        remaining = sum(v for k, v in list(self.estimates.items())[index - 1:])
        if mark.is_file() and "all" not in self.redo and name not in self.redo and not self.ran_any:
            saved = json.loads(mark.read_text())
            if saved.get("fingerprint") == fingerprint:
                self.log(f"[demo] {index}/{len(self.estimates)} {title}: done before, reused "
                         f"(ldm demo --redo {name} to run it again)")
                self.timings[name] = {"seconds": saved["seconds"], "reused": True}
                return saved["result"]
        elapsed = time.time() - self.t0
        self.log(f"[demo] {index}/{len(self.estimates)} {title} (about {self.estimates[name]:.0f} s; "
                 f"elapsed {elapsed:.0f} s, overall ETA ~{remaining:.0f} s)")
        start = time.time()
        result = fn()
        seconds = round(time.time() - start, 2)
        self.ran_any = True
        mark.write_text(json.dumps({"fingerprint": fingerprint, "seconds": seconds, "result": result}, indent=1))
        self.timings[name] = {"seconds": seconds, "reused": False}
        return result


def _train(config: Path, run_dir: Path, overrides: list[str], threads: int) -> dict:
    """`python -m launch train` in a subprocess, like a user, into a fresh run directory (a phase that runs
    again must not resume the old run); its progress bar goes to the terminal."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else env.get("DS_ACCELERATOR", ""))
    if not env.get("DS_ACCELERATOR"):
        env.pop("DS_ACCELERATOR")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("WANDB_MODE", "offline")
    cmd = [sys.executable, "-m", "launch", "train", str(config), f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else {}
    if proc.returncode != 0 or result.get("status") != "completed":
        raise RuntimeError(f"training failed (exit {proc.returncode}): {' '.join(cmd)}")
    return result


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- the demo

def tier_of(s: DemoSettings):
    """The tier object that writes the data, names the prompts, judges the samples and writes the report."""
    if s.tier == "compositional":
        from .compositional import CompositionalTier

        return CompositionalTier(**s.tier_options)
    from .shapes import ShapesTier

    return ShapesTier(**s.tier_options)


def run_demo(s: DemoSettings, redo: set[str] | None = None, log: Callable[[str], None] | None = None) -> dict:
    import torch

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    torch.set_num_threads(s.threads)
    out = s.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs = out / "data", out / "runs"
    tier = tier_of(s)
    ph = Phases(out, redo or set(), dict(tier.estimates), log)

    # 1. data: train (without the held-out compositions), val, and held-out images
    counts = ph.run("data", f"synthetic captioned {tier.name} data",
                    _fingerprint(s.image_size, s.train_images, s.val_images, s.holdout_images, s.seed,
                                 *tier.key(s)),
                    lambda: tier.write_data(data, s))

    # 2. stage one
    ae_run = runs / "autoencoder"
    # stage one also reads the tier's colour sweep when it wrote one (shapes: data/color_sweep, no captions used)
    ae_urls = (f"data.urls=['{_shards(data / 'train')}', '{_shards(data / 'color_sweep')}']"
               if counts.get("color_sweep") else f"data.urls={_shards(data / 'train')}")
    ae_overrides = [ae_urls, f"data.val_urls={_shards(data / 'val')}",
                    f"data.image_size={s.image_size}", f"train.seed={s.seed}", *s.overrides_stage1]
    fp1 = _fingerprint(_file_hash(s.autoencoder_config), ae_overrides, counts)

    ph.run("stage1", "stage one: autoencoder training", fp1,
           lambda: _train(s.autoencoder_config, ae_run, ae_overrides, s.threads))

    # 3. export the autoencoder (weights + latent statistics)
    ae_export = out / "stage1_export"

    def export1() -> dict:
        from launch.interop.export import export_run

        export_run(ae_run, ae_export)
        return json.loads((ae_export / "config.json").read_text())
    ae_cfg = ph.run("export1", "export the autoencoder", fp1, export1)

    # 4. reconstruction quality on images the autoencoder never saw
    def recon() -> dict:
        from launch.evaluate.scores import recon_metrics

        return {"holdout": recon_metrics(ae_export, [_shards(data / "holdout")], batch_size=64),
                "val": recon_metrics(ae_export, [_shards(data / "val")], batch_size=64)}
    recon_result = ph.run("recon", "reconstruction PSNR on held-out images", fp1, recon)

    # 5. precompute latents + text embeddings, of the train shards and of the val shards (stage two's validation)
    latents, val_latents = data / "latents", data / "latents_val"
    dm_overrides = [f"data.urls={_shards(data / 'train')}", f"data.image_size={s.image_size}",
                    f"train.seed={s.seed}", *s.overrides_stage2]
    fp2 = _fingerprint(fp1, _file_hash(s.diffusion_config), dm_overrides, "val latents", VAL_EVERY, VAL_BATCHES)

    def precompute() -> dict:
        from launch.runtime.config import load_config
        from launch.runtime.precompute import precompute as run_precompute

        result = {}
        for name, src, dst in (("train", data / "train", latents), ("val", data / "val", val_latents)):
            shutil.rmtree(dst, ignore_errors=True)
            rest = [o for o in dm_overrides if not o.startswith("data.urls=")]
            cfg = load_config(s.diffusion_config, [f"data.urls={_shards(src)}", *rest, "data.kind=raw"])
            result[name] = run_precompute(cfg, ae_export, dst, batch_size=256)
        return result
    ph.run("precompute", "precompute latents and text embeddings", fp2, precompute)

    # 6. stage two (validation every VAL_EVERY steps on the val latents, unless --stage2 sets these keys)
    dm_run = runs / "diffusion"
    train2 = [o for o in dm_overrides if not o.startswith("data.urls=")]
    for key, value in (("validation.every", VAL_EVERY), ("validation.batches", VAL_BATCHES)):
        if not any(o.startswith(f"{key}=") for o in train2):
            train2.insert(0, f"{key}={value}")
    if not any(o.startswith("data.val_urls=") for o in train2):
        train2.append(f"data.val_urls={_shards(val_latents)}")
    train2 += [f"data.urls={_shards(latents)}", "data.kind=precomputed", "latents.source=precomputed",
               f"latents.autoencoder={ae_export}"]

    ph.run("stage2", "stage two: text-conditioned denoiser training", fp2,
           lambda: _train(s.diffusion_config, dm_run, train2, s.threads))

    # 7. export stage two (self-contained: the autoencoder is copied in)
    export = out / "export"

    def export2() -> dict:
        from launch.interop.export import export_run

        if export.exists():
            shutil.rmtree(export)
        export_run(dm_run, export, autoencoder=ae_export)
        return json.loads((export / "config.json").read_text())
    ph.run("export2", "export stage two to OUT/export", fp2, export2)

    # 8. samples: a grid of fixed prompts, and the tier's prompts for scoring
    samples = out / "samples"

    def sample() -> dict:
        from launch.runtime.exportdir import load_pipeline
        from launch.interop.sample import sample_export

        shutil.rmtree(samples, ignore_errors=True)
        pipeline = load_pipeline(export, "cpu")
        result = {"grid": sample_export(export, tier.grid_prompts(s), samples / "grid", num=4, seed=s.seed,
                                        batch_size=32, grid=samples / "grid.png", pipeline=pipeline, progress=True)}
        for sub, prompts, num, seed in tier.score_sets(s):
            result[sub] = sample_export(export, prompts, samples / sub, num=num, seed=seed, batch_size=128,
                                        pipeline=pipeline, progress=True)
        return result
    ph.run("sample", "sample from the EMA weights with CFG", fp2, sample)

    # 9. adherence, judged from the pixels
    judged = ph.run("adherence", "prompt adherence judged from pixels", fp2, lambda: tier.judge(samples, s))

    # 10. report
    result = ph.run("report", "write OUT/report.md", _fingerprint(time.time()),
                    lambda: tier.write_report(out, ph.timings, counts=counts, recon=recon_result, judged=judged,
                                              ae_config=ae_cfg, settings=s))
    log(f"[demo] done in {time.time() - ph.t0:.0f} s: {out / 'report.md'}")
    return result
