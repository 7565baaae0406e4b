"""LPIPS (Zhang et al. 2018) with the VGG16 trunk, loaded offline and checked.

- The calibrated linear heads come from the `lpips` wheel (`lpips/weights/v0.1/vgg.pth`).
- The VGG16 trunk is torchvision's ImageNet `vgg16` state dict, read from `loss.vgg_path` or the
  torch hub cache (`torch.hub.get_dir()/checkpoints/vgg16-397923af.pth`); only its `features.*`
  tensors are used (~14.7M parameters), so a file holding just those works too.
- The file is sha256-checked: as in torchvision / torch.hub, the hex digits after the last "-" in
  the file name are the start of the file's sha256 (or set `loss.vgg_sha256`).
- Nothing is downloaded: `lpips.LPIPS` is built on the meta device with a random trunk and
  untrained heads, then every tensor is filled from those files.

The module is frozen and stays in eval mode (`train()` is a no-op), but it is differentiable:
gradients reach its inputs, which is the point of a perceptual *loss* (diffusers' autoencoder
example evaluates LPIPS under no_grad, so its reconstruction never gets that gradient).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^-]*$")


class PerceptualWeightsError(FileNotFoundError):
    """The VGG16 weights are missing or fail their checksum."""


def hub_vgg16_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_linear_weights_path() -> Path:
    import lpips
    return Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_vgg16_path(vgg_path: Optional[str] = None) -> Path:
    """The explicit path if configured, else the torch hub cache file. Missing -> an error naming both."""
    hub = hub_vgg16_path()
    if vgg_path:
        path = Path(vgg_path).expanduser()
        if path.is_file():
            return path
        raise PerceptualWeightsError(
            f"LPIPS needs the ImageNet VGG16 weights (torchvision's {VGG16_FILE}): loss.vgg_path = {str(path)!r} "
            f"does not exist; the torch hub cache would be {str(hub)!r}"
            f"{' (present: unset loss.vgg_path to use it)' if hub.is_file() else ' (absent too)'}.")
    if hub.is_file():
        return hub
    raise PerceptualWeightsError(
        f"LPIPS needs the ImageNet VGG16 weights (torchvision's {VGG16_FILE}) and found neither loss.vgg_path "
        f"(not set) nor the torch hub cache file {str(hub)!r}. Nothing is downloaded here: copy the file to "
        f"that path (or set TORCH_HOME) or point loss.vgg_path at it; set loss.perceptual_weight=0 to "
        f"train without LPIPS.")


def verify_sha256(path: Path, expected: Optional[str] = None) -> str:
    """Check `path` against `expected` (a sha256 or prefix), else against the hash in its name."""
    if expected is None:
        m = _HASH_IN_NAME.search(path.name)
        if m is None:
            raise PerceptualWeightsError(
                f"cannot check {str(path)!r}: its name carries no '-<sha256 prefix>.' (as in {VGG16_FILE}) "
                f"and loss.vgg_sha256 is not set")
        expected = m.group(1)
    digest = sha256_file(path)
    if not digest.startswith(expected.lower()):
        raise PerceptualWeightsError(
            f"checksum mismatch for {str(path)!r}: sha256 {digest[:16]}... does not start with {expected.lower()!r} "
            f"(a corrupted or different file; expected torchvision's ImageNet VGG16)")
    return digest


def load_vgg16_features(path: Path) -> dict[str, torch.Tensor]:
    """`features.N.weight|bias` tensors of a torchvision VGG16 state dict (full or features-only)."""
    try:   # memory-map zip-format files so the 400 MB classifier is never read
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:   # legacy (pre-zip) serialization, as the hub file is
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    if not feats:
        raise PerceptualWeightsError(f"{str(path)!r} holds no 'features.*' tensors: not a torchvision VGG16 state dict")
    return feats


class LPIPS(nn.Module):
    """d(x, y) per sample, [B]; inputs in [-1, 1], any size >= 16 px.

    backbone="vgg16": real LPIPS (see module docstring). backbone="random": a seeded random trunk
    with the real linear heads — a shape-correct, differentiable stand-in for tests; its values are
    not LPIPS, and `is_real` is False so callers log it under another name.
    """

    def __init__(self, backbone: str = "vgg16", vgg_path: Optional[str] = None, vgg_sha256: Optional[str] = None,
                 seed: int = 0):
        super().__init__()
        import lpips
        if backbone not in ("vgg16", "random"):
            raise ValueError(f"perceptual backbone {backbone!r}: expected 'vgg16' or 'random'")
        self.is_real = backbone == "vgg16"
        with warnings.catch_warnings():   # torchvision's `pretrained=` deprecation notice
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        # the scaling layer's constants are created by the legacy tensor constructor, i.e. on CPU
        # even under the meta device; keep them, materialise everything else, then fill it
        shift, scale = net.scaling_layer.shift.clone(), net.scaling_layer.scale.clone()
        net = net.to_empty(device="cpu")
        net.scaling_layer.shift.copy_(shift)
        net.scaling_layer.scale.copy_(scale)
        self.source = self._fill_trunk(net.net, vgg_path, vgg_sha256, seed)
        heads = torch.load(lpips_linear_weights_path(), map_location="cpu", weights_only=True)
        for i in range(5):
            getattr(net, f"lin{i}").model[1].weight.data.copy_(heads[f"lin{i}.model.1.weight"])
        self.net = net
        self.requires_grad_(False)
        self.eval()

    def _fill_trunk(self, trunk: nn.Module, vgg_path: Optional[str], vgg_sha256: Optional[str], seed: int) -> str:
        """Fill lpips' VGG slices ("slice{s}.{N}.weight") from torchvision's "features.{N}.weight"."""
        targets = dict(trunk.named_parameters())
        if not self.is_real:
            gen = torch.Generator().manual_seed(seed)
            for name, p in targets.items():
                if name.endswith("weight"):   # He init keeps activations O(1) through 13 ReLU convs
                    fan_in = p[0].numel()
                    p.data.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                else:
                    p.data.zero_()
            return f"random(seed={seed})"
        path = resolve_vgg16_path(vgg_path)
        verify_sha256(path, vgg_sha256)
        feats = load_vgg16_features(path)
        for name, p in targets.items():
            src = "features." + name.split(".", 1)[1]
            if src not in feats:
                raise PerceptualWeightsError(f"{str(path)!r} lacks {src}: not a torchvision VGG16 state dict")
            if feats[src].shape != p.shape:
                raise PerceptualWeightsError(f"{str(path)!r}: {src} has shape {tuple(feats[src].shape)}, "
                                             f"VGG16 needs {tuple(p.shape)}")
            p.data.copy_(feats[src])
        return str(path)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)   # frozen metric: dropout in the heads must never switch on

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y).flatten(1).sum(1)


def build_perceptual(cfg) -> Optional[LPIPS]:
    """LPIPS for an AutoencoderLossConfig, or None (with a warning) when perceptual_weight is 0."""
    if cfg.perceptual_weight == 0:
        warnings.warn("loss.perceptual_weight = 0: training without LPIPS (no VGG16 weights needed)", stacklevel=2)
        return None
    return LPIPS(cfg.perceptual_backbone, cfg.vgg_path, cfg.vgg_sha256)
