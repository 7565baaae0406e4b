"""Setup for the init.from tests: the runtime test helpers on sys.path (the fixtures build their diffusers models
in the tests; one torch thread comes from tests/conftest.py)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "runtime") not in sys.path:
    sys.path.insert(0, str(REPO / "tests" / "runtime"))

