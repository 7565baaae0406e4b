"""Several frozen text encoders behind one module, joined as SD3 does, with per-encoder condition dropout.

`text.encoders` (ldm/config.py TextConfig) lists open_clip towers (ldm/text.py) and T5 encoders (ldm/t5.py).
Each encoder gives a *part* {text_hidden [B, L_i, D_i], text_mask [B, L_i], text_pooled [B, P_i] (open_clip
only)}; `join_text` makes the one condition the denoiser sees (SD3, diffusers' StableDiffusion3Pipeline):

    open_clip parts: hidden states concatenated on channels in list order (CLIP-L 768 + bigG 1280 = 2048),
                     over the longest open_clip length; token masks OR-ed (a position is text in any tower)
    then:            every group zero-padded on channels to the joined width (the widest: T5-XXL's 4096)
                     and concatenated on the sequence axis, open_clip group first, T5 parts in list order
                     (77 + 256 = 333 tokens); masks concatenated the same way
    pooled:          the open_clip parts' pooled vectors concatenated (768 + 1280 = 2048); T5 has none

With one open_clip encoder the join is the identity, so every single-encoder config is unchanged.

Per-encoder dropout (SD3's and sgm's practice): at train time, each encoder's part of a sample is replaced
by that encoder's empty-prompt part with its own probability, independently; the empty-prompt parts are
encoded once and cached (`empty_parts`). The join happens after the dropout.

Storage (precompute, `parts_to_arrays` / `parts_from_batch`): every encoder's part is stored on its own,
encoder 0 under the single-encoder names (text_hidden, text_mask, text_pooled) and encoder i >= 1 under
`text_hidden_i`, ... Separate parts because the per-encoder dropout needs each part to substitute, and the
joined form would store the zero padding (SD3: 77 x 2048 zeros per caption) and fix the join at precompute
time. A single-encoder shard is exactly the layout it always had.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import fit_tokens, sample_drop_mask

PART_KEYS = ("text_hidden", "text_mask", "text_pooled")
Part = dict  # str -> Tensor


def part_key(key: str, index: int) -> str:
    """Batch / shard name of encoder `index`'s array `key` (encoder 0 keeps the single-encoder name)."""
    return key if index == 0 else f"{key}_{index}"


def join_text(parts: Sequence[Part], kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-encoder parts -> the joined {text_hidden, text_mask, text_pooled?} (module docstring)."""
    if len(parts) != len(kinds) or not parts:
        raise ValueError(f"join_text: {len(parts)} parts for {len(kinds)} encoders")
    clip = [p for p, k in zip(parts, kinds) if k == "open_clip"]
    seqs, masks = [], []
    if clip:
        length = max(p["text_hidden"].shape[1] for p in clip)
        seqs.append(torch.cat([fit_tokens(p["text_hidden"], length) for p in clip], dim=-1))
        masks.append(torch.stack([fit_tokens(_mask(p), length, fill=False) for p in clip]).any(dim=0))
    for p, k in zip(parts, kinds):
        if k != "open_clip":
            seqs.append(p["text_hidden"])
            masks.append(_mask(p))
    width = max(s.shape[-1] for s in seqs)
    out = {"text_hidden": torch.cat([F.pad(s, (0, width - s.shape[-1])) for s in seqs], dim=1),
           "text_mask": torch.cat(masks, dim=1)}
    pooled = [p["text_pooled"] for p in clip if p.get("text_pooled") is not None]
    if pooled:
        out["text_pooled"] = torch.cat(pooled, dim=-1)
    return out


def _mask(part: Part) -> torch.Tensor:
    m = part.get("text_mask")
    h = part["text_hidden"]
    return m.bool() if m is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)


def drop_parts(parts: Sequence[Part], empty: Sequence[Part], probs: Sequence[float],
               generator: Optional[torch.Generator] = None) -> tuple[list[Part], torch.Tensor]:
    """Per sample and per encoder, independently: part i of a sample becomes `empty[i]` (batch 1) with
    probability probs[i]. Returns (parts, drop mask [n_encoders, B] bool)."""
    out, drops = [], []
    for part, emp, p in zip(parts, empty, probs):
        ref = part["text_hidden"]
        drop = sample_drop_mask(ref.shape[0], float(p), device=ref.device, generator=generator) if p > 0 else \
            torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
        drops.append(drop)
        if not bool(drop.any()):
            out.append(dict(part))
            continue
        new = dict(part)
        for key in PART_KEYS:
            if part.get(key) is None:
                continue
            rep = emp[key].to(part[key].device)
            if key != "text_pooled":
                rep = fit_tokens(rep, part[key].shape[1], fill=False if key == "text_mask" else 0)
            shape = (drop.shape[0],) + (1,) * (part[key].dim() - 1)
            new[key] = torch.where(drop.view(shape), rep.to(part[key].dtype).expand_as(part[key]), part[key])
        out.append(new)
    return out, torch.stack(drops)


class TextEncoders(nn.Module):
    """Frozen text encoders. `forward(captions)` gives the joined dict (text_hidden, text_mask,
    text_pooled), like one encoder does; `encode_parts`, `drop_parts`, `join` are the steps."""

    def __init__(self, encoders: Sequence[nn.Module], kinds: Sequence[str],
                 dropout_probs: Optional[Sequence[float]] = None):
        super().__init__()
        if len(encoders) != len(kinds) or not encoders:
            raise ValueError(f"{len(encoders)} encoders for {len(kinds)} kinds")
        bad = [k for k in kinds if k not in ("open_clip", "t5")]
        if bad:
            raise ValueError(f"text encoder kind {bad[0]!r}: expected 'open_clip' or 't5'")
        self.encoders = nn.ModuleList(encoders)
        self.kinds = list(kinds)
        self.dropout_probs = [float(p) for p in (dropout_probs if dropout_probs is not None else [0.0] * len(kinds))]
        self._empty: Optional[list[Part]] = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def context_length(self) -> int:
        clip = [e.context_length for e, k in zip(self.encoders, self.kinds) if k == "open_clip"]
        return (max(clip) if clip else 0) + sum(e.context_length for e, k in zip(self.encoders, self.kinds)
                                                 if k != "open_clip")

    @property
    def width(self) -> int:
        clip = sum(e.width for e, k in zip(self.encoders, self.kinds) if k == "open_clip")
        return max([clip] + [e.width for e, k in zip(self.encoders, self.kinds) if k != "open_clip"])

    @property
    def pooled_dim(self) -> int:
        return sum(e.pooled_dim for e, k in zip(self.encoders, self.kinds) if k == "open_clip")

    @torch.no_grad()
    def encode_parts(self, captions: Sequence[str]) -> list[Part]:
        return [enc(list(captions)) for enc in self.encoders]

    def join(self, parts: Sequence[Part]) -> dict[str, torch.Tensor]:
        return join_text(parts, self.kinds)

    @torch.no_grad()
    def empty_parts(self) -> list[Part]:
        """Every encoder's output for the empty prompt (batch 1), encoded once."""
        if self._empty is None:
            self._empty = self.encode_parts([""])
        return self._empty

    def _apply(self, fn, *args, **kwargs):
        self._empty = None           # moved or cast: encode the empty prompt again where the encoders are
        return super()._apply(fn, *args, **kwargs)

    @property
    def drops_any(self) -> bool:
        return any(p > 0 for p in self.dropout_probs)

    def drop_parts(self, parts: Sequence[Part], generator: Optional[torch.Generator] = None
                   ) -> tuple[list[Part], torch.Tensor]:
        return drop_parts(parts, self.empty_parts(), self.dropout_probs, generator)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.join(self.encode_parts(captions))

    def parts_from_batch(self, batch: dict) -> list[Part]:
        """A precomputed batch's per-encoder arrays (see the module docstring) -> parts."""
        missing = [part_key("text_hidden", i) for i in range(len(self.kinds))
                   if part_key("text_hidden", i) not in batch]
        if missing:
            have = sorted(k for k in batch if k.startswith("text_hidden"))
            raise KeyError(f"precomputed text lacks {', '.join(missing)} (has {', '.join(have) or 'none'}): "
                           f"the config lists {len(self.kinds)} text encoders; precompute the shards with it")
        return [{key: batch[part_key(key, i)] for key in PART_KEYS if batch.get(part_key(key, i)) is not None}
                for i in range(len(self.kinds))]


def parts_to_arrays(parts: Sequence[Part]) -> dict[str, torch.Tensor]:
    """Parts -> flat {name: tensor} for storage (precompute)."""
    return {part_key(key, i): v for i, part in enumerate(parts) for key, v in part.items() if v is not None}


# ----------------------------------------------------------------------------- from the config

def text_encoder_entries(cfg) -> list:
    """The run's text encoders: `text.encoders`, or the single `text_encoder:` section as a one-entry list."""
    from .config import TextEncoderEntry

    text = getattr(cfg, "text", None)
    if text is not None and text.encoders:
        return list(text.encoders)
    single = cfg.text_encoder
    if isinstance(single, TextEncoderEntry):
        return [single]
    import dataclasses
    return [TextEncoderEntry(**{f.name: getattr(single, f.name) for f in dataclasses.fields(single)})]


def build_one(entry, index: int = 0) -> nn.Module:
    if entry.kind == "t5":
        from .t5 import T5TextEncoder
        return T5TextEncoder(entry.path, entry.max_length, entry.dtype, key=f"text.encoders[{index}].path")
    from .text import build_text_encoder
    return build_text_encoder(entry)


def needs_joining(entries) -> bool:
    """False for the one-open_clip-tower case, which keeps the bare tower (and all it exposes)."""
    return len(entries) > 1 or entries[0].kind != "open_clip" or entries[0].dropout_prob > 0


def build_text_encoders(cfg) -> nn.Module:
    """Root config (text, text_encoder) -> the bare open_clip tower for one open_clip encoder without
    per-encoder dropout (as before), else a `TextEncoders`."""
    entries = text_encoder_entries(cfg)
    if not needs_joining(entries):
        return build_one(entries[0])
    return TextEncoders([build_one(e, i) for i, e in enumerate(entries)], [e.kind for e in entries],
                        [e.dropout_prob for e in entries])


def encode_for_storage(encoder: nn.Module, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """What precompute stores for a batch of captions: every encoder's part (module docstring)."""
    if isinstance(encoder, TextEncoders):
        return parts_to_arrays(encoder.encode_parts(captions))
    return dict(encoder(list(captions)))
