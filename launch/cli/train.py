"""`ldm train CONFIG [key=value ...]`: either stage, chosen by the config's `stage:`."""
from __future__ import annotations

import argparse
import sys

NAME = "train"
HELP = "train a stage (autoencoder or diffusion) from a config; resumes from RUN_DIR when it can"
DESCRIPTION = """Train the stage named by the config's `stage:` key. Runs as one process, or under
torchrun / srun (launch/local.sh, launch/slurm.sh). When RUN_DIR holds a complete checkpoint the
run resumes from it, also at another world size.

Exit status: 0 done, 2 config error, 3 too many non-finite steps, 4 run directory locked by a live run,
5 checkpoint not written (path and MiB free named; the previous one intact), 6 a rank died or hung
(runtime.collective_timeout_s), 75 preempted (checkpoint saved).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")


def run(args) -> int:
    from launch.runtime.config import load_config
    from launch.runtime.configio import dump_yaml

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    from launch.runtime import stages
    from launch.runtime.engine import check_runtime_config

    check_runtime_config(cfg)
    stages.check(cfg)
    if args.check_config:
        return 0
    from launch.runtime.dist import exit_process
    from launch.runtime.train import run_training

    result = run_training(cfg, stages.build_stage, stages.build_data, stages.eval_module_factory(cfg),
                          stats_data=stages.stats_data_factory(cfg))
    exit_process(result.exit_code)   # every file is written and the process group torn down (run_training)
