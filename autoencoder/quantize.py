"""Discrete bottlenecks: vector quantization (VQ-VAE) and finite scalar quantization (FSQ).

Both keep a running code-usage histogram as a persistent buffer (so it checkpoints) and report
`usage` (fraction of codes alive) and `perplexity` (exp of the histogram's entropy).

Data parallelism: EMA codebooks, usage histograms and dead-code restarts change state inside
forward from rank-local data. The runtime keeps ranks identical by installing collectives with
`set_collectives(module, all_reduce_sum, broadcast)` (this package never imports
torch.distributed). Without them each rank updates from its own batch only.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

AllReduce = Callable[[torch.Tensor], None]          # in-place sum over ranks
Broadcast = Callable[[torch.Tensor, int], None]     # in-place copy from rank `src`

_DISTANCE_CHUNK = 1 << 24   # max elements of one (rows x codes) distance block (64 MB in fp32)


class _UsageTracked(nn.Module):
    """Running histogram of code assignments, reduced over ranks when collectives are set."""

    def __init__(self, num_codes: int, usage_decay: float, dead_threshold: float):
        super().__init__()
        self.num_codes = num_codes
        self.usage_decay = usage_decay
        self.dead_threshold = dead_threshold
        self.all_reduce_sum: Optional[AllReduce] = None
        self.broadcast: Optional[Broadcast] = None
        # EMA of per-batch assignment frequency (sums to ~1 once warmed up); zeros: nothing seen yet
        self.register_buffer("usage", torch.zeros(num_codes))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.all_reduce_sum is not None:
            self.all_reduce_sum(t)
        return t

    def _record(self, counts: torch.Tensor) -> None:
        freq = counts / counts.sum().clamp_min(1.0)
        usage = self.usage.float().mul(self.usage_decay).add_(freq, alpha=1.0 - self.usage_decay)
        self.usage.copy_(usage)
        self.updates.add_(1)

    def alive(self) -> torch.Tensor:
        return self.usage.float() >= self.dead_threshold / self.num_codes

    @torch.no_grad()
    def usage_stats(self) -> dict[str, torch.Tensor]:
        p = self.usage.float()
        p = p / p.sum().clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        return {"usage": self.alive().float().mean(), "perplexity": entropy.exp()}


def _batch_perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum().clamp_min(1.0)
    return (-(p * p.clamp_min(1e-12).log()).sum()).exp()


class VectorQuantizer(_UsageTracked):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    loss = ||sg[z] - e||^2 (moves the codebook; absent with the EMA codebook)
         + beta * ||z - sg[e]||^2 (the commitment: moves the ENCODER, as in VQ-VAE).
    taming's VectorQuantizer2 (used by LDM) puts beta on the codebook term instead.
    """

    def __init__(self, n_embed: int, dim: int, beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99,
                 restart: bool = False, restart_every: int = 200, dead_threshold: float = 0.03,
                 usage_decay: float = 0.99, recent_size: int | None = None, eps: float = 1e-5):
        super().__init__(n_embed, usage_decay, dead_threshold)
        self.n_embed, self.dim, self.beta = n_embed, dim, beta
        self.ema, self.ema_decay, self.eps = ema, ema_decay, eps
        self.restart, self.restart_every = restart, restart_every
        init = torch.empty(n_embed, dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        if ema:   # the codebook is state, not a parameter: no optimizer ever touches it
            self.register_buffer("embed", init)
            self.register_buffer("cluster_size", torch.ones(n_embed))   # ones: unused codes keep their vector
            self.register_buffer("embed_avg", init.clone())
        else:
            self.embed = nn.Parameter(init)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        # ring buffer of recent encoder outputs to re-seed dead codes from (rank-local, not checkpointed)
        size = recent_size or min(max(2 * n_embed, 4096), 65536)
        self.register_buffer("recent", torch.zeros(size, dim), persistent=False)
        self._recent_filled = 0
        self._recent_ptr = 0

    def extra_repr(self) -> str:
        return f"n_embed={self.n_embed}, dim={self.dim}, beta={self.beta}, ema={self.ema}, restart={self.restart}"

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of `flat` [N, D], in fp32, in chunks."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            e = self.embed.detach().float()
            e2 = e.pow(2).sum(1)
            rows = max(1, _DISTANCE_CHUNK // self.n_embed)
            out = []
            for part in flat.float().split(rows):
                d = part.pow(2).sum(1, keepdim=True) - 2.0 * part @ e.t() + e2
                out.append(d.argmin(1))
            return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B, H, W] -> vectors [B, D, H, W]."""
        return F.embedding(indices, self.embed).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        idx = self.nearest(flat.detach())
        zq = F.embedding(idx, self.embed).view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        commitment = F.mse_loss(z.float(), zq.detach().float())
        if self.ema:
            codebook = commitment.new_zeros(())
        else:
            codebook = F.mse_loss(zq.float(), z.detach().float())
        loss = codebook + self.beta * commitment
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        if self.training and update:
            self._update(flat.detach().float(), idx, counts.clone())
        zq_st = z + (zq - z).detach()   # straight-through: the decoder's gradient reaches the encoder unchanged
        info = {"loss": loss, "codebook_loss": codebook.detach(), "commitment_loss": commitment.detach(),
                "indices": idx.view(b, h, w), "batch_perplexity": _batch_perplexity(counts)}
        info.update(self.usage_stats())
        return zq_st, info

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        if self.ema:
            sums = torch.zeros(self.n_embed, self.dim, device=flat.device).index_add_(0, idx, flat)
            packed = self._reduce(torch.cat([counts, sums.flatten()]))
            counts, sums = packed[: self.n_embed], packed[self.n_embed:].view(self.n_embed, self.dim)
            dk = self.ema_decay
            cluster = self.cluster_size.float().mul(dk).add_(counts, alpha=1 - dk)
            avg = self.embed_avg.float().mul(dk).add_(sums, alpha=1 - dk)
            total = cluster.sum()
            smoothed = (cluster + self.eps) / (total + self.n_embed * self.eps) * total  # Laplace smoothing
            self.cluster_size.copy_(cluster)
            self.embed_avg.copy_(avg)
            self.embed.copy_(avg / smoothed.unsqueeze(1))
        else:
            counts = self._reduce(counts)
        self._record(counts)
        if self.restart:
            self._remember(flat)
            if int(self.updates) % self.restart_every == 0:
                self.restart_dead_codes()

    @torch.no_grad()
    def _remember(self, flat: torch.Tensor) -> None:
        size = self.recent.shape[0]
        take = min(flat.shape[0], max(1, size // 8))   # about eight forwards of history
        rows = flat[torch.randperm(flat.shape[0], device=flat.device)[:take]]
        end = self._recent_ptr + take
        if end <= size:
            self.recent[self._recent_ptr:end] = rows.to(self.recent.dtype)
        else:
            first = size - self._recent_ptr
            self.recent[self._recent_ptr:] = rows[:first].to(self.recent.dtype)
            self.recent[: take - first] = rows[first:].to(self.recent.dtype)
        self._recent_ptr = end % size
        self._recent_filled = min(size, self._recent_filled + take)

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Move every dead code onto a random recent encoder output. Returns how many moved.

        The dead set comes from the (rank-reduced) usage histogram, so every rank takes the same
        branch; rank 0's new vectors are then broadcast. With a learned (non-EMA) codebook this
        writes the parameter in place: fine for plain torch optimizers, but an optimizer holding
        its own master copy (DeepSpeed ZeRO, mixed precision) overwrites it; prefer vq_ema there.
        """
        dead = ~self.alive()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        if self._recent_filled > 0:
            pool = self.recent[: self._recent_filled].float()
            pick = pool[torch.randint(0, pool.shape[0], (n_dead,), device=pool.device)]
            # a little noise so codes re-seeded from the same output do not stay exact twins
            pick = pick + 0.01 * pool.std(0, unbiased=False).clamp_min(1e-6) * torch.randn_like(pick)
            self.embed.data[dead] = pick.to(self.embed.dtype)
            if self.ema:
                self.embed_avg[dead] = pick.to(self.embed_avg.dtype)
                self.cluster_size[dead] = 1.0
        if self.broadcast is not None:
            self.broadcast(self.embed.data, 0)
            if self.ema:
                self.broadcast(self.embed_avg, 0)
                self.broadcast(self.cluster_size, 0)
        # a grace period at uniform frequency, so a fresh code is not declared dead at the next check
        self.usage[dead] = 1.0 / self.n_embed
        self.restarts.add_(n_dead)
        return n_dead


class FSQ(_UsageTracked):
    """Finite scalar quantization: bound each channel with tanh, round to `levels[i]` values.

    No codebook, no auxiliary loss; the code of a latent vector is its mixed-radix index.
    Input and output channels = len(levels); outputs lie in [-1, 1].
    """

    def __init__(self, levels: tuple[int, ...] | list[int], usage_decay: float = 0.99,
                 dead_threshold: float = 0.03, eps: float = 1e-3):
        self.levels = [int(v) for v in levels]   # python ints: no buffer to lose on the meta device
        super().__init__(math.prod(self.levels), usage_decay, dead_threshold)
        self.eps = eps

    def extra_repr(self) -> str:
        return f"levels={self.levels}"

    def _consts(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.tensor(self.levels, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return levels, torch.floor(levels / 2)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        levels, _ = self._consts(z.device)
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)   # centres even level counts on the rounding grid
        return torch.tanh(z + shift) * half - offset

    def codes_to_indices(self, q: torch.Tensor) -> torch.Tensor:
        """Integer grid values [B, C, H, W] -> mixed-radix code indices [B, H, W]."""
        levels, half_width = self._consts(q.device)
        digits = (q + half_width).round().long()
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], device=q.device), 0).view(1, -1, 1, 1)
        return (digits * basis).sum(1)

    def forward(self, z: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            bounded = self.bound(zf)
            q = bounded + (bounded.round() - bounded).detach()   # straight-through rounding
            _, half_width = self._consts(z.device)
            out = (q / half_width).to(z.dtype)
        idx = self.codes_to_indices(q.detach())
        counts = torch.bincount(idx.flatten(), minlength=self.num_codes).float()
        if self.training and update:
            with torch.no_grad():
                self._record(self._reduce(counts.clone()))
        info = {"loss": zf.new_zeros(()), "indices": idx, "batch_perplexity": _batch_perplexity(counts)}
        info.update(self.usage_stats())
        return out, info


def set_collectives(module: nn.Module, all_reduce_sum: Optional[AllReduce], broadcast: Optional[Broadcast]) -> int:
    """Install rank collectives on every quantizer inside `module`. Returns how many were set."""
    n = 0
    for m in module.modules():
        if isinstance(m, _UsageTracked):
            m.all_reduce_sum, m.broadcast = all_reduce_sum, broadcast
            n += 1
    return n
