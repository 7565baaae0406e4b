"""A training entry point with `ldm train`'s command line (CONFIG [key=value ...], --print-config,
--check-config) that trains the runtime tests' toy stage through the real runtime and DeepSpeed
(tests/runtime/run_toy.py). The Slurm tests run it through LDM_TRAIN_ENTRY, the launch scripts'
hook for a custom training entry point, until the stage-two demo config exists."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))


def main(argv: list[str]) -> int:
    from launch.config import ConfigError, load_config
    from launch.configio import dump_yaml

    flags = {a for a in argv if a.startswith("--")}
    words = [a for a in argv if not a.startswith("--")]
    if not words:
        print("usage: toy_entry.py CONFIG [key=value ...] [--print-config | --check-config]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(words[0], words[1:])
    except ConfigError as e:
        print(f"toy_entry: config error: {e}", file=sys.stderr)
        return 2
    if "--print-config" in flags:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    if "--check-config" in flags:
        return 0
    print(f"[toy] rank {os.environ.get('RANK', 0)} of world {os.environ.get('WORLD_SIZE', 1)} on node "
          f"{os.environ.get('SLURMD_NODENAME', '-')} pid {os.getpid()}", flush=True)
    import run_toy

    run_toy.load_config = lambda *args, **kwargs: cfg   # the config above, YAML file included
    sys.argv = [run_toy.__file__, str(cfg.run_dir)]
    return run_toy.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
