"""The loader benchmark runs and reports JSON-able figures (timings themselves are not asserted)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_loader_bench_quick_runs():
    from bench.loader import run

    result = run(quick=True)
    json.dumps(result)
    assert set(result["loader_img_s"]) == {"0", "1", "2"}
    assert result["decode_bound_img_s"] > 0 and all(r > 0 for r in result["loader_img_s"].values())
    assert isinstance(result["meets_target"], bool)
