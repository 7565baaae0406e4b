"""Disk a run writes for EDM2 post-hoc EMA (launch/runtime/posthoc.py): the snapshots under RUN_DIR/phema/.

Every `ema.posthoc.snapshot_every` optimizer steps (0: train.checkpoint_every) and at the last step, every
profile of `ema.posthoc.sigma_rels` is written as it stands: the fp32 shadow of each trainable parameter of
the main module (launch/runtime/ema.py keeps it in float32 whatever train.precision is). Under ZeRO 0-2 rank 0
writes one full file per profile; under ZeRO-3 each rank writes its partition, and DeepSpeed pads every
parameter to a multiple of the world size before cutting it (ceil(n / N) elements per rank), so

    bytes per profile   = 4 * sum_p n_p                  (ZeRO 0-2)
                        = 4 * sum_p N * ceil(n_p / N)    (ZeRO-3, N ranks)
    bytes per snapshot  = profiles * bytes per profile
    snapshots per run   = ceil(train.max_steps / every)  (steps every, 2 every, ... and the last one)
    total               = snapshots per run * bytes per snapshot

Tensor data only: each safetensors file adds a JSON header (each tensor's name, shape and offsets, and the
shapes again in the metadata: about 135 bytes per tensor) and each snapshot a small snapshot.json; on the demo's
2.3 M-parameter UNet (212 tensors) that is 0.6 % in 4 files, 0.9 % in 6 (tests/plan/), less on larger models.
Checkpoints hold each profile's running state once more (`ema_phema_<sigma>/`), overwritten per checkpoint and
counted with the checkpoints, not here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from .zero import ParamInfo

BYTES_PER_ELEMENT = 4          # the profiles are fp32 (launch/runtime/ema.py: shadow = ....float())
SAVED_DTYPE = "float32"


def profile_elements(params: ParamInfo, zero_stage: int, world: int) -> int:
    """Elements one profile's snapshot holds over all ranks' files (ZeRO-3 pads each parameter)."""
    numels = [n for group in params.group_numels for n in group]
    if zero_stage == 3 and world > 1:
        return sum(world * math.ceil(n / world) for n in numels)
    return sum(numels)


def posthoc_storage(params: ParamInfo, sigma_rels: Sequence[float], snapshot_every: int, checkpoint_every: int,
                    max_steps: int, zero_stage: int, world: int, enabled: bool = True) -> Optional[dict]:
    """The snapshot storage of one run (JSON-able), or None when post-hoc EMA is off."""
    if not enabled or not sigma_rels:
        return None
    every = snapshot_every or checkpoint_every
    per_profile = BYTES_PER_ELEMENT * profile_elements(params, zero_stage, world)
    per_snapshot = len(sigma_rels) * per_profile
    snapshots = math.ceil(max_steps / every)
    partitioned = zero_stage == 3 and world > 1
    return {"sigma_rels": [float(s) for s in sigma_rels], "dtype": SAVED_DTYPE,
            "snapshot_every": every,
            "snapshot_every_key": "ema.posthoc.snapshot_every" if snapshot_every else "train.checkpoint_every",
            "elements_per_profile": per_profile // BYTES_PER_ELEMENT,
            "bytes_per_profile": per_profile, "bytes_per_snapshot": per_snapshot,
            "files_per_snapshot": len(sigma_rels) * (world if partitioned else 1),
            "snapshots_per_run": snapshots, "total_bytes": snapshots * per_snapshot}


def format_bytes(b: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def format_line(s: Optional[dict]) -> str:
    if s is None:
        return "post-hoc EMA snapshots: off (ema.posthoc.sigma_rels empty or ema.enabled false)"
    sig = ", ".join(f"{x:g}" for x in s["sigma_rels"])
    return (f"post-hoc EMA snapshots (RUN_DIR/phema/): {format_bytes(s['bytes_per_snapshot'])} per snapshot "
            f"({len(s['sigma_rels'])} profiles [sigma_rel {sig}] x {s['elements_per_profile']:,d} {s['dtype']}) "
            f"x {s['snapshots_per_run']:,d} snapshots (every {s['snapshot_every']:,d} steps, "
            f"{s['snapshot_every_key']}) = {format_bytes(s['total_bytes'])} per run")
