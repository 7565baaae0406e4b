"""Frozen T5 encoder (transformers' `T5EncoderModel` and the folder's tokenizer): captions -> token states
and padding mask, the same keys as ldm/text.py's open_clip tower (T5 has no pooled vector).

The folder is what `save_pretrained` writes (for example google/t5-v1_1-xxl's text_encoder_3 and
tokenizer_3 of SD3, copied into one folder): `config.json` + weights, and a tokenizer `AutoTokenizer`
loads without network. Our locked install has `tokenizers` but not `sentencepiece`, so the tokenizer
must be the fast form (`tokenizer.json`); a folder with only `spiece.model` fails with transformers'
own message.

Outputs:
- text_hidden [B, max_length, d_model]: `last_hidden_state` (T5's final RMS norm applied), float32;
- text_mask [B, max_length] bool: the tokenizer's attention mask (True up to and including `</s>`).
Captions are padded to `max_length` and truncated there (SD3: 256 in diffusers, 77 in the paper).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_t5_folder(path: str, key: str = "text.encoders[].path") -> Path:
    """The T5 folder as given, else relative to the repository; a missing one names every place looked."""
    if not path:
        raise FileNotFoundError(f"{key}: a t5 text encoder needs the folder of a saved T5 (save_pretrained)")
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(Path(__file__).resolve().parents[1] / path)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(f"{key} = {path!r}: no T5 model folder at "
                            f"{' or '.join(str(c.resolve()) for c in candidates)} (expected config.json, weights "
                            "and tokenizer.json written by save_pretrained)")


class T5TextEncoder(nn.Module):
    """Frozen T5 encoder. `forward(captions)` returns a dict with text_hidden and text_mask."""

    pooled_dim = 0

    def __init__(self, path: str, max_length: int = 256, dtype: str = "float32", key: str = "text.encoders[].path"):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        folder = resolve_t5_folder(path, key)
        self.path = str(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = T5EncoderModel.from_pretrained(str(folder), dtype=_DTYPES[dtype])
        self.max_length = int(max_length)
        self.context_length = self.max_length
        self.width = int(self.model.config.d_model)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)     # frozen

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        # SD3 feeds T5 without an attention mask (padding tokens attend and are attended); so do we, and the
        # mask only tells the denoiser which tokens are padding (conditioning.use_text_mask).
        hidden = self.model(input_ids=ids).last_hidden_state
        return {"text_hidden": hidden.float(), "text_mask": mask.bool()}

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenize(captions)
        return self.encode_tokens(tok["input_ids"].to(device), tok["attention_mask"].to(device))
