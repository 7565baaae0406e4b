"""Test job: `python export_train_job.py CONFIG key=value ...`, alone or under torchrun.

Trains exactly as `ldm train` does (launch.runtime.stages + Trainer over DeepSpeed), then writes the main
module's weights gathered IN-PROCESS (Trainer.full_main_state: EMA and live) to
RUN_DIR/inproc_{ema,live}.safetensors, for comparison with what `ldm export` reads from the checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from launch.runtime import dist as D
from launch.runtime import stages
from launch.runtime.config import load_config
from launch.runtime.train import Trainer, seed_everything
from final_weights import save_final_weights  # noqa: E402  (tests/runtime)


def main() -> int:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    stages.check(cfg)
    env = D.init_distributed()
    trainer = None
    try:
        seed_everything(cfg.train.seed)
        stage = stages.build_stage(cfg)
        train, val = stages.build_data(cfg, env)
        trainer = Trainer(cfg, env, stage, train, val, stages.eval_module_factory(cfg),
                          stats_data=stages.stats_data_factory(cfg))
        result = trainer.run()
        save_final_weights(trainer, cfg.run_dir, "inproc")
        return result.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        D.destroy()


if __name__ == "__main__":
    D.exit_process(main())   # as `ldm train`: skip the interpreter teardown (launch/runtime/dist.py)
