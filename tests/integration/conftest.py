"""Real-stage tests use the session fixture `tiny_world` from tests/conftest.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
