"""Training entry for the fault tests: `python fault_job.py CONFIG.yaml [key=value ...] [--print-config|--check-config]`,
alone, under torchrun, or as launch/local.sh's LDM_TRAIN_ENTRY (it takes `ldm train`'s command line). Trains
tests/runtime/toy.py's ToyStage through the real Trainer with the process-group timeout from the config
(runtime.collective_timeout_s), as `ldm train` does, writes RUN_DIR/pid_rank{R} for the tests to aim at and,
when the run completes, RUN_DIR/final_live.safetensors (the gathered live weights)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.runtime import dist as D  # noqa: E402
from launch.runtime.config import load_config  # noqa: E402
from launch.runtime.configio import dump_yaml  # noqa: E402
from launch.runtime.train import Trainer, seed_everything  # noqa: E402
from final_weights import save_final_weights  # noqa: E402
from toy import ToyData, ToyStage  # noqa: E402


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    config, *overrides = [a for a in argv if not a.startswith("--")]
    cfg = load_config(config, overrides)
    if "--print-config" in flags:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    if "--check-config" in flags:
        return 0
    env = D.init_distributed(timeout_s=cfg.runtime.collective_timeout_s)
    trainer = None
    try:
        seed_everything(cfg.train.seed)
        data = ToyData(cfg.train.seed, env.rank, cfg.train.micro_batch_size)
        val = lambda: iter([next(iter(ToyData(999, env.rank, 4)))])  # noqa: E731
        trainer = Trainer(cfg, env, ToyStage(), data, val, eval_module_factory=lambda: ToyStage().net)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / f"pid_rank{env.rank}").write_text(str(os.getpid()))
        result = trainer.run()
        if result.status == "completed":   # final live weights, gathered, for bit-equality checks
            save_final_weights(trainer, cfg.run_dir, ema=False)
        return result.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        D.destroy()


if __name__ == "__main__":
    D.exit_process(main(sys.argv[1:]))   # as `ldm train` (launch/runtime/dist.py)
