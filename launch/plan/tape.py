"""Analytic FLOPs and activation memory of the models, per sample, from their configs alone.

`ldm plan` needs two numbers per sample that no config states: the FLOPs of a forward pass and the
bytes autograd keeps for the backward pass. Both come from one symbolic walk over each
architecture (`unet_forward`, `dit_forward`, `autoencoder_forward`; the frozen text tower is a closed
form, `TextTower`) that mirrors the module's `forward` op by op on a `Tape`, with tensor *sizes*
instead of tensors:

FLOPs (2 per multiply-add; what `torch.utils.flop_counter` counts, so the two can be compared):
    linear      2 * tokens * d_in * d_out                   (bias adds not counted)
    conv        2 * H_out * W_out * C_out * C_in * k^2      (per group; bias not counted)
    attention   4 * L_q * L_k * d_model                     (Q K^T and A V; softmax not counted)
Norms, activations, residual adds, interpolation are not counted (memory-bound, < 1 % of the
matmul FLOPs of these models). Closed forms per block for the fp32 UNet/DiT are in `UNET_FORMULAS`
and `DIT_FORMULAS` of launch/plan/denoisers.py; the walk evaluates those sums (tests/plan/test_plan_flops.py checks both).

Activation memory is what autograd saves for backward, following PyTorch's derivative rules:
    linear / conv       saves its input (its weight is a parameter, counted elsewhere)
    GroupNorm/LayerNorm saves its input and per-group / per-token mean and rstd
    SiLU / GELU         saves its input
    a * b               saves both operands;  a + b, views, nearest upsampling: nothing
    fused attention     saves q, k, v, the output and the fp32 log-sum-exp (FlashAttention /
                        memory-efficient kernels on GPU, the flash kernel on CPU; never the
                        L_q x L_k probability matrix)
A tensor saved by several ops (e.g. the LayerNorm output feeding to_q, to_k and to_v) is counted
once, which is how the allocator sees it. Under bf16 autocast (`precision: bf16`, fp32 weights)
the walk also follows CUDA's autocast policy: matmuls/convs/attention cast their inputs to bf16
(a new tensor per call, uncached for activations) and produce bf16; GroupNorm/LayerNorm run and
output in fp32 (`policy="cuda"`); CPU autocast keeps norms in the input dtype (`policy="cpu"`,
used by the tests, which measure on CPU).

Activation checkpointing (`torch.utils.checkpoint`, non-reentrant, per block as ldm/unet.py and
ldm/dit.py wrap them) keeps only the inputs of each checkpointed block plus what the
non-checkpointed glue saves; during backward one block at a time is recomputed, so

    peak_no_ckpt = saved_total + transient
    peak_ckpt    = max(retained_total + transient,
                       max over blocks i of [retained_before(i) + saved_inside(i) + transient(i)])

where retained_before(i) is what the forward pass kept up to block i's inputs (blocks after i are
already back-propagated and freed when i is recomputed) and `transient` the backward working set:
the gradient of the activation being processed and the gradient of its input, taken as 2 x the
largest single activation tensor (of the whole model, or of block i). That bound is an assumption;
tests/plan/ measures the peaks on CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

F32 = 4
LOW = 2   # bf16 / fp16


# ----------------------------------------------------------------------------- the tape

@dataclass(eq=False)
class Sym:
    """A tensor of `numel` elements per sample and `size` bytes per element; `base` for views."""
    numel: int
    size: int
    base: Optional["Sym"] = None

    @property
    def storage(self) -> "Sym":
        return self.base.storage if self.base is not None else self

    @property
    def nbytes(self) -> int:
        return self.numel * self.size


@dataclass
class BlockRecord:
    name: str
    saved_bytes: int       # saved inside the block (what a recompute rebuilds), retained inputs excluded
    largest: int           # largest single tensor inside
    retained_before: int   # bytes kept for backward by everything up to and including this block's inputs

    @property
    def backward_peak(self) -> int:
        """Live activation bytes while this block is recomputed and back-propagated: what was kept up
        to its inputs (later blocks are already done and freed), its own activations, and the
        gradient working set (2 x its largest tensor)."""
        return self.retained_before + self.saved_bytes + 2 * self.largest


class Tape:
    """Symbolic forward pass: accumulates FLOPs and the storages autograd saves for backward.

    precision: "fp32" (all fp32), "fp16" (half weights and activations, DeepSpeed fp16) or "bf16"
    (torch autocast over fp32 weights). policy: "cuda" or "cpu" autocast rules for norms (see module
    docstring). `grad`: False for frozen forward passes (no_grad): FLOPs only, nothing saved."""

    def __init__(self, precision: str = "fp32", policy: str = "cuda", grad: bool = True):
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision {precision!r}")
        self.precision, self.policy, self.grad = precision, policy, grad
        self.autocast = precision == "bf16"
        self.act_size = LOW if precision in ("fp16", "bf16") else F32
        self.flops = 0
        self._scopes: list[dict[int, Sym]] = [{}]
        self.blocks: list[BlockRecord] = []
        self.largest = 0

    # ---- bookkeeping
    def new(self, numel: int, size: Optional[int] = None) -> Sym:
        s = Sym(int(numel), self.act_size if size is None else size)
        self.largest = max(self.largest, s.nbytes)
        return s

    def input(self, numel: int, size: int = F32, batch: bool = False) -> Sym:
        """A tensor the model makes from its inputs (fp32); the model casts it to its weights' dtype.
        `batch`: a tensor of the batch itself (latents, text states, mask), alive for the whole step."""
        x = Sym(int(numel), size)
        if batch and self.grad:
            self._scopes[0][id(x)] = x
        return self.cast(x, LOW) if self.precision == "fp16" else x

    def view(self, x: Sym, numel: Optional[int] = None) -> Sym:
        return Sym(x.numel if numel is None else int(numel), x.size, base=x)

    def save(self, *xs: Sym) -> None:
        if not self.grad:
            return
        for x in xs:
            st = x.storage
            if not any(id(st) in scope for scope in self._scopes[:-1]):
                self._scopes[-1][id(st)] = st

    def cast(self, x: Sym, size: int) -> Sym:
        return x if x.size == size else self.new(x.numel, size)

    def _mm_in(self, x: Sym) -> Sym:
        return self.cast(x, LOW) if self.autocast else x

    def cast_for_matmuls(self, x: Sym) -> Sym:
        """ldm.attention.cast_for_autocast: an input read by several Linears is cast to bf16 once."""
        return self._mm_in(x)

    # ---- ops
    def linear(self, x: Sym, tokens: int, d_in: int, d_out: int) -> Sym:
        self.flops += 2 * tokens * d_in * d_out
        self.save(self._mm_in(x))
        return self.new(tokens * d_out, LOW if self.autocast else x.size)

    def conv(self, x: Sym, h_out: int, w_out: int, c_in: int, c_out: int, k: int) -> Sym:
        self.flops += 2 * h_out * w_out * c_out * c_in * k * k
        self.save(self._mm_in(x))
        return self.new(h_out * w_out * c_out, LOW if self.autocast else x.size)

    def norm(self, x: Sym, stats: int) -> Sym:
        """GroupNorm / LayerNorm; `stats` = number of (mean, rstd) pairs per sample (groups or tokens)."""
        if self.autocast and self.policy == "cuda":
            x = self.cast(x, F32)
        self.save(x, self.new(2 * stats, F32) if self.grad else x)
        return self.new(x.numel, x.size)

    def act(self, x: Sym, numel: Optional[int] = None) -> Sym:
        """SiLU / GELU (saves its input; `numel` when the input is a view of part of a storage)."""
        self.save(x)
        return self.new(x.numel if numel is None else numel, x.size)

    def mul(self, a: Sym, b: Sym) -> Sym:
        self.save(a, b)
        return self.new(max(a.numel, b.numel), max(a.size, b.size))

    def add(self, a: Sym, b: Sym) -> Sym:
        return self.new(max(a.numel, b.numel), max(a.size, b.size))

    def attention(self, q: Sym, k: Sym, v: Sym, heads: int, lq: int, lk: int, dim: int) -> Sym:
        """Fused scaled-dot-product attention over `heads` heads, total width `dim`."""
        self.flops += 4 * lq * lk * dim
        if self.autocast:
            q, k, v = (self.cast(t, LOW) for t in (q, k, v))
        out = self.new(lq * dim, q.size)
        self.save(q, k, v, out, self.new(heads * lq, F32))
        return out

    def rms_norm(self, x: Sym, rows: int) -> Sym:
        """ldm.attention.RMSNorm over `rows` vectors: fp32 math; keeps its input (in its own dtype) and one
        fp32 rstd per row for backward."""
        self.new(x.numel, F32)                   # the fp32 working copy (of fp32 input too): transient
        self.save(x, self.new(rows, F32))
        return self.cast(self.new(x.numel, F32), x.size)

    # ---- activation checkpointing
    @contextlib.contextmanager
    def checkpoint(self, enabled: bool, inputs: tuple[Sym, ...], name: str = "block") -> Iterator[None]:
        """A block run under torch.utils.checkpoint when `enabled`: its inputs are kept, its own saved
        tensors only exist while it is recomputed in backward."""
        if not enabled or not self.grad:
            yield
            return
        self.save(*inputs)
        retained_before = self.saved_bytes
        self._scopes.append({})
        largest_before, self.largest = self.largest, 0
        try:
            yield
        finally:
            inner = self._scopes.pop()
            self.blocks.append(BlockRecord(name, sum(s.nbytes for s in inner.values()), self.largest,
                                           retained_before))
            self.largest = max(largest_before, self.largest)

    # ---- results
    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self._scopes[0].values())

    @property
    def max_block_bytes(self) -> int:
        return max((b.saved_bytes for b in self.blocks), default=0)


@dataclass
class ForwardCount:
    """Per-sample results of one walk."""
    flops: int                      # forward FLOPs
    saved_bytes: int                # kept for backward (checkpointing: retained inputs + glue)
    max_block_bytes: int            # largest checkpointed block's recomputed activations (0 without)
    largest_tensor_bytes: int
    checkpointing: bool
    blocks: list[BlockRecord] = field(default_factory=list)

    @property
    def transient_bytes(self) -> int:
        return 2 * self.largest_tensor_bytes

    @property
    def peak_bytes(self) -> int:
        """Activation bytes per sample at the peak of backward (formulas in the module docstring):
        the start of backward (everything kept + the gradient working set), or, with checkpointing,
        the worst block recompute if that is higher."""
        return max([self.saved_bytes + self.transient_bytes] + [b.backward_peak for b in self.blocks])


def _finish(tape: Tape, checkpointing: bool) -> ForwardCount:
    return ForwardCount(tape.flops, tape.saved_bytes, tape.max_block_bytes, tape.largest, checkpointing,
                        list(tape.blocks))
