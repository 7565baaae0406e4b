"""Shared pieces of the benchmarks: threads, host facts, alternating timers, and result files.

Every benchmark returns a JSON-able result and writes `bench/results/<name>.json` plus
`bench/results/<name>.md` (a markdown table) through `save`. `bench/report.py` turns those files into the
README's Performance section, so no number is ever typed by hand.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "LDM_BENCH_RESULTS"     # another folder for result files (the tests point it at a temporary one)
DEFAULT_THREADS = 2


def steps_table(base: str, steps: int | str) -> str:
    """The result name of `base` trained at another reference step count (`ldm bench quality --steps N`);
    steps "" gives the prefix every such name starts with."""
    return f"{base}_steps{steps}"


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (and one inter-op thread); returns the number used. Also flushes
    denormals, as every `ldm` command and the runtime do: run as `python -m bench.X` without it, AdamW on
    an MMDiT took 41 instead of 24 ms per call (tiny moments go denormal) and skewed the comparison."""
    import torch

    torch.set_flush_denormal(True)
    n = int(threads or DEFAULT_THREADS)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:          # already set once in this process
        pass
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def host(threads: int | None = None) -> dict:
    """Facts that decide how to read a figure: CPU, threads, load before the run, versions."""
    import torch

    info = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if threads is not None:
        info["threads"] = threads
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def alternate(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1,
              sync: Callable[[], None] | None = None) -> list[list[float]]:
    """Run fns[0], fns[1], ... in turn `repeats` times (after `warmup` untimed rounds): A B A B ...
    Returns wall seconds per call, one list per function. Alternating spreads any change in the host's
    load over all sides alike, so their ratio stays meaningful on a shared machine."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    if sync:
        sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[i].append(time.perf_counter() - t0)
    return times


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def save(name: str, result, table: str | None = None, results_dir: str | os.PathLike | None = None) -> Path:
    """Write `<results>/<name>.json` (and `<name>.md` with `table`); returns the JSON path."""
    folder = Path(results_dir or os.environ.get(RESULTS_ENV) or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if table is not None:
        (folder / f"{name}.md").write_text(table.rstrip() + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
