"""Entry point for the quality tests: `python run_quality.py RUN_DIR [key=value ...]`, alone or under torchrun.
Trains toy_quality.FlowStage through the real Trainer/DeepSpeed; at the end writes the final live and EMA
weights (gathered) to RUN_DIR/final_{live,ema}.safetensors, and the validation of the final weights run twice
more plus the fixed set's digest to RUN_DIR/val_rank{r}.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


from launch.runtime import dist as D  # noqa: E402
from launch.runtime.config import load_config  # noqa: E402
from launch.runtime.train import Trainer, seed_everything  # noqa: E402
from final_weights import save_final_weights  # noqa: E402
from toy_quality import FlowStage, LatentData, held_out  # noqa: E402


def main() -> int:
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, [f"run_dir={run_dir}", *overrides], base={"stage": "diffusion", "run_dir": run_dir})
    env = D.init_distributed()
    trainer = None
    try:
        seed_everything(cfg.train.seed)
        stage = FlowStage()
        data = LatentData(cfg.train.seed, env.rank, cfg.train.micro_batch_size)
        trainer = Trainer(cfg, env, stage, data, held_out(env.rank), eval_module_factory=lambda: FlowStage().denoiser)
        result = trainer.run()
        save_final_weights(trainer, run_dir, write=result.status == "completed")
        if trainer.validator is not None:
            twice = [trainer.validator.evaluate(trainer.engines, trainer.ema) for _ in range(2)]
            (Path(run_dir) / f"val_rank{env.rank}.json").write_text(json.dumps(
                {"twice": twice, "digest": trainer.validator.digest()}))
        return result.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        D.destroy()


if __name__ == "__main__":
    D.exit_process(main())   # as `ldm train`: skip the interpreter teardown (launch/runtime/dist.py)
