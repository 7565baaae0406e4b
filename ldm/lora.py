"""LoRA through peft on our plain nn.Modules: inject, freeze the base, adapter state, merge.

No adapter layer of our own: `peft.inject_adapter_in_model` swaps each targeted nn.Linear for peft's
`lora.Linear` (the original kept as `.base_layer`), so parameter names gain `base_layer.` and
`lora_A.default.` / `lora_B.default.`. `base_state_dict` / `load_base_state_dict` translate to and from
the plain names, so weights of a model without adapters load unchanged. launch/ decides when to call this.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .config import LORA_DEFAULT_TARGETS, LoRAConfig

ADAPTER = "default"


def default_targets(kind: str) -> tuple[str, ...]:
    return LORA_DEFAULT_TARGETS[kind]


def _present(module: nn.Module, targets: Iterable[str]) -> list[str]:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def inject(module: nn.Module, cfg: LoRAConfig, kind: str) -> nn.Module:
    """Add LoRA adapters in place to the targeted Linear layers, freeze everything else; returns module."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(cfg.targets) or list(default_targets(kind))
    found = _present(module, targets)
    if not found:
        raise ValueError(f"config key 'lora.targets' = {targets!r} matches no nn.Linear of the {kind}; "
                         f"allowed: suffixes of its Linear module names, e.g. {list(default_targets(kind))}")
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                      lora_dropout=cfg.dropout, target_modules=found, bias="none")
    module.requires_grad_(False)
    inject_adapter_in_model(lcfg, module, adapter_name=ADAPTER)
    for n, p in module.named_parameters():
        p.requires_grad_(".lora_" in n)
    module.lora_config = lcfg           # read by export (alpha / rank) and merge
    return module


def has_lora(module: nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in module.named_parameters())


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name


def plain_name(name: str) -> str:
    """`a.to_q.base_layer.weight` -> `a.to_q.weight` (names of the model without adapters)."""
    return name.replace(".base_layer.", ".")


def adapter_state_dict(module_or_state) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, in peft's names without the adapter name: `x.to_q.lora_A.weight`."""
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    return {k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if is_lora_key(k)}


def base_state_dict(module_or_state) -> dict[str, torch.Tensor]:
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    return {plain_name(k): v for k, v in state.items() if not is_lora_key(k)}


def merged_state_dict(module_or_state, lora_config) -> dict[str, torch.Tensor]:
    """Plain-named weights with each adapter folded in: W + (alpha / r) * B @ A (what peft's merge does)."""
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    scale = lora_config.lora_alpha / lora_config.r
    out = base_state_dict(state)
    for k, a in state.items():
        if f".lora_A.{ADAPTER}.weight" not in k:
            continue
        prefix = k[: -len(f".lora_A.{ADAPTER}.weight")]
        b = state[f"{prefix}.lora_B.{ADAPTER}.weight"]
        w = out[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def map_into(module: nn.Module, plain_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a plain (no-adapter) state dict to this module's names (base_layer where adapted)."""
    ours = {plain_name(k): k for k in module.state_dict() if not is_lora_key(k)}
    return {ours.get(k, k): v for k, v in plain_state.items()}


def lora_config_of(module: nn.Module) -> Optional[object]:
    return getattr(module, "lora_config", None)
