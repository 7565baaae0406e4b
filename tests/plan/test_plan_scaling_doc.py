"""docs/scaling.md's worked example is generated: it must match what docs/make_scaling_table.py (and so
`ldm plan --json`) produces today."""
from __future__ import annotations

import importlib.util
import json

from launch.cli import main
from plankit import REPO


def _script():
    spec = importlib.util.spec_from_file_location("make_scaling_table", REPO / "docs" / "make_scaling_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_scaling_doc_is_up_to_date():
    assert _script().main(["--check"]) == 0, "run: .venv/bin/python docs/make_scaling_table.py"


def test_plan_scaling_rows_are_ldm_plan_output(capsys):
    mod = _script()
    title, config, overrides = mod.CASES[-1]
    rc = main(["plan", str(REPO / config), *overrides, "--gpus", "128", "--global-batch", str(mod.GLOBAL_BATCH),
               "--json"])
    assert rc == 0
    cli = json.loads(capsys.readouterr().out)
    from launch.plan import planner as P
    from launch.plan.description import describe
    from launch.runtime.config import load_config

    row = P.plan(describe(load_config(REPO / config, overrides)), 128, global_batch=mod.GLOBAL_BATCH)
    assert cli["batch"] == row["batch"]
    assert cli["throughput"] == row["throughput"]
    assert f"| 128 | 16 | {row['model']['zero_stage']} |" in mod._row({"gpus": 128, **row})
