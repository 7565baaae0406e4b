"""One rank of the ZeRO memory benchmark (started by `bench/zero_memory.py` under torchrun, 2 ranks, gloo).

For each ZeRO stage: build the UNet, a real DeepSpeed engine through `launch/runtime/engine.py` (torch AdamW, as
the runtime does), run one training step, and count the bytes this rank holds:
- params: the module's parameters as this rank stores them (ZeRO-3: its partition `ds_tensor`);
- master: fp32 partitions the ZeRO optimizer keeps beside the module (flat copies, stages 1-3);
- grads: every gradient tensor alive after backward and before the step (p.grad, reduced partitions,
  reduction buckets), unique storages only;
- optimizer: AdamW state (exp_avg, exp_avg_sq, step), `launch.runtime.engine.optimizer_state_bytes`.
Each rank writes OUT/rank{r}.json. Engines and the process group are destroyed explicitly (gloo can abort
at interpreter exit otherwise, ARCHITECTURE.md §8).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _flatten(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten(v)


def param_bytes(module) -> int:
    total = 0
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = t if t is not None else p.data
        total += t.numel() * t.element_size()
    return total


def master_bytes(engine, module) -> int:
    opt = engine.optimizer
    held = set(_storages(p.data for p in module.parameters()))
    found = {}
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        found.update(_storages(_flatten(getattr(opt, name, None))))
    return sum(n for ptr, n in found.items() if ptr not in held)


def grad_bytes(engine, module) -> dict:
    opt = engine.optimizer
    parts = {"param.grad": _storages(p.grad for p in module.parameters() if p.grad is not None)}
    for name in ("averaged_gradients", "grads_in_partition", "ipg_buffer", "grad_partitions_flat_buffer",
                 "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
        if hasattr(opt, name):
            parts[name] = _storages(_flatten(getattr(opt, name)))
    seen: dict[int, int] = {}
    for storages in parts.values():
        seen.update(storages)
    return {"total": sum(seen.values()), "by_holder": {k: sum(v.values()) for k, v in parts.items() if v}}


def measure_stage(stage: int, unet_kw: dict, batch: int, env) -> dict:
    from launch.runtime.config import Config
    from launch.runtime.engine import build_engine, optimizer_state_bytes
    from ldm.config import UNetConfig
    from ldm.unet import UNet

    cfg = Config(stage="diffusion", run_dir="unused")
    cfg.deepspeed.zero_stage = stage
    cfg.train.micro_batch_size = batch
    torch.manual_seed(0)
    ucfg = UNetConfig(**unet_kw)
    module = UNet(ucfg)
    n_params = sum(p.numel() for p in module.parameters())
    engine = build_engine(module, [{"params": [p for p in module.parameters()]}], cfg)
    g = torch.Generator().manual_seed(1 + env.rank)
    s = ucfg.sample_size
    x = torch.randn(batch, ucfg.in_channels, s, s, generator=g)
    ctx = torch.randn(batch, 77, ucfg.context_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    loss = engine(x, t, ctx).square().mean()
    engine.backward(loss)
    grads = grad_bytes(engine, engine.module)
    engine.step()
    out = {"stage": stage, "rank": env.rank, "params": n_params, "param_bytes": param_bytes(engine.module),
           "master_bytes": master_bytes(engine, engine.module), "grad_bytes": grads["total"],
           "grad_bytes_by_holder": grads["by_holder"], "optimizer_bytes": optimizer_state_bytes(engine)}
    out["total_bytes"] = out["param_bytes"] + out["master_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    engine.destroy()
    del engine, module
    gc.collect()
    return out


def main(argv=None) -> int:
    from launch.runtime import dist as D

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="JSON: {unet: {...}, batch: N, stages: [...]}")
    args = p.parse_args(argv)
    spec = json.loads(args.config)
    torch.set_num_threads(1)
    env = D.init_distributed(timeout_s=600)
    try:
        results = [measure_stage(s, spec["unet"], spec["batch"], env) for s in spec["stages"]]
        Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(results))
    finally:
        D.destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    raise SystemExit(main())
