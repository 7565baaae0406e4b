"""LPIPS: the real VGG16 path (hashed file), its errors, frozen-but-differentiable behaviour."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from autoencoder.config import AutoencoderLossConfig
from autoencoder.perceptual import LPIPS, PerceptualWeightsError, build_perceptual, hub_vgg16_path, load_vgg16_features

lpips_pkg = pytest.importorskip("lpips")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _reference_lpips(vgg_file) -> torch.nn.Module:
    """The lpips package's own LPIPS (its bundled heads), with our test trunk copied in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    feats = load_vgg16_features(vgg_file)
    for name, p in ref.net.named_parameters():
        p.data.copy_(feats["features." + name.split(".", 1)[1]])
    return ref.eval()


def test_loads_hashed_file_and_equals_lpips_package(vgg16_file, empty_torch_home):
    m = LPIPS("vgg16", vgg_path=str(vgg16_file))
    assert m.is_real and m.source == str(vgg16_file)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    d = m(x, y)
    assert d.shape == (2,)
    want = _reference_lpips(vgg16_file)(x, y).flatten()
    assert torch.allclose(d, want, atol=1e-6)
    assert float(m(x, x).abs().max()) < 1e-6


def test_hub_cache_is_used_and_checked(vgg16_file, empty_torch_home):
    hub = hub_vgg16_path()
    assert str(hub).startswith(str(empty_torch_home))
    hub.parent.mkdir(parents=True)
    shutil.copy(vgg16_file, hub)   # right layout, but not the ImageNet file named 397923af
    with pytest.raises(PerceptualWeightsError, match="checksum mismatch") as e:
        LPIPS("vgg16")
    assert str(hub) in str(e.value)
    # with the expected hash configured explicitly, the same file in the cache loads
    digest = vgg16_file.name.split("-")[1].split(".")[0]
    assert LPIPS("vgg16", vgg_sha256=digest).source == str(hub)


def test_wrong_hash_and_corrupt_file_fail(vgg16_file, tmp_path, empty_torch_home):
    renamed = tmp_path / "vgg16-deadbeef.pth"
    shutil.copy(vgg16_file, renamed)
    with pytest.raises(PerceptualWeightsError, match="checksum mismatch") as e:
        LPIPS("vgg16", vgg_path=str(renamed))
    assert str(renamed) in str(e.value)
    corrupt = tmp_path / vgg16_file.name
    data = bytearray(vgg16_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(PerceptualWeightsError, match="checksum mismatch"):
        LPIPS("vgg16", vgg_path=str(corrupt))
    unnamed = tmp_path / "vgg.pth"
    shutil.copy(vgg16_file, unnamed)
    with pytest.raises(PerceptualWeightsError, match="vgg_sha256"):
        LPIPS("vgg16", vgg_path=str(unnamed))


def test_missing_file_names_both_places(tmp_path, empty_torch_home):
    hub = str(hub_vgg16_path())
    with pytest.raises(PerceptualWeightsError) as e:
        LPIPS("vgg16")
    assert hub in str(e.value) and "loss.vgg_path" in str(e.value)
    missing = str(tmp_path / "nowhere" / "vgg16-01234567.pth")
    with pytest.raises(PerceptualWeightsError) as e:
        LPIPS("vgg16", vgg_path=missing)
    assert missing in str(e.value) and hub in str(e.value)
    # through the config: the same error, unless the weight is 0 (warned, nothing built)
    with pytest.raises(PerceptualWeightsError):
        build_perceptual(AutoencoderLossConfig())
    with pytest.warns(UserWarning, match="perceptual_weight = 0"):
        assert build_perceptual(AutoencoderLossConfig(perceptual_weight=0.0)) is None


def test_frozen_eval_and_differentiable(vgg16_file):
    m = LPIPS("vgg16", vgg_path=str(vgg16_file))
    m.train()
    assert not m.training and not any(mod.training for mod in m.modules())
    assert not any(p.requires_grad for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    m(y, x).sum().backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0
    assert all(p.grad is None for p in m.parameters())
    d1, d2 = m(y, x), m(y, x)   # dropout in the heads never on: deterministic
    assert torch.equal(d1, d2)


def test_random_backbone_is_explicit_and_not_lpips(empty_torch_home):
    m = LPIPS("random")
    assert not m.is_real and m.source.startswith("random")
    x = torch.zeros(1, 3, 32, 32)
    assert float(m(x, x + 0.5)) > 0
    with pytest.raises(ValueError):
        LPIPS("alex")
