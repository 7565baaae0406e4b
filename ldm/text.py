"""Frozen open_clip text encoder: captions -> token states, pooled embedding and padding mask.

Loading goes through open_clip's own code: `open_clip.create_model(arch, pretrained=tag_or_file)`, which
downloads a tag (or finds it in its cache) and loads a file with `open_clip.load_checkpoint`. Any
open_clip model config works (built-in, a `local-dir:` folder, or a JSON registered through
`TextEncoderConfig.model_config` / `open_clip.add_model_config`) as long as its text tower is open_clip's
own transformer; Hugging Face text towers are refused with a clear error. The image tower is dropped
right after loading.

Outputs (the batch keys the precompute step writes, so precomputed and online text are interchangeable):
- text_hidden [B, L, width]: token states of the last layer, or of the penultimate layer; in both cases
  the final LayerNorm is applied (SD2 takes the penultimate layer of OpenCLIP ViT-H and normalises it with
  ln_final, which keeps the states on the scale the last layer had in training). `layer: penultimate_raw`
  takes the penultimate layer without it, as SD3 does (diffusers' `hidden_states[-2]`).
- text_pooled [B, embed_dim]: open_clip's text feature (final LN, pooled at the end-of-text token,
  projected), unnormalised.
- text_mask [B, L] bool: True up to and including the end-of-text token. (Padding is id 0, which is also
  a vocabulary entry, so the mask comes from the end-of-text position rather than from `ids != 0`.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

def _default_cache(kind: str) -> str:
    if kind == "hf":
        return os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    return os.path.expanduser("~/.cache/clip")


def resolve_model_config(path: str) -> Path:
    """A model-config path as given, else relative to the repository (configs name `configs/ldm/...`)."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(Path(__file__).resolve().parents[1] / path)
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(f"text_encoder.model_config: no open_clip model config at "
                            f"{' or '.join(str(c) for c in candidates)}")


def create_open_clip(arch: str, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                     model_config: Optional[str] = None, context_length: Optional[int] = None,
                     init_seed: int = 0) -> nn.Module:
    """Build the open_clip model through open_clip's loader, with errors that name what is missing."""
    import open_clip

    if model_config is not None:
        open_clip.add_model_config(resolve_model_config(model_config))
    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    if context_length is not None:
        kwargs["force_context_length"] = context_length
    if not pretrained or arch.startswith(("hf-hub:", "local-dir:")):
        # A random tower must be the same tower in every process (ranks, precompute, sampling): seed its
        # init from `init_seed` without touching the caller's RNG streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return open_clip.create_model(arch, **kwargs)  # random init, or weights inside the schema source
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        try:
            return open_clip.create_model(arch, pretrained=pretrained, **kwargs)
        except Exception as e:  # offline and not cached, or a broken download
            where = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "?"
            cache = cache_dir or _default_cache("hf" if tag_cfg.get("hf_hub") else "url")
            raise FileNotFoundError(
                f"could not load open_clip weights {arch}/{pretrained} (source {where}); expected them in the "
                f"cache {cache} (set text_encoder.cache_dir, or give a local checkpoint path as "
                f"text_encoder.pretrained). Cause: {e}") from e
    if not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise FileNotFoundError(f"text encoder checkpoint not found: {os.path.abspath(pretrained)} (and "
                                f"{pretrained!r} is not a pretrained tag of {arch!r}; "
                                f"tags: {', '.join(tags) or 'none'})")
    return open_clip.create_model(arch, pretrained=pretrained, **kwargs)   # open_clip.load_checkpoint inside


class OpenCLIPTextEncoder(nn.Module):
    """Frozen text tower. `forward(captions)` returns a dict with text_hidden, text_mask, text_pooled."""

    def __init__(self, arch: str = "ViT-L-14", pretrained: Optional[str] = None, layer: str = "last",
                 cache_dir: Optional[str] = None, model_config: Optional[str] = None,
                 context_length: Optional[int] = None, init_seed: int = 0):
        super().__init__()
        import open_clip

        if layer not in ("last", "penultimate", "penultimate_raw"):
            raise ValueError(f"layer {layer!r}: expected 'last', 'penultimate' or 'penultimate_raw'")
        self.layer = layer
        clip = create_open_clip(arch, pretrained, cache_dir, model_config, context_length, init_seed)
        tower = getattr(clip, "text", None)
        if tower is not None and not hasattr(getattr(tower, "transformer", None), "resblocks"):
            raise NotImplementedError(f"open_clip model {arch!r} has a Hugging Face text tower "
                                      f"({type(tower).__name__}); only open_clip's own text transformer is supported")
        if hasattr(clip, "visual"):
            clip.visual = None          # the image tower is never used: free it
        self.clip = clip
        self.tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
        text = tower if tower is not None else clip
        self.num_layers = len(text.transformer.resblocks)
        self.width = text.transformer.width
        self.context_length = int(getattr(clip, "context_length", getattr(text, "context_length", 77)))
        proj = text.text_projection
        self.pooled_dim = (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]) \
            if proj is not None else self.width
        self.eot_id = getattr(self.tokenizer, "eot_token_id", None)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)     # frozen: always in eval mode, whatever the runtime asks

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        if self.eot_id is not None and bool((ids == self.eot_id).any(dim=1).all()):
            eot = (ids == self.eot_id).int().argmax(dim=1)
        else:                            # CLIP BPE: end-of-text has the highest id
            eot = ids.argmax(dim=1)
        return torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]

    @torch.no_grad()
    def encode_tokens(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        index = self.num_layers - 1 if self.layer == "last" else self.num_layers - 2
        out = self.clip.forward_intermediates(text=ids, text_indices=[index], normalize=False,
                                              normalize_intermediates=self.layer != "penultimate_raw")
        return {"text_hidden": out["text_intermediates"][0].float(),
                "text_mask": self.padding_mask(ids),
                "text_pooled": out["text_features"].float()}

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.clip.parameters()).device
        return self.encode_tokens(self.tokenize(captions).to(device))


def build_text_encoder(cfg) -> OpenCLIPTextEncoder:
    """TextEncoderConfig -> frozen encoder (weights through open_clip's loader)."""
    return OpenCLIPTextEncoder(cfg.arch, cfg.pretrained, cfg.layer, cfg.cache_dir, cfg.model_config,
                               cfg.context_length, cfg.init_seed)
