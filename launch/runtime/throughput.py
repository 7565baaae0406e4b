"""MFU and peak memory per logging window, so a user sees both in the training log of a real run.

- FLOPs: one micro-step (forward + backward through the engines, as trained) is counted once by torch's
  FlopCounterMode, the first time the loop asks; a step is that times the accumulation steps. Counting is
  a dispatch mode: it slows only that one micro-step and counts what really ran (attention through SDPA,
  convolutions, the frozen text tower when it runs online), not a model-side formula; a resumed start
  reuses the logged count (see `resume_from`: counting must not touch a resumed step). A micro-step that
  did not reach its backward (a skipped non-finite one) is not kept. Off under `train.compile` (the mode
  would run the uncompiled graph) and with `logging.mfu: false`.
- Peak: a matmul in the run's compute dtype, timed at start on this device (the best of a few). MFU is
  measured against what this machine really sustains; `logging.peak_tflops` replaces it with the
  data-sheet figure where a user wants that convention (MFU as in the PaLM paper).
- Peak memory: CUDA `max_memory_allocated` (reset each window); on CPU, where torch's allocator keeps no
  peak, the process's resident high-water mark VmHWM, reset each window through /proc/self/clear_refs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`: the best of repeated timings over ~`seconds`."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b   # warm-up (kernel selection, lazy init)
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * n ** 3 / best


def _vm_hwm_bytes() -> Optional[float]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


class ThroughputMeter:
    """Counts one micro-step's FLOPs once, then turns each logging window into MFU and peak memory."""

    def __init__(self, device: torch.device, compute_dtype: torch.dtype, grad_accum_steps: int,
                 peak_flops: Optional[float] = None, count: bool = True):
        self.device, self.gas, self.count = device, grad_accum_steps, count
        self.peak_flops = peak_flops if peak_flops else (matmul_peak_flops(device, compute_dtype) if count else 0.0)
        self.micro_flops: Optional[float] = None
        self._counter = None
        self._reset_memory()

    @classmethod
    def for_config(cls, cfg, device: torch.device) -> "ThroughputMeter":
        """The meter of a run: its compute dtype, accumulation, `logging.mfu` / `peak_tflops`, `train.compile`."""
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        return cls(device, dtype, cfg.train.grad_accum_steps, (cfg.logging.peak_tflops or 0) * 1e12,
                   count=cfg.logging.mfu and not cfg.train.compile)

    def resume_from(self, metrics: Path) -> None:
        """A resumed start takes the count its run logged instead of counting again: FlopCounterMode routes
        some ops through other kernels (last-bit differences), and the step it would count must stay
        bit-equal to the uninterrupted run's. Without a logged count this start reports no MFU."""
        self.count = False
        try:
            for line in metrics.read_text().splitlines():
                if '"perf/flops_per_micro_step"' in line:
                    self.micro_flops = float(json.loads(line)["perf/flops_per_micro_step"])
        except (OSError, ValueError, KeyError):
            pass

    def start_count(self) -> None:
        """Before the first micro-step's forward (a no-op once counted, after resume, or when off)."""
        if self.micro_flops is None and self.count and self._counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def stop_count(self, backward_ran: bool) -> None:
        """After that micro-step's backward; a micro-step that never reached it (non-finite) is not kept."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            if backward_ran:
                self.micro_flops = float(self._counter.get_total_flops())
            self._counter = None

    @property
    def step_flops(self) -> Optional[float]:
        return None if self.micro_flops is None else self.micro_flops * self.gas

    def _reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR_REFS.write_text("5")     # resets VmHWM to the current RSS (Linux >= 4.0)
            except OSError:
                pass

    def peak_memory(self) -> dict[str, float]:
        """{key: bytes} of this window's peak on this rank, and a reset for the next window."""
        if self.device.type == "cuda":
            out = {"mem/peak_allocated_bytes": float(torch.cuda.max_memory_allocated(self.device))}
        else:
            hwm = _vm_hwm_bytes()
            out = {} if hwm is None else {"mem/peak_rss_bytes": hwm}
        self._reset_memory()
        return out

    def window(self, steps: int, seconds: float) -> dict[str, float]:
        """This rank's achieved TFLOP/s and MFU over `steps` optimizer steps in `seconds`, and peak memory."""
        out = self.peak_memory()
        if self.step_flops is not None and steps > 0 and seconds > 0 and self.peak_flops > 0:
            achieved = self.step_flops * steps / seconds
            out.update({"perf/tflops_per_s": achieved / 1e12, "perf/mfu": achieved / self.peak_flops,
                        "perf/peak_tflops": self.peak_flops / 1e12, "perf/flops_per_step": self.step_flops,
                        "perf/flops_per_micro_step": self.micro_flops})
        return out
