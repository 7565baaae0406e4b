"""Measurements that check `ldm plan`'s analytic model (launch/plan/: the walks and the ZeRO model) on CPU.

- `count_flops`: FLOPs of a forward pass by `torch.utils.flop_counter.FlopCounterMode` (on the meta
  device nothing is allocated, so full-size models are measured in seconds).
- `AllocationTracker` / `activation_peak`: the peak of live tensor bytes during one forward +
  backward, by the tensors themselves: a `TorchDispatchMode` sees every op's outputs, records each
  new storage with its size and notices (through a weak reference) when the storage is freed.
  This is the CPU allocator's view of the tensors (workspace buffers inside a kernel are not
  tensors and are not seen, as cuDNN/cuBLAS workspaces are not activations on a GPU either). It is
  what a GPU holds because the same autograd graph saves the same tensors on any device; only the
  attention kernel differs, and on CPU torch runs its flash kernel, which saves what
  FlashAttention / memory-efficient attention save on a GPU (q, k, v, output, log-sum-exp).
  Parameter gradients are excluded (they are model state, counted by the ZeRO model).
- `engine_state_bytes`: parameters, gradients, optimizer state and buffers one rank of a live
  DeepSpeed engine holds, each storage counted once.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Optional

import torch
from torch import nn


# ----------------------------------------------------------------------------- FLOPs

def _cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernels when this torch has none.

    torch 2.14's flop_counter registers SDPA's CUDA kernels (flash, efficient, cudnn) but not
    `_scaled_dot_product_flash_attention_for_cpu` and its backward, which `F.scaled_dot_product_attention`
    dispatches to on CPU: there, attention through SDPA counted zero FLOPs while attention written as two
    matmuls counted in full, so any comparison of two models on CPU depended on how each wrote attention.
    The CPU kernel does the same dense work as the CUDA ones, so it gets the same formulas."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    forward._get_raw = backward._get_raw = True   # take tensors as they come (FlopCounterMode's convention)
    aten, mapping = torch.ops.aten, {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:   # keyed by packet, as FlopCounterMode looks up
            mapping[op] = formula
    return mapping


def flop_counter():
    """A FlopCounterMode that counts attention on every device (see _cpu_attention_formulas)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())


def count_flops(module: nn.Module, *args, **kwargs) -> int:
    """Forward FLOPs of `module(*args, **kwargs)` as torch.utils.flop_counter counts them."""
    mode = flop_counter()
    with mode, torch.no_grad():
        module(*args, **kwargs)
    return int(mode.get_total_flops())


def denoiser_inputs(denoiser_cfg, batch: int, latent_hw: tuple[int, int], ctx_len: int = 77,
                    device: str | torch.device = "cpu", mask: bool = True, seed: int = 0) -> dict:
    """Keyword arguments for a UNet / DiT forward: x, t, context (+ pooled, + context_mask, half padding)."""
    if denoiser_cfg.kind == "unet":
        ch, ctx_dim = denoiser_cfg.unet.in_channels, denoiser_cfg.unet.context_dim
    elif denoiser_cfg.kind == "mmdit":
        ch, ctx_dim = denoiser_cfg.mmdit.in_channels, denoiser_cfg.mmdit.context_dim
    else:
        ch, ctx_dim = denoiser_cfg.dit.in_channels, denoiser_cfg.dit.context_dim
    device = torch.device(device)
    if device.type == "meta":
        g = None
        x = torch.empty(batch, ch, *latent_hw, device=device)
        t = torch.empty(batch, device=device)
        ctx = torch.empty(batch, ctx_len, ctx_dim, device=device)
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, ch, *latent_hw, generator=g).to(device)
        t = (torch.rand(batch, generator=g) * 999).to(device)
        ctx = torch.randn(batch, ctx_len, ctx_dim, generator=g).to(device)
    out = {"x": x, "t": t, "context": ctx}
    if denoiser_cfg.pooled_dim:
        out["pooled"] = (torch.empty(batch, denoiser_cfg.pooled_dim, device=device) if device.type == "meta"
                         else torch.randn(batch, denoiser_cfg.pooled_dim, generator=g).to(device))
    if mask:
        m = torch.zeros(batch, ctx_len, dtype=torch.bool, device=device) if device.type != "meta" else \
            torch.empty(batch, ctx_len, dtype=torch.bool, device=device)
        if device.type != "meta":
            m[:, : max(1, ctx_len // 2)] = True
        out["context_mask"] = m
    return out


# ----------------------------------------------------------------------------- activations

class AllocationTracker:
    """Live tensor bytes over time, from every op's outputs (see the module docstring).

    `events` holds (serial, +bytes) when a storage appears and (serial, -bytes) when it is freed (a
    serial per storage lifetime: addresses are reused); `curve(exclude)` replays them without the
    excluded serials (`serials_of` maps live tensors to theirs) and returns (peak, index, values)."""

    def __init__(self, ignore: Optional[set[int]] = None):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                cast_of_param = (func is torch.ops.aten._to_copy.default and torch.is_tensor(args[0])
                                 and args[0].untyped_storage().data_ptr() in tracker.ignore)
                tracker._seen(out, cast_of_param)
                return out

        self._mode = _Mode()
        self.live: dict[int, tuple[object, int, int]] = {}   # address -> (weak ref, bytes, serial)
        self._serial = 0
        self.ignore = set(ignore or ())    # storage addresses that exist already (parameters)
        self.param_casts: set[int] = set()  # serials of autocast's copies of parameters (bf16 weights)
        self.events: list[tuple[int, int]] = []
        self.marks: dict[str, int] = {}

    def _sweep(self) -> None:
        for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
            _, nbytes, serial = self.live.pop(key)
            self.events.append((serial, -nbytes))

    def _seen(self, out, cast_of_param: bool = False) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        self._sweep()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in self.live or key in self.ignore:
                continue
            self._serial += 1
            self.live[key] = (StorageWeakRef(st), st.nbytes(), self._serial)
            self.events.append((self._serial, st.nbytes()))
            if cast_of_param:
                self.param_casts.add(self._serial)

    def serials_of(self, tensors) -> set[int]:
        """Serials of the storages of `tensors` that are live now."""
        out = set()
        for t in tensors:
            entry = self.live.get(t.untyped_storage().data_ptr()) if torch.is_tensor(t) else None
            if entry is not None and not entry[0].expired():
                out.add(entry[2])
        return out

    def mark(self, name: str) -> None:
        self._sweep()
        self.marks[name] = len(self.events)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._sweep()
        return self._mode.__exit__(*exc)

    # (the mode stops seeing frees once it exits; `serials_of` is meant for tensors still alive)

    def curve(self, exclude: set[int] = frozenset()) -> tuple[int, int, list[int]]:
        cur = peak = at = 0
        values = []
        for i, (key, delta) in enumerate(self.events):
            if key not in exclude:
                cur += delta
                if cur > peak:
                    peak, at = cur, i
            values.append(cur)
        return peak, at, values


def activation_peak(module: nn.Module, make_inputs: Callable[[], dict], autocast: Optional[torch.dtype] = None,
                    loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, int]:
    """Peak live bytes of tensors created during one forward + backward of `module(**make_inputs())`
    (the inputs are created inside, so the batch counts, as it does on a GPU); parameter gradients,
    views of parameters and autocast's low-precision copies of parameters are excluded (model state,
    not activations: launch/plan/zero.py counts the copies once per model); also the bytes alive at the
    end of the forward pass."""
    loss_fn = loss_fn or (lambda out: out.float().square().mean())
    module.zero_grad(set_to_none=True)
    device = next(module.parameters()).device
    ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    gc.collect()
    existing = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    tracker = AllocationTracker(ignore=existing)
    with tracker:
        inputs = make_inputs()
        with ctx:
            loss = loss_fn(module(**inputs))
        tracker.mark("forward_end")
        loss.backward()
        del loss, inputs
    grads = tracker.serials_of(p.grad for p in module.parameters() if p.grad is not None)
    peak, _, values = tracker.curve(exclude=grads | tracker.param_casts)
    fwd_end = tracker.marks["forward_end"]
    module.zero_grad(set_to_none=True)
    return {"peak": peak, "forward_end": values[fwd_end - 1] if fwd_end else 0}


def activation_bytes_per_sample(module: nn.Module, make_inputs: Callable[[int], dict], batches=(4, 12),
                                autocast: Optional[torch.dtype] = None) -> dict[str, float]:
    """Per-sample activation bytes as the slope of the measured peak between two batch sizes (which
    removes everything that does not grow with the batch: casts of weights, buffers, the loss)."""
    module.train()
    activation_peak(module, lambda: make_inputs(batches[0]), autocast)          # warm-up: lazy kernel state
    lo, hi = (activation_peak(module, lambda b=b: make_inputs(b), autocast) for b in batches)
    span = batches[1] - batches[0]
    return {"peak": (hi["peak"] - lo["peak"]) / span, "forward_end": (hi["forward_end"] - lo["forward_end"]) / span}


# ----------------------------------------------------------------------------- DeepSpeed model states

def _storage(t) -> tuple[int, int] | None:
    if not torch.is_tensor(t) or t.numel() == 0:
        return None
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _tensors(obj, depth: int = 0):
    """Tensors inside lists, tuples, dicts and DeepSpeed's small holder objects (e.g. ZeRO-3's IPG
    buckets), a few levels deep; modules and optimizers are not entered."""
    if torch.is_tensor(obj):
        yield obj
    elif depth >= 4:
        return
    elif isinstance(obj, (list, tuple, set)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)
    elif (type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__")
          and not isinstance(obj, (nn.Module, torch.optim.Optimizer))):
        for o in vars(obj).values():
            yield from _tensors(o, depth + 1)


def engine_state_bytes(engine, ema=None, detail: Optional[dict] = None) -> dict[str, int]:
    """Bytes one rank holds for a DeepSpeed engine, each storage once, by role:

    params      module parameters as allocated (full under ZeRO 0-2 and for ZeRO-3's persistent or
                currently gathered parameters) plus ZeRO-3's partitions (`ds_tensor`)
    grads       `.grad` of parameters and the optimizer's gradient buffers/partitions
    optimizer   the torch optimizer's state (AdamW moments, step) plus fp32 master partitions
    buffers     other tensors of the ZeRO optimizer (communication buckets)
    ema         the EMA shadow, when given
    unattributed  everything else alive in the process is not looked at (use `live_tensor_bytes`)."""
    seen: set[int] = set()
    out = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0, "ema": 0}

    def add(role, t):
        s = _storage(t)
        if s is not None and s[0] not in seen:
            seen.add(s[0])
            out[role] += s[1]

    params = list(engine.module.parameters())
    for p in params:
        add("params", p.data)
        add("params", getattr(p, "ds_tensor", None))
    for p in params:
        add("grads", p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    if inner is not opt:
        for attr, value in vars(opt).items():
            low = attr.lower()
            if "grad" in low and "fp32" not in low and "single_partition" not in low:
                for t in _tensors(value):
                    add("grads", t)
        # fp32 master partitions (and their .grad during the step)
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat"):
            for t in _tensors(getattr(opt, attr, None)):
                add("optimizer", t)
                add("grads", t.grad)
    for state in inner.state.values():
        for t in _tensors(state):
            add("optimizer", t)
    if inner is not opt:
        for attr, value in vars(opt).items():
            for t in _tensors(value):
                before = out["buffers"]
                add("buffers", t)
                if out["buffers"] > before and detail is not None:
                    detail[attr] = detail.get(attr, 0) + out["buffers"] - before
    if ema is not None:
        for t in ema.shadow.values():
            add("ema", t)
    return out


def live_tensor_bytes() -> dict[int, int]:
    """storage key -> bytes of every CPU tensor the garbage collector can see (for totals)."""
    import warnings

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # isinstance() on deprecated module attributes warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.numel():
                    st = obj.untyped_storage()
                    out[st.data_ptr()] = st.nbytes()
            except Exception:   # noqa: BLE001 - half-built objects in gc's list
                pass
    return out
