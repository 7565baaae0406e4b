"""The Inception-v3 feature extractor of FID / KID, from a local weights file only.

Two weight files are understood (both torchvision `Inception3` state dicts, read with weights_only=True):
- `pt_inception-2015-12-05-6726825d.pth`: the TensorFlow FID Inception ported to PyTorch (as used by
  pytorch-fid; 1008 classes). Its blocks differ from torchvision's in pooling: the average pools of the
  A, C and first E blocks exclude the padding, the last E block max-pools. Built here as torchvision's
  Inception3 with those blocks' forward passes adjusted: FID numbers comparable with pytorch-fid's.
- `inception_v3_google-0cc3c7bd.pth`: torchvision's ImageNet Inception-v3 (1000 classes), unchanged.
  Its FIDs are self-consistent but not comparable with published ones.
The variant follows from the file (1008 vs 1000 classes). Nothing is downloaded: the file is the path
given, else `$LDM_INCEPTION_WEIGHTS`, else the first of the two names above found in the eval weights
folder (`$LDM_EVAL_WEIGHTS_DIR`, default torch hub's `checkpoints/` folder); a missing file is an error
naming what was looked for. A file whose name carries `-<hex>.` is sha256-checked against that prefix.

Features: images in [0, 1] resized to 299 x 299 (bilinear, as pytorch-fid), mapped to [-1, 1], the
2048-d output of the final average pool (pool3).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
TORCHVISION_WEIGHTS = "inception_v3_google-0cc3c7bd.pth"
FEATURE_DIM = 2048
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^-.]*$")


class EvalWeightsError(FileNotFoundError):
    """A metric's weights file is missing or fails its check."""


def eval_weights_dir() -> Path:
    env = os.environ.get("LDM_EVAL_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path(torch.hub.get_dir()) / "checkpoints"


def resolve_inception_path(path: Optional[str | Path] = None) -> Path:
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise EvalWeightsError(f"Inception weights file {str(p)!r} not found (FID/KID need the FID Inception "
                               f"{FID_WEIGHTS} or torchvision's {TORCHVISION_WEIGHTS})")
    env = os.environ.get("LDM_INCEPTION_WEIGHTS")
    if env:
        return resolve_inception_path(env)
    folder = eval_weights_dir()
    for name in (FID_WEIGHTS, TORCHVISION_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise EvalWeightsError(
        f"FID/KID need Inception-v3 weights and found none: expected {str(folder / FID_WEIGHTS)!r} (the FID "
        f"Inception of pytorch-fid) or {str(folder / TORCHVISION_WEIGHTS)!r} (torchvision's). Nothing is "
        f"downloaded: put one there (or set LDM_EVAL_WEIGHTS_DIR / LDM_INCEPTION_WEIGHTS), or pass --inception FILE.")


def _check_hash(path: Path) -> None:
    m = _HASH_IN_NAME.search(path.name)
    if m is None:
        return
    from autoencoder.perceptual import sha256_file

    digest = sha256_file(path)
    if not digest.startswith(m.group(1)):
        raise EvalWeightsError(f"checksum mismatch for {str(path)!r}: sha256 {digest[:16]}... does not start with "
                               f"{m.group(1)!r} from its name (a corrupted or different file)")


# ----------------------------------------------------------------------------- FID pooling variants

def _fid_block_a(block, x):
    pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    b5 = block.branch5x5_2(block.branch5x5_1(x))
    b3 = block.branch3x3dbl_3(block.branch3x3dbl_2(block.branch3x3dbl_1(x)))
    return torch.cat([block.branch1x1(x), b5, b3, block.branch_pool(pool)], 1)


def _fid_block_c(block, x):
    pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    b7 = block.branch7x7_3(block.branch7x7_2(block.branch7x7_1(x)))
    d = x
    for i in range(1, 6):
        d = getattr(block, f"branch7x7dbl_{i}")(d)
    return torch.cat([block.branch1x1(x), b7, d, block.branch_pool(pool)], 1)


def _fid_block_e(block, x, max_pool: bool):
    a = block.branch3x3_1(x)
    b3 = torch.cat([block.branch3x3_2a(a), block.branch3x3_2b(a)], 1)
    d = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    bd = torch.cat([block.branch3x3dbl_3a(d), block.branch3x3dbl_3b(d)], 1)
    pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if max_pool else \
        F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([block.branch1x1(x), b3, bd, block.branch_pool(pool)], 1)


class _Patched(nn.Module):
    """A torchvision Inception block whose forward uses the FID network's pooling (same parameters)."""

    def __init__(self, block: nn.Module, kind: str):
        super().__init__()
        self.block = block
        self.kind = kind

    def forward(self, x):
        if self.kind == "a":
            return _fid_block_a(self.block, x)
        if self.kind == "c":
            return _fid_block_c(self.block, x)
        return _fid_block_e(self.block, x, max_pool=self.kind == "e_max")


class InceptionFeatures(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> pool3 features [B, 2048] (float32)."""

    def __init__(self, num_classes: int = 1008, fid_variant: bool = True, size: int = 299):
        super().__init__()
        from torchvision.models.inception import Inception3

        net = Inception3(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)
        self.fid_variant = fid_variant
        self.size = size
        self.net = net
        if fid_variant:
            kinds = {"Mixed_5b": "a", "Mixed_5c": "a", "Mixed_5d": "a", "Mixed_6b": "c", "Mixed_6c": "c",
                     "Mixed_6d": "c", "Mixed_6e": "c", "Mixed_7b": "e_avg", "Mixed_7c": "e_max"}
            self._patched = {name: _Patched(getattr(net, name), kind) for name, kind in kinds.items()}
        else:
            self._patched = {}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)   # BatchNorm must use its running statistics

    def _stage(self, name: str, x):
        return self._patched[name](x) if name in self._patched else getattr(self.net, name)(x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        n = self.net
        x = n.maxpool1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))
        x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = self._stage(name, x)
        return torch.flatten(n.avgpool(x), 1).float()


def load_inception(path: Optional[str | Path] = None, size: int = 299) -> tuple[InceptionFeatures, dict]:
    """(feature extractor, {"path", "variant"}) from a local file (see the module docstring)."""
    file = resolve_inception_path(path)
    _check_hash(file)
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalWeightsError(f"{str(file)!r} is not a weights-only torch file: {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or "fc.weight" not in sd or "Mixed_7c.branch_pool.conv.weight" not in sd:
        raise EvalWeightsError(f"{str(file)!r} does not hold an Inception-v3 state dict (torchvision layout)")
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    classes = int(sd["fc.weight"].shape[0])
    model = InceptionFeatures(num_classes=classes, fid_variant=classes == 1008, size=size)
    model.net.load_state_dict(sd, strict=True)
    return model.eval(), {"path": str(file), "variant": "fid" if classes == 1008 else "torchvision", "size": size}
