"""`exit_process`, the way a training process ends: atexit handlers still run, buffered output still
arrives, the exit code is the one given, and nothing after it runs (no interpreter teardown)."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, sys
from launch.runtime.dist import exit_process
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
print("buffered, never flushed by hand", end="")
try:
    exit_process(7)
finally:
    print(" -- a finally block after os._exit must not run")
"""


def test_exit_process_runs_atexit_flushes_and_keeps_the_code(tmp_path, repo):
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(marker)], capture_output=True, text=True, cwd=repo,
                          timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "buffered, never flushed by hand"
    assert marker.read_text() == "atexit ran"
