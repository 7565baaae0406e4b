"""Entry point for runtime tests: `python run_toy.py RUN_DIR [key=value ...]`, alone or under torchrun.
Trains ToyStage through the real Trainer/DeepSpeed and, at the end, writes the final live and EMA
weights (gathered) to RUN_DIR/final_{live,ema}.safetensors for comparisons."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from launch.runtime import dist as D  # noqa: E402
from launch.runtime.config import load_config  # noqa: E402
from launch.runtime.train import Trainer, seed_everything  # noqa: E402
from final_weights import save_final_weights  # noqa: E402
from toy import ToyData, ToyStage  # noqa: E402


def main() -> int:
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, [f"run_dir={run_dir}", *overrides], base={"stage": "diffusion", "run_dir": run_dir})
    env = D.init_distributed()
    trainer = None
    try:
        seed_everything(cfg.train.seed)
        stage = ToyStage()
        data = ToyData(cfg.train.seed, env.rank, cfg.train.micro_batch_size)
        val = lambda: iter([next(iter(ToyData(999, env.rank, 4)))])  # noqa: E731
        trainer = Trainer(cfg, env, stage, data, val, eval_module_factory=lambda: ToyStage().net)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / f"pid_rank{env.rank}").write_text(str(__import__("os").getpid()))
        result = trainer.run()
        from launch.runtime.engine import optimizer_state_bytes
        (Path(run_dir) / f"optim_bytes_rank{env.rank}.json").write_text(
            __import__("json").dumps({"bytes": optimizer_state_bytes(trainer.main), "status": result.status,
                                      "exit_code": result.exit_code}))
        save_final_weights(trainer, run_dir, write=result.status == "completed")
        return result.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        D.destroy()


if __name__ == "__main__":
    D.exit_process(main())   # as `ldm train`: skip the interpreter teardown (launch/runtime/dist.py)
