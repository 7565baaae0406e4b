"""EDM2 post-hoc EMA in the runtime: power-function EMA profiles beside the main EMA, their snapshots on
disk, and the reconstruction of an EMA of any length from them (the mathematics: launch/runtime/phema.py).

Each profile (ema.posthoc.sigma_rels, default 0.05 and 0.10) is an `EMA` of kind "power" from step 0, held
exactly like the main one: under ZeRO-3 each rank averages only its own fp32 partition. Every
`ema.posthoc.snapshot_every` steps (0: train.checkpoint_every) and at the last step, every profile is written
as it stands, on the partitions, with no gather:

    RUN_DIR/phema/step_XXXXXXXX/sigma_0.0500/rank_XXXXX.safetensors   one file per rank under ZeRO-3, else one
    RUN_DIR/phema/step_XXXXXXXX/snapshot.json                          written last by rank 0: the profiles'
                                                                        sigma_rel, gamma and time (EMA updates)

A snapshot without snapshot.json is incomplete and ignored. The profiles' running state is part of every
checkpoint (`ema_phema_<sigma>/`), so a resumed run continues them exactly; snapshots newer than the
checkpoint it resumes are removed first (the resumed run writes them again). Times are counted in EMA
updates (applied optimizer steps), the unit of the profiles' beta_n = (1 - 1/n)^(gamma + 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import dist as D
from .ema import EMA
from .phema import posthoc_coefficients, sigma_rel_to_gamma

SNAPSHOTS = "phema"
MARKER = "snapshot.json"


def _key(sigma_rel: float) -> str:
    return f"{sigma_rel:.4f}"


class PosthocEMA:
    def __init__(self, module: torch.nn.Module, cfg, run_dir: Path, env: D.DistEnv):
        ema_cfg = cfg.ema
        self.sigma_rels = [float(s) for s in ema_cfg.posthoc.sigma_rels]
        self.every = ema_cfg.posthoc.snapshot_every or cfg.train.checkpoint_every
        self.root = Path(run_dir) / SNAPSHOTS
        self.env = env
        self.profiles = {_key(s): EMA(module, dataclasses.replace(ema_cfg, kind="power", sigma_rel=s,
                                                                  start_step=0))
                         for s in self.sigma_rels}

    @classmethod
    def build(cls, module, cfg, run_dir, env) -> Optional["PosthocEMA"]:
        if not cfg.ema.enabled or not cfg.ema.posthoc.sigma_rels:
            return None
        return cls(module, cfg, run_dir, env)

    def update(self, step: int) -> None:
        for ema in self.profiles.values():
            ema.update(step)

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    # ------------------------------------------------------------------ snapshots (collective)

    def snapshot(self, step: int) -> Path:
        tag_dir = self.root / f"step_{step:08d}"
        if self.env.is_main:
            if tag_dir.exists():
                shutil.rmtree(tag_dir)
            tag_dir.mkdir(parents=True)
        D.barrier()
        for key, ema in self.profiles.items():
            ema.save(tag_dir / f"sigma_{key}", self.env.rank)
        D.barrier()
        if self.env.is_main:
            info = {"step": step, "world_size": self.env.world_size,
                    "profiles": [{"sigma_rel": float(key), "gamma": sigma_rel_to_gamma(float(key)),
                                  "t": ema.num_updates, "dir": f"sigma_{key}"}
                                 for key, ema in self.profiles.items()]}
            tmp = tag_dir / f".{MARKER}.tmp"
            tmp.write_text(json.dumps(info, indent=1))
            os.replace(tmp, tag_dir / MARKER)
        return tag_dir

    def drop_after(self, step: int) -> None:
        """Remove snapshots newer than `step` (a resume from `step` writes them again). Rank 0; barrier."""
        if self.env.is_main and self.root.is_dir():
            for d in self.root.glob("step_*"):
                if d.is_dir() and int(d.name.split("_")[1]) > step:
                    shutil.rmtree(d, ignore_errors=True)
        D.barrier()

    # ------------------------------------------------------------------ checkpoint state

    def save(self, tag_dir: Path, rank: int) -> None:
        for key, ema in self.profiles.items():
            ema.save(tag_dir / f"ema_phema_{key}", rank)

    def load(self, tag_dir: Path, rank: int, world_size: int, log) -> bool:
        """Restore every profile from a checkpoint; False (and nothing changed) when it holds none of them."""
        dirs = {key: tag_dir / f"ema_phema_{key}" for key in self.profiles}
        if not all(d.is_dir() for d in dirs.values()):
            log(f"note: checkpoint {tag_dir.name} holds no post-hoc EMA profiles {sorted(dirs)}; "
                "post-hoc EMA is off for this run (its snapshots would not describe the run from step 0)")
            return False
        for key, ema in self.profiles.items():
            ema.load(dirs[key], rank, world_size)
        return True


# ----------------------------------------------------------------------------- reading (no process group)

def list_snapshots(run_dir: str | Path) -> list[dict]:
    """Every profile of every complete snapshot: {step, sigma_rel, gamma, t, path}, oldest first."""
    out = []
    root = Path(run_dir) / SNAPSHOTS
    for d in sorted(root.glob("step_*")) if root.is_dir() else []:
        marker = d / MARKER
        if not marker.is_file():
            continue
        info = json.loads(marker.read_text())
        for p in info["profiles"]:
            out.append({"step": info["step"], "sigma_rel": p["sigma_rel"], "gamma": p["gamma"], "t": p["t"],
                        "path": d / p["dir"]})
    return out


def reconstruct(run_dir: str | Path, sigma_rels: list[float], step: Optional[int] = None
                ) -> tuple[dict[float, dict[str, torch.Tensor]], dict]:
    """Full fp32 EMA weights for each relative std, at the time of the snapshot at `step` (default: the
    newest), from the snapshots up to it by EDM2's least-squares solve. Returns (weights by sigma_rel, info:
    step, t, and each snapshot's coefficient per sigma_rel)."""
    snaps = [s for s in list_snapshots(run_dir) if s["t"] > 0]
    if not snaps:
        raise FileNotFoundError(f"no complete post-hoc EMA snapshots under {Path(run_dir) / SNAPSHOTS}")
    if step is None:
        step = max(s["step"] for s in snaps)
    at = [s for s in snaps if s["step"] == step]
    if not at:
        raise FileNotFoundError(f"no post-hoc EMA snapshot at step {step}; have {sorted({s['step'] for s in snaps})}")
    out_t = at[0]["t"]
    snaps = [s for s in snaps if s["t"] <= out_t]
    coeffs = {s: posthoc_coefficients([p["t"] for p in snaps], [p["gamma"] for p in snaps], s, out_t)
              for s in sigma_rels}
    acc: dict[float, dict[str, torch.Tensor]] = {s: {} for s in sigma_rels}
    for i, snap in enumerate(snaps):
        weights, _ = EMA.read_full(snap["path"])
        for s in sigma_rels:
            x = float(coeffs[s][i])
            for name, w in weights.items():
                w64 = w.double() * x
                acc[s][name] = acc[s][name] + w64 if name in acc[s] else w64
    result = {s: {n: w.float() for n, w in acc[s].items()} for s in sigma_rels}
    info = {"step": step, "t": out_t,
            "snapshots": [{"step": p["step"], "sigma_rel": p["sigma_rel"], "t": p["t"],
                           "coefficients": {f"{s:g}": float(coeffs[s][i]) for s in sigma_rels}}
                          for i, p in enumerate(snaps)]}
    return result, info


DEFAULT_SWEEP = (0.03, 0.05, 0.075, 0.1, 0.15, 0.2)


def sweep(run_dir: str | Path, sigma_rels=DEFAULT_SWEEP, step: Optional[int] = None, log=print,
          stage=None, val_data=None) -> dict:
    """Score each reconstruction by the fixed-t validation loss (launch/runtime/validation.py) on the run's
    held-out data (`val_data`, default data.val_urls), in this process (one rank, CPU); `stage` defaults to the
config's. Returns {step, losses: {sigma_rel: val_loss}, best}."""
    from .runweights import open_run
    from data_pipeline.loader import build_eval_loader, heldout_urls

    from .stages import build_stage
    from .validation import Validator

    cfg = open_run(run_dir).cfg
    env = D.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    if val_data is not None:
        val = val_data
    elif not heldout_urls(cfg.data):
        raise FileNotFoundError("the run has no held-out data (data.val_urls or data.val_fraction); "
                                "nothing to score by")
    else:
        val_cfg = dataclasses.replace(cfg.data, num_workers=0)

        def val():
            return iter(build_eval_loader(val_cfg, heldout_urls(cfg.data), rank=0, world_size=1,
                                          batch_size=cfg.train.micro_batch_size))
    weights, info = reconstruct(run_dir, list(sigma_rels), step)
    stage = stage if stage is not None else build_stage(cfg)
    stage.setup(env.device)
    nets = stage.trainable_modules()
    main = nets[stage.main_module]
    validator = Validator(stage, env, val, every=1, batches=cfg.validation.batches, seed=cfg.train.seed, log=log)
    losses = {}
    for s in sigma_rels:
        main.load_state_dict({k: v.to(main.state_dict()[k].dtype) for k, v in weights[s].items()}, strict=False)
        losses[float(s)] = validator.evaluate(nets)["val/val_loss"]
    best = min(losses, key=losses.get)
    return {"step": info["step"], "losses": losses, "best": best}
