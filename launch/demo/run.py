"""`ldm demo`: the whole system end to end on embedded synthetic data, on a laptop-class CPU.

Phases (each one's outputs are reused by a second run unless `--redo` names it):
  data        captioned-shapes shards: train (without the held-out triples), val, held-out
  stage1      `ldm train configs/demo/autoencoder.yaml` (DeepSpeed, checkpoints, metrics)
  export1     the autoencoder export (weights + latent scaling_factor / shift_factor)
  recon       reconstruction PSNR / SSIM on held-out images (never trained on)
  precompute  latents + text embeddings for stage two: the train shards, and the val shards for its validation
  stage2      `ldm train configs/demo/diffusion.yaml` (flow matching, CFG dropout, EMA; fixed-t validation loss
              on the val latents every VAL_EVERY steps, in metrics.jsonl and RUN_DIR/report.html)
  export2     the stage-two export: OUT/export/
  sample      a grid for a fixed prompt list, and every triple (held-out ones included) for scoring
  adherence   color / shape / background judged from the pixels, held-out triples reported apart
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
from dataclasses import asdict, dataclass, field
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
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")


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

def run_demo(s: DemoSettings, redo: set[str] | None = None, log: Callable[[str], None] | None = None) -> dict:
    import torch

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    torch.set_num_threads(s.threads)
    out = s.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, runs = out / "data", out / "runs"
    estimates = {"data": 20, "stage1": 225, "export1": 5, "recon": 5, "precompute": 20, "stage2": 270,
                 "export2": 5, "sample": 25, "adherence": 5, "report": 5}
    ph = Phases(out, redo or set(), estimates, log)
    holdout = [":".join(t) for t in s.holdout]

    # 1. data
    def make_data() -> dict:
        from data_pipeline.synthetic import write_synthetic

        for sub in ("train", "val", "holdout"):
            shutil.rmtree(data / sub, ignore_errors=True)
        a = write_synthetic(data / "train", s.train_images, size=s.image_size, seed=s.seed, shard_size=s.shard_size,
                            exclude=holdout)
        b = write_synthetic(data / "val", s.val_images, size=s.image_size, seed=s.seed + 1,
                            shard_size=s.val_images, exclude=holdout)
        c = write_synthetic(data / "holdout", s.holdout_images, size=s.image_size, seed=s.seed + 2,
                            shard_size=s.holdout_images, only=holdout)
        return {"train": a["samples"], "val": b["samples"], "holdout": c["samples"]}
    counts = ph.run("data", "synthetic captioned shapes", _fingerprint(s.image_size, s.train_images, s.val_images,
                                                                       s.holdout_images, s.seed, holdout), make_data)

    # 2. stage one
    ae_run = runs / "autoencoder"
    ae_overrides = [f"data.urls={_shards(data / 'train')}", f"data.val_urls={_shards(data / 'val')}",
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

    # 8. samples: a grid of fixed prompts, and every triple for scoring
    samples = out / "samples"
    grid_prompts = [f"a {c} {sh} on a {b} background" for c, sh, b in
                    [("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "purple"),
                     ("blue", "triangle", "yellow"), ("white", "circle", "black"), ("orange", "square", "green"),
                     ("purple", "circle", "orange"), ("black", "triangle", "red")]]
    all_triples = [(c, sh, b) for c in COLORS for sh in SHAPES for b in COLORS if b != c]
    score_prompts = [f"a {c} {sh} on a {b} background" for c, sh, b in all_triples]
    extra = max(0, s.holdout_samples_per_triple - s.samples_per_triple)
    holdout_prompts = [f"a {c} {sh} on a {b} background" for c, sh, b in s.holdout]

    def sample() -> dict:
        from launch.runtime.exportdir import load_pipeline
        from launch.interop.sample import sample_export

        shutil.rmtree(samples, ignore_errors=True)
        pipeline = load_pipeline(export, "cpu")
        grid = sample_export(export, grid_prompts, samples / "grid", num=4, seed=s.seed, batch_size=32,
                             grid=samples / "grid.png", pipeline=pipeline, progress=True)
        scored = sample_export(export, score_prompts, samples / "scored", num=s.samples_per_triple,
                               seed=s.seed + 1, batch_size=128, pipeline=pipeline, progress=True)
        if extra:   # more samples of the held-out triples, so their accuracy is not read off 6 images
            sample_export(export, holdout_prompts, samples / "scored_holdout", num=extra, seed=s.seed + 2,
                          batch_size=128, pipeline=pipeline, progress=True)
        return {"grid": grid, "scored": scored}
    ph.run("sample", "sample from the EMA weights with CFG", fp2, sample)

    # 9. adherence
    def adherence() -> dict:
        from launch.evaluate.adherence import evaluate_dir

        prompts = {}
        for sub in ("scored", "scored_holdout"):
            if (samples / sub / "prompts.json").is_file():
                prompts.update({f"{sub}/{k}": v for k, v in json.loads((samples / sub / "prompts.json").read_text()).items()})
        report = evaluate_dir(samples, holdout=holdout, prompts=prompts)
        report.pop("per_triple", None)
        return report
    adh = ph.run("adherence", "prompt adherence judged from pixels", fp2, adherence)

    # 10. report
    def report() -> dict:
        from .report import write_report

        return write_report(out, ph.timings, counts=counts, recon=recon_result, adherence=adh,
                            ae_config=ae_cfg, holdout=holdout, settings=asdict(s))
    result = ph.run("report", "write OUT/report.md", _fingerprint(time.time()), report)
    log(f"[demo] done in {time.time() - ph.t0:.0f} s: {out / 'report.md'}")
    return result
