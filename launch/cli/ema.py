"""`ldm ema RUN_DIR --sigma-rel 0.05 0.1 0.2`: EMAs of any length, reconstructed after training from the run's
post-hoc EMA snapshots (EDM2; launch/runtime/posthoc.py, launch/runtime/phema.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "ema"
HELP = "reconstruct post-hoc EMA weights of any sigma_rel from a run's snapshots (EDM2)"
DESCRIPTION = """Reconstruct EMA weights of the given relative stds from RUN_DIR/phema/ (snapshots of the run's
power-function EMA profiles, ema.posthoc in the config) by EDM2's least-squares solve, at the time of the
newest snapshot (or --step). Writes, per sigma_rel:

  OUT/ema_sigma<S>.safetensors   full fp32 weights of the trained parameters (metadata: step, sigma_rel)
  OUT/posthoc.json               the snapshots used and each one's coefficient

OUT defaults to RUN_DIR/posthoc_ema. Exit status: 0 written, 2 no snapshots (or none at --step).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--sigma-rel", type=float, nargs="+", default=None, dest="sigma_rels",
                   help="relative stds to reconstruct (each in (0, 0.28); default 0.05 0.1 0.2)")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this snapshot's step (default newest)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/posthoc_ema)")
    p.add_argument("--sweep", action="store_true",
                   help="score each reconstruction (--sigma-rel, default a sweep set) by the fixed-t validation "
                        "loss on the run's held-out data and name the best (writes OUT/sweep.json)")


def run(args) -> int:
    from safetensors.torch import save_file

    from launch.runtime.posthoc import DEFAULT_SWEEP, reconstruct, sweep

    if args.sigma_rels is None:
        args.sigma_rels = list(DEFAULT_SWEEP) if args.sweep else [0.05, 0.1, 0.2]
    for s in args.sigma_rels:
        if not 0 < s < 0.28:
            print(f"ldm ema: --sigma-rel {s}: must lie in (0, 0.28)", file=sys.stderr)
            return 2
    if args.sweep:
        try:
            result = sweep(args.run_dir, list(args.sigma_rels), args.step)
        except FileNotFoundError as e:
            print(f"ldm ema: {e}", file=sys.stderr)
            return 2
        for s, loss in result["losses"].items():
            print(f"sigma_rel {s:g}: val_loss {loss:.6f}{'  <- best' if s == result['best'] else ''}")
        out = Path(args.out) if args.out else Path(args.run_dir) / "posthoc_ema"
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps({**result, "losses": {f"{k:g}": v for k, v in
                                                                            result["losses"].items()}}, indent=1))
        print(f"best sigma_rel {result['best']:g} (step {result['step']}); export it with "
              f"ldm export {args.run_dir} OUT --ema-sigma-rel {result['best']:g}")
        return 0
    try:
        weights, info = reconstruct(args.run_dir, list(args.sigma_rels), args.step)
    except FileNotFoundError as e:
        print(f"ldm ema: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "posthoc_ema"
    out.mkdir(parents=True, exist_ok=True)
    for s, state in weights.items():
        path = out / f"ema_sigma{s:g}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path),
                  metadata={"step": str(info["step"]), "sigma_rel": f"{s:g}", "ema_updates": str(info["t"])})
        print(f"sigma_rel {s:g}: {path}")
    (out / "posthoc.json").write_text(json.dumps(info, indent=1))
    return 0
