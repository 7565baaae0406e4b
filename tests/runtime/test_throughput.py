"""launch/runtime/throughput.py: the FLOPs of one counted micro-step are the analytic count, the window's
MFU is achieved / measured peak, and the per-window peak memory sees an allocation and is reset after it."""
from __future__ import annotations

import json

import torch

from launch.runtime.throughput import ThroughputMeter, matmul_peak_flops


def test_counted_micro_step_equals_the_analytic_flops_and_mfu_follows():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    x = torch.randn(16, 64)
    meter = ThroughputMeter(torch.device("cpu"), torch.float32, grad_accum_steps=3, peak_flops=1e12)
    meter.start_count()                    # a micro-step that stops before its backward is not kept
    net(x).square().mean()
    meter.stop_count(backward_ran=False)
    assert meter.micro_flops is None
    meter.start_count()
    net(x).square().mean().backward()
    meter.stop_count(backward_ran=True)
    # forward 2*B*(64*128 + 128*32); backward twice that (grad of input and of weight; the first layer's
    # input needs no grad, so its backward is one matmul)
    fwd = 2 * 16 * (64 * 128 + 128 * 32)
    bwd = 2 * 16 * 64 * 128 + 2 * (2 * 16 * 128 * 32)
    assert meter.micro_flops == fwd + bwd
    assert meter.step_flops == 3 * (fwd + bwd)
    meter.start_count()                      # counted once: later micro-steps are not counted again
    net(x).sum().backward()
    meter.stop_count(backward_ran=True)
    assert meter.micro_flops == fwd + bwd
    rec = meter.window(steps=10, seconds=2.0)
    assert abs(rec["perf/tflops_per_s"] - 3 * (fwd + bwd) * 10 / 2.0 / 1e12) < 1e-18
    assert abs(rec["perf/mfu"] - 3 * (fwd + bwd) * 5 / 1e12) < 1e-15 and rec["perf/peak_tflops"] == 1.0
    assert rec["perf/flops_per_step"] == 3 * (fwd + bwd)


def test_measured_peak_is_a_plausible_cpu_matmul_rate():
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32, seconds=0.1)
    assert 1e9 < peak < 1e13          # a CPU core does GFLOP/s to a few TFLOP/s


def test_window_peak_memory_sees_an_allocation_and_resets():
    """In a fresh process: inside a long-lived one (the suite's) freed memory is still resident, so a new
    allocation need not raise the resident high-water mark at all."""
    import subprocess
    import sys

    code = """
import json, torch
from launch.runtime.throughput import ThroughputMeter
meter = ThroughputMeter(torch.device("cpu"), torch.float32, grad_accum_steps=1, peak_flops=1e12)
base = meter.window(1, 1.0)["mem/peak_rss_bytes"]
big = torch.ones(64 * 2 ** 20)           # 256 MiB touched, then freed
del big
high = meter.window(1, 1.0)["mem/peak_rss_bytes"]
low = meter.window(1, 1.0)["mem/peak_rss_bytes"]
print(json.dumps([base, high, low]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    base, high, low = json.loads(out.stdout.strip().splitlines()[-1])
    assert high - base > 200 * 2 ** 20, (base, high)
    assert high - low > 200 * 2 ** 20, (high, low)     # the next window does not carry the old peak
