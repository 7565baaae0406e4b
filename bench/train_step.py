"""Training-step throughput of our models against diffusers' classes of the same architecture.

For each pair in `bench/models.py` (autoencoder vs AutoencoderKL, UNet vs UNet2DConditionModel, DiT vs
PixArtTransformer2DModel, MMDiT vs SD3Transformer2DModel) and each precision (fp32, then bf16 under torch autocast with fp32 weights, as
the runtime trains):
1. check that both compute the same function before timing anything (peer loaded with our weights; fp32
   outputs within the converters' test tolerances; in bf16 our error against the fp32 output may be at
   most 1.5x the peer's own bf16 error);
2. count FLOPs of one training step (forward + backward) with `torch.utils.flop_counter.FlopCounterMode`
   (plus the dense forward of both sides and our caption-packing saving: `flop_accounting`);
3. time training steps (forward, loss, backward, torch AdamW(fused) step) of ours and the peer alternately,
   A B A B, in this one process with the same batch, dtype, optimizer and threads; report medians.
MFU = nominal FLOPs per step x steps per second / the GEMM peak measured in the same run (`bench/peak.py`)
for that dtype, the best of one measurement before the timings and one after. "Nominal" is the peer's
(dense) count for both sides, so MFU ratios equal speed ratios: our models skip work that cannot change
the result (caption padding), which is speed, not extra FLOPs.
oneDNN may run 3x3 convolutions with Winograd, so nominal MFU can exceed 1 for conv-heavy models.

CUDA mode (`--cuda`, only where a GPU is present; never needed by the tests): bf16 autocast, SDPA (flash)
attention, torch.compile of both models, channels_last for the convolutional ones, larger batches, MFU
against the GPU's measured bf16 GEMM peak.

    python -m bench.train_step [--quick] [--json] [--threads N] [--repeats N] [--models unet,dit] [--cuda]
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from . import models as M
from .common import alternate, host, markdown_table, median, save, set_threads
from .peak import best_of, measure as measure_peak, peak_for

TARGETS = {("autoencoder", "bf16"): 1.3, ("unet", "bf16"): 1.5, ("dit", "bf16"): 1.5, ("mmdit", "bf16"): 1.3,
           ("autoencoder", "fp32"): 1.0, ("unet", "fp32"): 1.0, ("dit", "fp32"): 1.0, ("mmdit", "fp32"): 1.0}
FP32_TOL = {"autoencoder": 1e-5, "unet": 1e-4, "dit": 1e-4, "mmdit": 1e-4}     # the converters' equivalence-test tolerances
BF16_REL_TOL = 1.5                                              # ours' bf16 error <= 1.5 x the peer's
BATCH = {"autoencoder": 4, "unet": 16, "dit": 16, "mmdit": 16}               # the batches
OURS = {"autoencoder": "autoencoder.model.Autoencoder", "unet": "ldm.unet.UNet", "dit": "ldm.dit.DiT",
        "mmdit": "ldm.mmdit.MMDiT"}

# quick mode: the same code on tiny versions of each architecture (seconds, for tests)
QUICK = {"autoencoder": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16),
         "unet": dict(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=4, context_dim=32,
                      sample_size=8, num_res_blocks=1),
         "dit": dict(input_size=8, hidden_size=64, depth=2, num_heads=4, context_dim=32),
         "mmdit": dict(input_size=8, hidden_size=64, depth=2, num_heads=4, context_dim=32, pooled_dim=32)}
QUICK_BATCH = 2


def _dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bf16" else torch.float32


def build_pair(model: str, quick: bool = False, batch: Optional[int] = None, seed: int = 0,
               overrides: Optional[dict] = None) -> M.Pair:
    """`overrides` (another size of the same architecture, e.g. bench/gpu.py's SD-UNet) replace the quick ones."""
    overrides = overrides if overrides is not None else (QUICK[model] if quick else {})
    return M.PAIRS[model](batch=batch or (QUICK_BATCH if quick else BATCH[model]), seed=seed, **overrides)


@torch.no_grad()
def equality(pair: M.Pair, device: str = "cpu") -> dict:
    """Outputs of ours and the peer on the same batch, in eval mode: fp32 and bf16-autocast errors."""
    ours, theirs = pair.ours.eval(), pair.theirs.eval()
    inputs = {k: v.to(device) for k, v in pair.inputs.items()}
    try:
        out = {}
        for dt in ("fp32", "bf16"):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dt == "bf16"):
                out[f"ours_{dt}"] = M._first(pair.run_ours(ours, inputs)).float()
                out[f"peer_{dt}"] = M._first(pair.run_theirs(theirs, inputs)).float()
    finally:
        ours.train(), theirs.train()
    ref = out["peer_fp32"]
    fp32_diff = float((out["ours_fp32"] - ref).abs().max())
    ours_err = float((out["ours_bf16"] - ref).abs().max())
    peer_err = float((out["peer_bf16"] - ref).abs().max())
    tol = FP32_TOL[pair.name]
    return {"fp32_max_abs_diff": fp32_diff, "fp32_tolerance": tol,
            "bf16_max_abs_diff": float((out["ours_bf16"] - out["peer_bf16"]).abs().max()),
            "bf16_ours_err_vs_fp32": ours_err, "bf16_peer_err_vs_fp32": peer_err,
            "output_mean_abs": float(ref.abs().mean()),
            "same_function": fp32_diff <= tol and ours_err <= BF16_REL_TOL * peer_err + 1e-6}


def count_flops(pair: M.Pair, side: str, dtype: str, device: str = "cpu", *, backward: bool = True,
                dense: bool = False) -> int:
    """FLOPs of one training forward (+ backward) as FlopCounterMode counts matmuls, convolutions and
    attention. `dense`: every caption token marked valid, so ours does the peer's dense work (no packing)."""
    from launch.plan.measure import flop_counter   # counts SDPA's CPU kernel too (torch 2.14 does not)

    module = pair.ours if side == "ours" else pair.theirs
    run = pair.run_ours if side == "ours" else pair.run_theirs
    inputs = {k: v.to(device) for k, v in pair.inputs.items()}
    if dense and "mask" in inputs:
        inputs["mask"] = torch.ones_like(inputs["mask"])
    counter = flop_counter()
    with counter, torch.set_grad_enabled(backward):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = pair.loss(run(module, inputs), inputs)
        if backward:
            loss.backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flop_accounting(pair: M.Pair, dtype: str, device: str = "cpu") -> dict:
    """What the FLOP counts say, each from a count (nothing assumed):
    - the forward pass on dense captions is the same work on both sides: equal counts (the attention
      formula for a forward is the same for SDPA kernels and for explicit matmuls);
    - a training step's counts can differ for the same work: SDPA's flash backward recomputes the scores
      (counted as 2.5x the forward attention) where attention written as matmuls has a 2x backward;
    - caption packing (ours skips padded caption tokens) saves `packing_saving` of our step's count."""
    fwd_peer = count_flops(pair, "peer", dtype, device, backward=False)
    fwd_ours_dense = count_flops(pair, "ours", dtype, device, backward=False, dense=True)
    step_ours_dense = count_flops(pair, "ours", dtype, device, dense=True)
    step_ours = count_flops(pair, "ours", dtype, device)
    return {"peer_forward_flops": fwd_peer, "ours_dense_forward_flops": fwd_ours_dense,
            "ours_dense_flops_per_step": step_ours_dense, "ours_flops_per_step": step_ours,
            "packing_saving": round(1 - step_ours / step_ours_dense, 4) if step_ours_dense else 0.0}


def mfu(nominal_flops: float, t_ours: float, t_peer: float, peak_gflops: float) -> dict:
    # four significant digits, not decimals: tiny quick-mode models sit near 0.1 % MFU
    pk = peak_gflops * 1e9
    return {"peak_gflops": peak_gflops, "ours_mfu": float(f"{nominal_flops / t_ours / pk:.4g}"),
            "peer_mfu": float(f"{nominal_flops / t_peer / pk:.4g}")}


def compare(model: str, dtype: str, *, repeats: int, peak: dict, threads: int, quick: bool = False,
            device: str = "cpu", compile: bool = False, channels_last: bool = False,
            batch: Optional[int] = None, overrides: Optional[dict] = None,
            compile_backend: str = "inductor") -> dict:
    """One comparison object (see the module docstring). `compile_backend` "eager" runs torch.compile's graph
    capture without code generation (bench/gpu.py's CPU dry run)."""
    pair = build_pair(model, quick, batch, overrides=overrides)
    if device != "cpu" or channels_last:
        fmt = torch.channels_last if channels_last and model not in ("dit", "mmdit") else torch.preserve_format
        for m in (pair.ours, pair.theirs):
            m.to(device=device, memory_format=fmt)
        pair.inputs = {k: v.to(device) for k, v in pair.inputs.items()}
    eq = equality(pair, device)
    if not eq["same_function"]:
        raise AssertionError(f"{model}: ours and {pair.peer} do not compute the same function: {eq}")
    nominal = count_flops(pair, "peer", dtype, device)
    flops = flop_accounting(pair, dtype, device)
    if compile:
        pair.ours = torch.compile(pair.ours, backend=compile_backend)
        pair.theirs = torch.compile(pair.theirs, backend=compile_backend)
    steps = [M.trainer(pair, "ours", _dtype(dtype), device=device), M.trainer(pair, "peer", _dtype(dtype), device=device)]
    sync = torch.cuda.synchronize if device == "cuda" else None
    times = alternate(steps, repeats, warmup=2 if compile else 1, sync=sync)
    t_ours, t_peer = median(times[0]), median(times[1])
    ips_ours, ips_peer = pair.batch / t_ours, pair.batch / t_peer
    target = TARGETS.get((model, dtype))
    ratio = t_peer / t_ours
    return {
        "name": f"{model}_{dtype}" + ("_cuda" if device == "cuda" else ""),
        "model": model, "dtype": dtype, "device": device, "quick": quick,
        "ours": OURS[model], "peer": f"diffusers.{pair.peer}",
        "params": pair.params(), "peer_params": sum(p.numel() for p in pair.theirs.parameters()),
        "batch": pair.batch, "threads": threads, "repeats": repeats,
        "optimizer": "torch.optim.AdamW(fused=True)",
        "ours_img_per_s": round(ips_ours, 3), "peer_img_per_s": round(ips_peer, 3), "ratio": round(ratio, 3),
        "ours_step_ms": round(1e3 * t_ours, 2), "peer_step_ms": round(1e3 * t_peer, 2),
        "ours_step_ms_all": [round(1e3 * t, 2) for t in times[0]],
        "peer_step_ms_all": [round(1e3 * t, 2) for t in times[1]],
        "flops_per_step": nominal, **flops,
        **mfu(nominal, t_ours, t_peer, peak_for(peak, dtype)),
        "target_ratio": target, "meets_target": None if target is None or quick else ratio >= target,
        "equality": eq,
        "compile": compile, "channels_last": channels_last,
    }


def run(quick: bool = False, threads: Optional[int] = None, repeats: Optional[int] = None,
        models: tuple[str, ...] = ("autoencoder", "unet", "dit", "mmdit"), dtypes: tuple[str, ...] = ("fp32", "bf16"),
        cuda: bool = False, save_results: bool = True) -> dict:
    """All comparisons; returns {"name": "train", "host", "peak", "comparisons": [...]}."""
    if cuda:
        return run_cuda(quick=quick, repeats=repeats, models=models, save_results=save_results)
    threads = set_threads(threads)
    repeats = repeats or (2 if quick else 7)
    peak_before = measure_peak(quick)
    comps = [compare(m, d, repeats=repeats, peak=peak_before, threads=threads, quick=quick)
             for d in dtypes for m in models]
    peak_after = measure_peak(quick)
    peak = best_of(peak_before, peak_after)     # MFU against the best rate the machine showed in this run
    for c in comps:
        c.update(mfu(c["flops_per_step"], c["ours_step_ms"] / 1e3, c["peer_step_ms"] / 1e3, peak_for(peak, c["dtype"])))
    result = {"name": "train", "quick": quick, "host": host(threads), "peak": peak, "peak_before": peak_before,
              "peak_after": peak_after, "comparisons": comps}
    if save_results:
        save("train" + ("_quick" if quick else ""), result, table(comps))
    return result


def run_cuda(quick: bool = False, repeats: Optional[int] = None, models=("autoencoder", "unet", "dit", "mmdit"),
             save_results: bool = True) -> dict:
    """The CUDA mode: bf16, SDPA flash attention, torch.compile, channels_last; skipped without a GPU."""
    if not torch.cuda.is_available():
        return {"name": "train_cuda", "skipped": "no CUDA device", "comparisons": []}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = measure_peak(quick, device="cuda")
    repeats = repeats or (3 if quick else 20)
    comps = []
    for m in models:
        batch = None if quick else 4 * BATCH[m]
        comps.append(compare(m, "bf16", repeats=repeats, peak=peak, threads=torch.get_num_threads(), quick=quick,
                             device="cuda", compile=not quick, channels_last=m not in ("dit", "mmdit"), batch=batch))
    result = {"name": "train_cuda", "quick": quick, "host": host(), "peak": peak, "comparisons": comps}
    if save_results:
        save("train_cuda" + ("_quick" if quick else ""), result, table(comps))
    return result


def table(comps: list[dict]) -> str:
    rows = [(c["name"], f"{c['params'] / 1e6:.1f} M", c["batch"], c["ours_img_per_s"], c["peer"].split(".")[-1],
             c["peer_img_per_s"], f"{c['ratio']:.2f}x", f"{c['target_ratio']}x" if c["target_ratio"] else "",
             f"{c['ours_mfu']:.0%}", f"{c['peer_mfu']:.0%}", f"{c['flops_per_step'] / 1e9:.1f}")
            for c in comps]
    return markdown_table(["comparison", "params", "batch", "ours img/s", "peer", "peer img/s", "ratio", "target",
                           "ours MFU", "peer MFU", "GFLOP/step"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, 2 repeats (seconds)")
    p.add_argument("--json", action="store_true", help="print the list of comparison objects")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 7)")
    p.add_argument("--models", default="autoencoder,unet,dit,mmdit")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--cuda", action="store_true", help="CUDA mode (needs a GPU)")
    args = p.parse_args(argv)
    result = run(args.quick, args.threads, args.repeats, tuple(args.models.split(",")),
                 tuple(args.dtypes.split(",")), cuda=args.cuda)
    if args.json:
        print(json.dumps(result["comparisons"]))
    else:
        print(result.get("skipped") or table(result["comparisons"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
