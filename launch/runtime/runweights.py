"""The weights of a run directory, read back without DeepSpeed running or a process group.

`open_run` finds the newest complete checkpoint (or a named tag) and its resolved config; `live_weights`
consolidates the main module's fp32 weights from DeepSpeed's shards (any ZeRO stage, any world size);
`ema_weights` re-assembles the EMA from its per-rank partitions. Export (launch/interop/export.py) and
`init.from` (launch/runtime/init.py) both read runs through these.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_complete, step_of
from .config import Config
from .configio import build_dataclass


@dataclass
class RunCheckpoint:
    run_dir: Path
    tag: str
    tag_dir: Path
    meta: dict
    cfg: Config

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def open_run(run_dir: str | Path, tag: str | None = None) -> RunCheckpoint:
    """The newest complete checkpoint of a run (or the named one), with its resolved config."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no {root} (expected RUN_DIR/checkpoints/"
                                f"step_XXXXXXXX/ written by `ldm train`)")
    if tag is None:
        tags = sorted((p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith("_universal")),
                      key=step_of, reverse=True)
        problems = {t: check_complete(root / t) for t in tags}
        usable = [t for t in tags if problems[t] is None]
        if not usable:
            detail = "; ".join(f"{t}: {p}" for t, p in problems.items()) or "no step_* folders"
            raise FileNotFoundError(f"no complete checkpoint under {root} ({detail})")
        tag = usable[0]
        skipped = [t for t in tags if step_of(t) > step_of(tag)]
        for t in skipped:
            warnings.warn(f"skipping checkpoint {t}: {problems[t]}; exporting {tag}", stacklevel=2)
    elif (problem := check_complete(root / tag)) is not None:
        raise FileNotFoundError(f"checkpoint {root / tag} is not usable: {problem}")
    meta = json.loads((root / tag / "meta.json").read_text())
    cfg = build_dataclass(Config, meta["config"])
    return RunCheckpoint(run_dir, tag, root / tag, meta, cfg)


def live_weights(ck: RunCheckpoint) -> dict[str, torch.Tensor]:
    """Full fp32 weights and buffers of the main module, consolidated from DeepSpeed's shards."""
    name = ck.meta["main_module"]
    engine_dir = ck.tag_dir / name
    if int(ck.meta["zero_stage"]) == 0:
        path = engine_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found (DeepSpeed's ZeRO-0 model states of "
                                    f"engine '{name}')")
        # DeepSpeed's own file (pickle); never part of an export.
        state = torch.load(path, map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    world, stage = int(ck.meta["world_size"]), int(ck.meta["zero_stage"])
    # ZeRO-3 partitions the model states too; ZeRO-1/2 keep one model-states file (optimizer states per rank;
    # a bf16 engine may prefix those with "bf16_")
    expected = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3 else \
        ["mp_rank_00_model_states.pt"]
    optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    missing = [f for f in expected if not (engine_dir / f).is_file()]
    missing += [f for f in optim if not (engine_dir / f).is_file() and not (engine_dir / f"bf16_{f}").is_file()]
    if missing:
        raise FileNotFoundError(f"weights files missing in {engine_dir}: {', '.join(missing)} (DeepSpeed ZeRO-{stage} "
                                f"shards of {world} ranks)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.contiguous() for k, v in
            get_fp32_state_dict_from_zero_checkpoint(str(ck.tag_dir), tag=name).items()}


def _main_module_keys(ck: RunCheckpoint) -> set[str] | None:
    """State-dict keys of the main module, from a build on the meta device (None if that fails)."""
    try:
        from .stages import build_models_on_meta

        return set(build_models_on_meta(ck.cfg)[ck.meta["main_module"]].state_dict())
    except Exception:  # an unusual stage: fall back to reading the live weights
        return None


def ema_weights(ck: RunCheckpoint) -> dict[str, torch.Tensor]:
    """EMA parameters (full, fp32) plus what the EMA does not track (buffers, frozen parameters), which
    come from the live weights. When the EMA covers the whole state dict, the (for ZeRO 1-3 costly)
    consolidation of the live weights is skipped."""
    from .ema import EMA

    ema_dir = ck.tag_dir / "ema"
    if not ema_dir.is_dir() or not any(ema_dir.glob("rank_*.safetensors")):
        raise FileNotFoundError(f"EMA weights not found: no {ema_dir}/rank_*.safetensors (export the live weights "
                                f"with --no-ema)")
    ema, _ = EMA.read_full(ema_dir)
    keys = _main_module_keys(ck)
    if keys is not None and keys <= set(ema):
        return ema
    live = live_weights(ck)
    return {**{k: v for k, v in live.items() if k not in ema}, **ema}
