"""The `ldm` command. Each subcommand is a module of this package (`launch/cli/train.py`, ...) defining

    NAME = "train"                     # the subcommand
    HELP = "one line for `ldm --help`"
    def add_arguments(parser): ...     # argparse arguments
    def run(args) -> int: ...          # exit status

Modules are discovered, so a subcommand exists exactly when its module does. Heavy imports
(torch, deepspeed) happen inside `run`, which keeps `ldm --help` fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def _discover():
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found.append(module)
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="ldm", description="Latent text-to-image training: data, autoencoder, diffusion, export, sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for module in _discover():
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        handlers[module.NAME] = module
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    from launch.runtime.configio import ConfigError

    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        import torch

        torch.set_flush_denormal(True)   # CPU: denormal arithmetic is ~100x slower (launch/runtime/train.py)
        return int(handlers[args.command].run(args) or 0)
    except ConfigError as e:
        print(f"ldm {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
