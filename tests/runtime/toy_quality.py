"""A tiny flow-matching stage for the quality tests (fixed-t validation, post-hoc EMA): an MLP denoiser
on 8-dim "latents" drawn around four fixed centres, trained with ldm's RectifiedFlow. It has the duck-typed
pieces the runtime's fixed-t validation uses (objective, model_fn, encode_latents, condition)."""
from __future__ import annotations

import torch
from torch import nn

from ldm.objectives import RectifiedFlow

DIM = 8


def _centres() -> torch.Tensor:
    return torch.randn(4, DIM, generator=torch.Generator().manual_seed(77)) * 2


class LatentData:
    """Infinite stream; batch i on rank r is a pure function of (seed, r, i). Resumable like ToyData."""

    def __init__(self, seed: int, rank: int, batch_size: int):
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.index = 0
        self.centres = _centres()

    def batch(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.rank * 7919 + index)
        pick = torch.randint(0, 4, (self.batch_size,), generator=g)
        x = self.centres[pick] + 0.1 * torch.randn(self.batch_size, DIM, generator=g)
        return {"x": x, "key": [f"{self.seed}-{self.rank}-{index}-{i}" for i in range(self.batch_size)]}

    def __iter__(self):
        while True:
            b = self.batch(self.index)
            self.index += 1
            yield b

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def fault_counts(self) -> dict:
        return {}


def held_out(rank: int, batches: int = 2, batch_size: int = 4):
    """A fresh one-pass held-out stream per call (as data_pipeline's eval loader), different per rank."""
    def make():
        data = LatentData(999, rank, batch_size)
        return iter([data.batch(i) for i in range(batches)])
    return make


class Denoiser(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, DIM))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype) / 1000], dim=1))


class FlowStage:
    main_module = "denoiser"

    def __init__(self):
        self.denoiser = Denoiser()
        self.objective = RectifiedFlow(time_sampling="uniform")

    def trainable_modules(self):
        return {"denoiser": self.denoiser}

    def param_groups(self, name):
        return [{"params": list(self.denoiser.parameters())}]

    def setup(self, device):
        pass

    def model_fn(self, net):
        return lambda x, t, cond: net(x, self.objective.net_time(t))

    def encode_latents(self, batch, generator=None):
        return batch["x"].float()

    def condition(self, batch):
        return {}

    def training_step(self, nets, batch, step):
        z = self.encode_latents(batch)
        inputs = self.objective.training_inputs(z)       # global RNG: restored on resume
        pred = self.model_fn(nets["denoiser"])(inputs.x_t, inputs.t, {})
        loss = self.objective.loss(pred, inputs.target, inputs.weight)
        return {"denoiser": loss}, {}

    @torch.no_grad()
    def preview(self, main, batch, seed):
        return torch.zeros(2, 3, 8, 8)
