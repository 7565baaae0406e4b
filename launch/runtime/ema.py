"""Exponential moving average of the main module's weights, in fp32, partitioned like ZeRO-3.

Under ZeRO-3 a parameter lives on each rank only as its flat fp32 partition inside the
optimizer; we average exactly that partition (`safe_get_local_fp32_param`), so no rank ever
gathers weights per step and the EMA costs 4 bytes/param/world_size. Under ZeRO 0-2 every
rank holds full fp32 parameters and so does the EMA. `full_state_dict()` gathers when needed
(previews, export) and is collective under ZeRO-3: call it on every rank.

Two decay rules (see EMAConfig): EDM2's power function, beta_n = (1 - 1/n)^(gamma + 1) with
gamma chosen for a relative std `sigma_rel`, and a constant decay warmed up as
min(decay, (1 + n) / (10 + n)). n counts updates, i.e. optimizer steps that were applied.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import EMAConfig
from .phema import sigma_rel_to_gamma


def ema_beta(cfg: EMAConfig, num_updates: int) -> float:
    n = num_updates
    if n <= 0:
        return 0.0
    if cfg.kind == "power":
        return (1.0 - 1.0 / n) ** (sigma_rel_to_gamma(cfg.sigma_rel) + 1.0)
    return min(cfg.decay, (1.0 + n) / (10.0 + n)) if cfg.warmup else cfg.decay


def _is_zero3_param(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


class EMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.partitioned = any(_is_zero3_param(p) for _, p in self.params)
        self.gamma = sigma_rel_to_gamma(cfg.sigma_rel) if cfg.kind == "power" else None
        self.num_updates = 0
        self.shadow = {n: self._current(p).detach().clone().float() for n, p in self.params}

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in place of the live ones for the duration (evaluation on every rank, no gather of
        the model): ZeRO 0-2 copy them into the parameters; ZeRO-3 into each parameter's partition, from which
        the engine's forward gathers, and, for parameters held gathered (ZeRO-3's persistent small ones), into
        the full tensor by an all-gather of the partition. The live values are copied back bit for bit after.
        Collective under ZeRO-3: enter on every rank, and call no optimizer step inside."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, p in self.params:
                    if self.partitioned:
                        part = p.ds_tensor.data
                        saved.append((part, part.clone()))
                        part.copy_(self.shadow[name].view(-1)[: part.numel()].view_as(part))
                        if p.data.numel() == p.ds_numel:      # held gathered: refresh the full tensor too
                            full = self._gather_partition(self.shadow[name], p)
                            saved.append((p.data, p.data.clone()))
                            p.data.copy_(full.to(p.data.dtype))
                    else:
                        saved.append((p.data, p.data.clone()))
                        p.data.copy_(self.shadow[name].view_as(p.data))
            yield
        finally:
            with torch.no_grad():
                for target, value in reversed(saved):
                    target.copy_(value)

    @staticmethod
    def _gather_partition(part: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, part.contiguous())
        return torch.cat([t.reshape(-1) for t in pieces])[: p.ds_numel].view(p.ds_shape)

    def _current(self, p: nn.Parameter) -> torch.Tensor:
        if self.partitioned:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        if p.dtype != torch.float32:  # fp16 engine: the fp32 master lives in the optimizer
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(p)
        return p

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Fold the current weights in; call only after an optimizer step that was applied."""
        self.num_updates += 1
        beta = 0.0 if step < self.cfg.start_step else ema_beta(self.cfg, self.num_updates)
        torch._foreach_lerp_([self.shadow[n] for n, _ in self.params],           # one multi-tensor op
                             [self._current(p).float() for _, p in self.params], 1.0 - beta)
        return beta

    # --------------------------------------------------------------------- full weights

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights by parameter name (collective under ZeRO-3)."""
        if not self.partitioned:
            return {n: t.clone() for n, t in self.shadow.items()}
        out = {}
        for name, p in self.params:
            out[name] = self._gather_partition(self.shadow[name], p).clone()
        return out

    # --------------------------------------------------------------------- save / load

    def save(self, directory: Path, rank: int) -> None:
        """Partitioned: one file per rank. Replicated: rank 0 writes the only file."""
        from safetensors.torch import save_file

        if not self.partitioned and rank != 0:
            return
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"num_updates": str(self.num_updates), "partitioned": str(self.partitioned),
                "world_size": str(dist.get_world_size() if dist.is_initialized() else 1),
                "shapes": json.dumps({n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.params})}
        save_file({n: t.contiguous() for n, t in self.shadow.items()},
                  str(directory / f"rank_{rank if self.partitioned else 0:05d}.safetensors"), metadata=meta)

    @staticmethod
    def read_full(directory: Path) -> tuple[dict[str, torch.Tensor], int]:
        """Full EMA weights from a saved checkpoint at any world size (no process group needed)."""
        from safetensors import safe_open

        files = sorted(directory.glob("rank_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no EMA files in {directory}")
        with safe_open(str(files[0]), "pt") as f:
            meta = f.metadata()
        shapes = json.loads(meta["shapes"])
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in shapes}
        for path in files if meta["partitioned"] == "True" else files[:1]:
            with safe_open(str(path), "pt") as f:
                for n in shapes:
                    parts[n].append(f.get_tensor(n))
        full = {}
        for n, shape in shapes.items():
            flat = torch.cat([t.reshape(-1) for t in parts[n]])
            full[n] = flat[: math.prod(shape)].view(shape).clone()
        return full, int(meta["num_updates"])

    def load(self, directory: Path, rank: int, world_size: int) -> None:
        from safetensors import safe_open

        with safe_open(str(sorted(directory.glob("rank_*.safetensors"))[0]), "pt") as f:
            meta = f.metadata()
        same_layout = (meta["partitioned"] == str(self.partitioned)
                       and (not self.partitioned or int(meta["world_size"]) == world_size))
        if same_layout:
            from safetensors.torch import load_file

            tensors = load_file(str(directory / f"rank_{rank if self.partitioned else 0:05d}.safetensors"))
            for n in self.shadow:
                self.shadow[n].copy_(tensors[n])
            self.num_updates = int(meta["num_updates"])
            return
        # Another world size or ZeRO stage: rebuild the full EMA and cut out this rank's piece.
        full, self.num_updates = self.read_full(directory)
        for n, p in self.params:
            if self.partitioned:
                size = self.shadow[n].numel()
                flat = torch.zeros(size * world_size)
                src = full[n].reshape(-1)
                flat[: src.numel()] = src
                self.shadow[n].copy_(flat[rank * size:(rank + 1) * size].view_as(self.shadow[n]))
            else:
                self.shadow[n].copy_(full[n].view_as(self.shadow[n]))
