"""Held-out validation on a fixed set, the same every evaluation (SD3 / MLPerf style), on every rank.

The set. The first `validation.batches` batches of each rank's held-out stream (data.val_urls) are read once,
on first use, and shared between ranks (an all-gather of the batches, so a rank without a held-out shard of
its own still takes part); batch j of that list, ordered by rank and then position, is evaluated by rank
j mod world size. Every rank runs the same number of forwards (a rank short of one repeats a batch with weight
0), because a ZeRO-3 forward is collective; each rank sums its losses, and one all-reduce of the sums and the
sample counts gives every rank the same means. Nothing depends on a rank-0-only path. The set is a function
of the held-out data, the micro-batch size and the world size, so a resumed run at the same world size
evaluates the very same samples.

The losses. A stage with a diffusion objective (`objective`, `model_fn`, `encode_latents`, `condition`, as
ldm/training.py's DiffusionStage; or one defining `fixed_t_losses` itself) is scored at `NUM_TIMES`
equidistant unit times u_k = (k + 1/2) / 8 (0.0625 ... 0.9375; u = 1 is pure noise): the per-sample objective
loss, with the noise of sample i at time k drawn from a generator seeded by (train.seed, sample key or index,
k), and any posterior sampling of the latents from one seeded by the batch's first sample, so that an
evaluation repeated on the same weights is bit-equal. Logged as `val/val_loss` (the mean over the eight
times) and `val/val_loss_u<u>`. Other stages (the autoencoder: L1, PSNR, SSIM, LPIPS when the stage has
the real network, KL) give their deterministic `validation_step` means, weighted by batch size, as
`val/<name>`. With an EMA, the same pass on the EMA weights (swapped into the engines, see
EMA.swapped_in) is logged as `val_ema/...`.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import zlib
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist

from . import dist as D

NUM_TIMES = 8
UNIT_TIMES = tuple((k + 0.5) / NUM_TIMES for k in range(NUM_TIMES))


def _sample_keys(batch: Mapping[str, Any], first_index: int) -> list[str]:
    n = _batch_size(batch)
    keys = batch.get("key")
    if isinstance(keys, (list, tuple)) and len(keys) == n:
        return [str(k) for k in keys]
    return [f"#{first_index + i}" for i in range(n)]


def _batch_size(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    for v in batch.values():
        if isinstance(v, (list, tuple)):
            return len(v)
    raise ValueError("cannot tell the size of a held-out batch: it has no tensor or list")


def sample_seed(seed: int, key: str, k: int) -> int:
    """Seed of the noise of sample `key` at time index `k`: a pure function of its arguments."""
    return (zlib.crc32(f"{seed}/{key}".encode()) * 1009 + k) % (2 ** 62)


def diffusion_fixed_t_losses(stage, nets: Mapping[str, torch.nn.Module], batch: dict,
                             unit_times: tuple[float, ...], seeds: list[int]) -> torch.Tensor:
    """Per-sample losses [B, len(unit_times)] of a stage with an ldm objective (see the module docstring)."""
    if hasattr(stage, "fixed_t_losses"):
        return stage.fixed_t_losses(nets, batch, unit_times, seeds)
    obj = stage.objective
    fn = stage.model_fn(nets[stage.main_module])
    z = stage.encode_latents(batch, generator=torch.Generator().manual_seed(seeds[0]))
    cond = stage.condition(batch)
    n = z.shape[0]
    columns = []
    for k, u in enumerate(unit_times):
        t = obj.from_unit_time(torch.full((n,), u, device=z.device))
        noise = torch.cat([obj.sample_noise(z[i:i + 1], torch.Generator().manual_seed(seeds[i] + k))
                           for i in range(n)])
        inputs = obj.training_inputs(z, t=t, noise=noise)
        pred = fn(inputs.x_t, inputs.t, cond)
        columns.append(obj.per_sample_loss(pred, inputs.target) * inputs.weight.float())
    return torch.stack(columns, dim=1).float()


def is_diffusion_stage(stage) -> bool:
    return hasattr(stage, "fixed_t_losses") or all(
        hasattr(stage, a) for a in ("objective", "model_fn", "encode_latents", "condition"))


def _to(batch: Mapping[str, Any], device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Validator:
    def __init__(self, stage, env: D.DistEnv, val_data: Callable[[], Iterable], *, every: int, batches: int,
                 seed: int, precision: str = "fp32", log: Callable[[str], None] = print):
        self.stage, self.env, self.val_data = stage, env, val_data
        self.every, self.max_batches, self.seed, self.precision = every, batches, seed, precision
        self.log = log
        self.diffusion = is_diffusion_stage(stage)
        self._mine: Optional[list[tuple[dict, list[int], float]]] = None
        self._digest = ""

    @classmethod
    def build(cls, cfg, env: D.DistEnv, stage, val_data, log) -> Optional["Validator"]:
        every = cfg.validation.every if cfg.validation.every is not None else cfg.train.checkpoint_every
        if not every or val_data is None:
            return None
        return cls(stage, env, val_data, every=every, batches=cfg.validation.batches, seed=cfg.train.seed,
                   precision=cfg.train.precision, log=log)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    # ------------------------------------------------------------------ the fixed set (collective, once)

    def _read_local(self) -> list[dict]:
        local = []
        try:
            with torch.random.fork_rng(devices=[]):
                for i, batch in enumerate(self.val_data()):
                    if i >= self.max_batches:
                        break
                    local.append({k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in batch.items()})
        except ValueError as e:   # e.g. this rank gets no held-out shard: the others' batches are shared
            self.log(f"validation: rank {self.env.rank} reads no held-out batch ({e})")
        return local

    def fixed_set(self) -> list[tuple[dict, list[int], float]]:
        """This rank's (batch, per-sample seeds, weight) triples; collective on first call."""
        if self._mine is not None:
            return self._mine
        local = self._read_local()
        world = self.env.world_size
        if world > 1 and dist.is_initialized():
            gathered: list = [None] * world
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        everything = [b for part in gathered for b in part]
        h = hashlib.sha256()
        triples, index = [], 0
        for b in everything:
            keys = _sample_keys(b, index)
            index += len(keys)
            seeds = [sample_seed(self.seed, key, 0) for key in keys]
            h.update(repr(keys).encode())
            for v in b.values():
                if torch.is_tensor(v):
                    h.update(v.contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
            triples.append((b, seeds, 1.0))
        mine = triples[self.env.rank::world]
        rounds = math.ceil(len(triples) / world) if triples else 0
        while triples and len(mine) < rounds:
            mine.append((triples[0][0], triples[0][1], 0.0))   # keeps ZeRO-3's collective forwards in step
        self._mine, self._digest = mine, h.hexdigest()
        if not triples:
            self.log("validation: no held-out batches; validation is skipped")
        else:
            self.log(f"validation: fixed held-out set of {index} samples in {len(triples)} batches "
                     f"(digest {self._digest[:12]})")
        return mine

    def digest(self) -> str:
        """sha256 of the fixed set's keys and tensors (the same on every rank and after a resume)."""
        self.fixed_set()
        return self._digest

    # ------------------------------------------------------------------ evaluation (collective)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _pass(self, nets: Mapping[str, torch.nn.Module], prefix: str) -> dict[str, float]:
        mine = self.fixed_set()
        if not mine:
            return {}
        sums: dict[str, float] = {}
        count = 0.0
        for j, (batch, seeds, weight) in enumerate(mine):
            batch = _to(batch, self.env.device)
            with self._autocast():
                if self.diffusion:
                    losses = diffusion_fixed_t_losses(self.stage, nets, batch, UNIT_TIMES, seeds).double()
                    n = losses.shape[0]
                    values = {f"val_loss_u{u:g}": float(losses[:, k].sum()) for k, u in enumerate(UNIT_TIMES)}
                    values["val_loss"] = float(losses.mean(dim=1).sum())
                else:
                    n = _batch_size(batch)
                    out = self.stage.validation_step(nets, batch, seed=self.seed + j)
                    values = {k: float(v) * n for k, v in out.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + weight * v
            count += weight * n
        names = sorted(sums)
        t = torch.tensor([sums[k] for k in names] + [count], dtype=torch.float64, device=self.env.device)
        D.all_reduce_sum_(t)
        total = float(t[-1])
        return {f"{prefix}{k}": float(t[i]) / total for i, k in enumerate(names)}

    def evaluate(self, engines: Mapping[str, torch.nn.Module], ema=None) -> dict[str, float]:
        """Means over the fixed set for the live weights (`val/`) and, given an EMA, its weights (`val_ema/`).
        Leaves the global RNG streams, the modules' train/eval modes and the live weights as they were."""
        modes = {name: m.training for name, m in engines.items()}
        for m in engines.values():
            m.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                record = self._pass(engines, "val/")
                if ema is not None and record:
                    with ema.swapped_in():
                        record.update(self._pass(engines, "val_ema/"))
        finally:
            for name, m in engines.items():
                m.train(modes[name])
        return record
