"""Job for tests/plan/test_plan_model_states.py: `python plan_state_job.py OUT_DIR [key=value ...]`, alone or
under torchrun, with PLAN_MODELS="name:config.yaml,..." (and PLAN_ZERO_STAGES="0,1,2,3"). For each model and
ZeRO stage it builds the config's denoiser into a real DeepSpeed engine
through launch/runtime/engine.py (the stage's own parameter groups, torch AdamW) and an EMA through launch/runtime/ema.py,
runs two optimizer steps so every lazily created buffer exists, then one more step's micro-steps. After a
non-boundary micro-step's backward it records what gradient accumulation holds ("accumulating"); after the
boundary's backward (gradients reduced, step not yet taken: gradients and optimizer state both alive) it
records what this rank holds ("roles": bytes by role from launch.plan.measure.engine_state_bytes) and the
total of every tensor storage alive in the process that was not alive before the model was built
("live_total"), in OUT_DIR/{name}_zero{Z}_rank{R}.json."""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.runtime import dist as D  # noqa: E402
from launch.runtime.config import load_config  # noqa: E402
from launch.runtime.ema import EMA  # noqa: E402
from launch.runtime.engine import build_engine  # noqa: E402
from launch.plan.measure import denoiser_inputs, engine_state_bytes, live_tensor_bytes  # noqa: E402


def one_stage(cfg, zero: int, env, out_dir: Path, name: str) -> None:
    import dataclasses

    from ldm.objectives import build_objective
    from ldm.training import DiffusionStage, build_denoiser, latent_shape

    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=zero))
    gc.collect()
    before = live_tensor_bytes()
    torch.manual_seed(0)
    net = build_denoiser(cfg.denoiser)
    stage = DiffusionStage(net, build_objective(cfg.objective), conditioning=cfg.conditioning,
                           latents=cfg.latents, sampling=cfg.sampling)
    engine = build_engine(net, stage.param_groups("denoiser"), cfg)
    ema = EMA(engine.module, cfg.ema) if cfg.ema.enabled else None
    _, h, w = latent_shape(cfg.denoiser)
    batch = cfg.train.micro_batch_size

    def forward_backward(seed):
        inputs = denoiser_inputs(cfg.denoiser, batch, (h, w), seed=seed + env.rank)
        loss = engine(**inputs).float().square().mean()
        engine.backward(loss)

    accum = cfg.train.grad_accum_steps
    for i in range(2):
        for micro in range(accum):
            forward_backward(10 * i + micro)
            engine.step()                      # DeepSpeed applies it at the accumulation boundary only
        if ema is not None:
            ema.update(i)
    record = {"zero": zero, "rank": env.rank, "world": env.world_size, "accum": accum,
              "numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())}
    if accum > 1:                              # between micro-steps: what accumulation holds
        forward_backward(20)
        gc.collect()
        record["accumulating"] = engine_state_bytes(engine, ema)
        engine.step()
        for micro in range(1, accum - 1):
            forward_backward(20 + micro)
            engine.step()
    forward_backward(29)                       # the boundary's backward: gradients reduced, step not taken
    gc.collect()
    detail: dict = {}
    record["roles"] = engine_state_bytes(engine, ema, detail)
    record["buffer_attrs"] = detail
    after = live_tensor_bytes()
    record["live_total"] = sum(n for k, n in after.items() if k not in before)
    (out_dir / f"{name}_zero{zero}_rank{env.rank}.json").write_text(json.dumps(record))
    engine.step()
    engine.destroy()
    del engine, ema, stage, net
    gc.collect()


def main() -> int:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    out_dir.mkdir(parents=True, exist_ok=True)
    models = [m.split(":", 1) for m in os.environ["PLAN_MODELS"].split(",")]
    env = D.init_distributed()
    try:
        for name, config in models:
            cfg = load_config(config, overrides)
            for zero in [int(z) for z in os.environ.get("PLAN_ZERO_STAGES", "0,1,2,3").split(",")]:
                one_stage(cfg, zero, env, out_dir, name)
    finally:
        D.destroy()
    return 0


if __name__ == "__main__":
    D.exit_process(main())   # as `ldm train`: skip the interpreter teardown (launch/runtime/dist.py)
