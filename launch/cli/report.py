"""`ldm report RUN_DIR [--out FILE.html]`: the run report page (launch/report/html.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "report"
HELP = "write a self-contained HTML report of a run directory (curves, samples, config, checkpoints)"
DESCRIPTION = """Render RUN_DIR's metrics.jsonl, samples/, config.yaml and checkpoints/ into one HTML page that opens
from disk (plots embedded as PNG; nothing fetched at view time). Default output RUN_DIR/report.html, which the
training runtime also rewrites at each checkpoint. Exit status: 0 written, 2 RUN_DIR is not a run directory."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html)")


def run(args) -> int:
    from launch.report.html import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "config.yaml").is_file():
        print(f"ldm report: {run_dir} holds neither metrics.jsonl nor config.yaml", file=sys.stderr)
        return 2
    print(write_report(run_dir, args.out))
    return 0
