"""Batches onto the training device: tensors moved (non-blocking from pinned memory), raw images scaled there.

The training loader hands raw images over as uint8 [B, H, W, 3] (data_pipeline's `uint8_images=True`): a
quarter of the bytes over PCIe and no float copy on the host cores that decode. They become float32
[B, 3, H, W] in [-1, 1] here, on the device, bit for bit as the host's numpy scaling would make them.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from data_pipeline.transforms import to_float_on_device


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    image = out.get("image")
    if image is not None and image.dtype == torch.uint8:
        out["image"] = to_float_on_device(image)
    return out
