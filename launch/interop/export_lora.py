"""The LoRA side of `ldm export`: a run trained with `lora.rank` > 0 (ldm/lora.py) exports

- by default, the base weights as the normal export plus the adapter alone as
  `OUT/pytorch_lora_weights.safetensors`, in the layout diffusers' `load_lora_weights` (pipeline) and
  `UNet2DConditionModel.load_lora_adapter(..., prefix="unet")` read: peft keys `unet.<diffusers module
  path>.lora_A.weight` / `.lora_B.weight` (names through ldm/convert.py, the same mapping as the full
  diffusers export), with rank, alpha and target modules in the `lora_adapter_metadata` header;
- with `--merge-lora`, the merged weights W + (alpha / r) B A as the normal export (no adapter file).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch

from launch.runtime.exportdir import ExportError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"      # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def is_lora_state(state: Mapping[str, torch.Tensor]) -> bool:
    from ldm.lora import is_lora_key
    return any(is_lora_key(k) for k in state)


def split_state(state: Mapping[str, torch.Tensor], lora_cfg, merge: bool
                ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]]]:
    """(weights under plain names: base, or merged when `merge`; the adapter in peft naming or None)."""
    from ldm.lora import adapter_state_dict, base_state_dict, merged_state_dict
    from peft import LoraConfig

    lcfg = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank)
    if merge:
        return merged_state_dict(dict(state), lcfg), None
    return base_state_dict(dict(state)), adapter_state_dict(dict(state))


def _module_path(prefix: str, kind: str) -> str:
    """Our module path of an adapted Linear -> its diffusers path (through the weight key mapping)."""
    if kind == "unet":
        from ldm.convert import unet_key_to_diffusers
        return unet_key_to_diffusers(prefix + ".weight")[: -len(".weight")]
    raise ExportError(f"the LoRA adapter export in diffusers layout supports denoiser.kind 'unet' (got {kind!r}); "
                      f"export with --merge-lora for full merged weights")


def write_adapter(out: Path, adapter: Mapping[str, torch.Tensor], lora_cfg, kind: str, dtype: str,
                  extra_metadata: Optional[dict] = None) -> dict:
    """OUT/pytorch_lora_weights.safetensors; returns the JSON summary kept in config.json."""
    from safetensors.torch import save_file

    from launch.runtime.exportdir import DTYPES

    tensors, modules = {}, set()
    for k, v in adapter.items():
        prefix, ab, _ = k.rsplit(".", 2)       # "<our path>.lora_A.weight"
        path = _module_path(prefix, kind)
        modules.add(path)
        tensors[f"unet.{path}.{ab}.weight"] = v.detach().to(DTYPES[dtype]).contiguous()
    alpha = lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank
    peft_meta = {"r": lora_cfg.rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted(modules),
                 "bias": "none"}
    meta = {"format": "pt", METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in peft_meta.items()}, sort_keys=True)}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    save_file(tensors, str(out / ADAPTER_FILE), metadata=meta)
    return {"file": ADAPTER_FILE, "rank": lora_cfg.rank, "alpha": alpha, "modules": len(modules),
            "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))}
