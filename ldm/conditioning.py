"""Conditions as the denoiser sees them, and condition dropout for classifier-free guidance.

A condition is a dict of batched tensors whose keys are the denoiser's keyword arguments:

    context       [B, L, D] text token states          context_mask [B, L] bool (True = real token)
    pooled        [B, P]    pooled text embedding       drop         [B] bool (use the learned null)
    labels        [B]       class labels (class-conditional DiT, test models)

Dropout happens at TRAIN time, per sample, every step (never when embeddings are precomputed: a caption
dropped once at precompute time would be unconditional in every epoch). A dropped sample sees either
the empty-prompt embedding ("empty") or the denoiser's learned null caption ("learned", PixArt-style;
the substitution then happens inside the denoiser through `drop`, so the null is a trained parameter).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

Cond = dict  # str -> Tensor


def sample_drop_mask(batch_size: int, p: float, device=None, generator: Optional[torch.Generator] = None
                     ) -> torch.Tensor:
    """[B] bool, each True with probability p, independently."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch_size, generator=generator, device=gen_device)
    return (u < p).to(device)


def _where_rows(drop: torch.Tensor, replacement: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    shape = (drop.shape[0],) + (1,) * (value.dim() - 1)
    return torch.where(drop.view(shape), replacement.to(value.dtype).expand_as(value), value)


def fit_tokens(t: torch.Tensor, length: int, fill=0) -> torch.Tensor:
    """Crop or pad a [..., L, ...] token axis (dim 1 of [B, L, D] / [B, L]) to `length`."""
    cur = t.shape[1]
    if cur == length:
        return t
    if cur > length:
        return t[:, :length]
    pad_shape = list(t.shape)
    pad_shape[1] = length - cur
    return torch.cat([t, torch.full(pad_shape, fill, dtype=t.dtype, device=t.device)], dim=1)


def replace_with_empty(cond: Mapping[str, torch.Tensor], drop: torch.Tensor, empty: Mapping[str, torch.Tensor]
                       ) -> Cond:
    """Rows where `drop` is True take the empty-prompt condition (`empty` has batch size 1)."""
    out = dict(cond)
    for key in ("context", "context_mask", "pooled"):
        if key in cond and cond[key] is not None:
            if key not in empty:
                raise KeyError(f"empty-prompt condition lacks {key!r}")
            rep = empty[key]
            if key in ("context", "context_mask"):
                rep = fit_tokens(rep, cond[key].shape[1], fill=False if key == "context_mask" else 0)
            out[key] = _where_rows(drop.to(cond[key].device), rep.to(cond[key].device), cond[key])
    return out


def apply_condition_dropout(cond: Mapping[str, torch.Tensor], p: float, mode: str,
                            empty: Optional[Mapping[str, torch.Tensor]] = None,
                            generator: Optional[torch.Generator] = None) -> tuple[Cond, torch.Tensor]:
    """Train-time dropout: returns (condition for the denoiser, drop mask [B])."""
    ref = cond["context"] if cond.get("context") is not None else next(v for v in cond.values() if v is not None)
    drop = sample_drop_mask(ref.shape[0], p, device=ref.device, generator=generator)
    if mode == "learned":
        out = dict(cond)
        out["drop"] = drop if cond.get("drop") is None else (cond["drop"] | drop)
        return out, drop
    if mode == "empty":
        if empty is None:
            raise ValueError("condition dropout with null 'empty' needs the empty-prompt embedding")
        return replace_with_empty(cond, drop, empty), drop
    raise ValueError(f"null mode {mode!r}: expected 'empty' or 'learned'")


def substitute_learned_null(context: Optional[torch.Tensor], context_mask: Optional[torch.Tensor],
                            pooled: Optional[torch.Tensor], drop: Optional[torch.Tensor],
                            null_context: Optional[torch.Tensor], null_pooled: Optional[torch.Tensor]):
    """Inside a denoiser: rows with drop=True get the learned null caption (all tokens valid)."""
    if drop is None:
        return context, context_mask, pooled
    if null_context is None:
        raise ValueError("a drop mask was passed but the denoiser has no learned null caption "
                         "(set denoiser.learned_null_tokens to the text length)")
    drop = drop.to(torch.bool)
    if context is not None:
        if context.shape[1] != null_context.shape[0]:
            raise ValueError(f"text length {context.shape[1]} != learned null length {null_context.shape[0]} "
                             "(denoiser.learned_null_tokens)")
        context = _where_rows(drop, null_context[None], context)
        if context_mask is not None:
            context_mask = context_mask.to(torch.bool) | drop[:, None]
    if pooled is not None and null_pooled is not None:
        pooled = _where_rows(drop, null_pooled[None], pooled)
    return context, context_mask, pooled


def unconditional_like(cond: Mapping[str, torch.Tensor], mode: str,
                       empty: Optional[Mapping[str, torch.Tensor]] = None, null_label: Optional[int] = None) -> Cond:
    """The unconditional counterpart of a batch condition, for guidance at sampling time."""
    ref = next(v for v in cond.values() if v is not None)
    batch = ref.shape[0]
    all_drop = torch.ones(batch, dtype=torch.bool, device=ref.device)
    out = dict(cond)
    if "labels" in cond and null_label is not None:
        out["labels"] = torch.full_like(cond["labels"], null_label)
    if mode == "learned":
        out["drop"] = all_drop
        return out
    if mode == "empty":
        if empty is None:
            raise ValueError("unconditional sampling with null 'empty' needs the empty-prompt embedding")
        return replace_with_empty(out, all_drop, empty)
    raise ValueError(f"null mode {mode!r}: expected 'empty' or 'learned'")


def concat_conds(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Cond:
    """Stack two conditions along the batch. A key present in one only (e.g. `drop`) is filled with its
    neutral value (False) for the other so that the denoiser sees one consistent batch."""
    out = {}
    na = next(v for v in a.values() if v is not None).shape[0]
    nb = next(v for v in b.values() if v is not None).shape[0]
    for key in dict.fromkeys(list(a) + list(b)):
        va, vb = a.get(key), b.get(key)
        if va is None and vb is None:
            continue
        if va is None or vb is None:
            if key != "drop":
                raise KeyError(f"condition key {key!r} present on one side of the concatenation only")
            ref = va if va is not None else vb
            va = va if va is not None else torch.zeros(na, dtype=torch.bool, device=ref.device)
            vb = vb if vb is not None else torch.zeros(nb, dtype=torch.bool, device=ref.device)
        out[key] = torch.cat([va, vb], dim=0)
    return out
