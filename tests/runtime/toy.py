"""A tiny regression stage and a deterministic, resumable data stream, to test the runtime's
mechanics (resume, ZeRO, signals, NaN guard) in seconds. The real stages are tested elsewhere."""
from __future__ import annotations

import os

import torch
from torch import nn


class ToyData:
    """Infinite stream of (x, y = x @ W_true) batches; batch i on rank r is a pure function of (seed, r, i)."""

    def __init__(self, seed: int, rank: int, batch_size: int, dim: int = 8):
        self.seed, self.rank, self.batch_size, self.dim = seed, rank, batch_size, dim
        self.index = 0
        g = torch.Generator().manual_seed(1234)
        self.w_true = torch.randn(dim, dim, generator=g) / dim ** 0.5

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.rank * 7919 + self.index)
            x = torch.randn(self.batch_size, self.dim, generator=g)
            self.index += 1
            yield {"x": x, "y": x @ self.w_true}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def fault_counts(self) -> dict:
        return {}


class ToyNet(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class ToyStage:
    main_module = "net"

    def __init__(self, dim: int = 8, hidden: int = 64):
        self.net = ToyNet(dim, hidden)
        # Injected faults, read from the environment so torchrun-launched tests can set them.
        self.nan_steps = {int(s) for s in os.environ.get("TOY_NAN_STEPS", "").split(",") if s}
        self.nan_micro = {int(s) for s in os.environ.get("TOY_NAN_MICRO", "").split(",") if s}
        self.sleep_s = float(os.environ.get("TOY_SLEEP_S", "0"))
        self.calls = 0

    def trainable_modules(self):
        return {"net": self.net}

    def param_groups(self, name):
        return [{"params": [p for p in self.net.parameters() if p.requires_grad]}]

    def setup(self, device):
        pass

    def training_step(self, nets, batch, step):
        if self.sleep_s:
            import time
            time.sleep(self.sleep_s)
        pred = nets["net"](batch["x"])
        noise = torch.randn_like(pred) * 0.01   # consumes the global RNG: resume must restore it
        loss = (pred + noise - batch["y"]).pow(2).mean()
        self.calls += 1
        if step in self.nan_steps or (self.calls - 1) in self.nan_micro:
            loss = loss * float("nan")
        return {"net": loss}, {"pred_std": pred.detach().std()}

    @torch.no_grad()
    def validation_step(self, nets, batch, seed):
        return {"loss": float((nets["net"](batch["x"]) - batch["y"]).pow(2).mean())}

    @torch.no_grad()
    def preview(self, main, batch, seed):
        return torch.zeros(2, 3, 8, 8)
