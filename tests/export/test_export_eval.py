"""`ldm eval recon | fid | clip-score`: metric values on known inputs, through the real weight-loading paths
(Inception and CLIP files the tests write themselves), and clear errors for missing weight files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder.metrics import psnr, ssim
from export_helpers import cli
from launch.evaluate.fid import (feature_stats, fid_from_features, frechet_distance, kernel_inception_distance,
                        mmd2_unbiased)
from launch.evaluate.inception import FID_WEIGHTS, TORCHVISION_WEIGHTS, EvalWeightsError, load_inception

TINY_CLIP = "ldm-eval-tiny-clip"
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


# ----------------------------------------------------------------------------- pure maths

def test_psnr_capped_for_identical_images_and_exact_for_known_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(psnr(x, x), torch.full((2,), 100.0))           # MSE floor 1e-10: capped at 100 dB
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # +-d on [-1, 1] pixels is +-d/2 on [0, 1]: MSE = d^2 / 4 exactly
    d = 0.1
    sign = torch.where(torch.rand(2, 3, 32, 32, generator=g) < 0.5, -1.0, 1.0)
    assert torch.allclose(psnr(x + d * sign, x), torch.full((2,), -10 * math.log10(d * d / 4)), atol=1e-3)
    assert abs(-10 * math.log10(d * d / 4) - 26.0206) < 1e-3


def test_fid_closed_form_and_self_distance():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    # rotated (non-diagonal) covariances give the same value: FID is rotation invariant
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rot = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rot == pytest.approx(want, rel=1e-8)
    f = rng.normal(size=(40, 64))          # fewer samples than dimensions: rank-deficient covariance
    assert fid_from_features(f, f) < 1e-8
    mu, cov = feature_stats(f)
    assert mu.shape == (64,) and cov.shape == (64, 64)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3 and abs(same) < 0.02 * shifted
    assert shifted > 0.05
    # unbiasedness: averaged over many independent draws the estimate is ~0 (a biased one would be ~ +0.07)
    draws = [mmd2_unbiased(rng.normal(size=(20, 16)), rng.normal(size=(20, 16))) for _ in range(300)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))


# ----------------------------------------------------------------------------- weights files the tests make

@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torchvision's Inception-v3 architecture with 1008 classes (the FID network's layout), random He-init
    weights (so activations stay finite through 90 layers), saved as a plain state dict."""
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "fid_inception_random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two folders of 24 synthetic images (different seeds, same distribution) and color-inverted copies."""
    from PIL import ImageOps

    from data_pipeline.synthetic import iter_synthetic

    root = tmp_path_factory.mktemp("images")
    for name, seed in (("a", 0), ("b", 1)):
        (root / name).mkdir()
        (root / f"{name}_inv").mkdir()
        for i, (img, _, _) in enumerate(iter_synthetic(24, size=32, seed=seed)):
            img.save(root / name / f"{i:05d}.png")
            ImageOps.invert(img).save(root / f"{name}_inv" / f"{i:05d}.png")
    return root


def test_fid_kid_of_a_set_against_itself_is_zero(inception_file, image_sets):
    from launch.evaluate.scores import fid_kid

    model, info = load_inception(inception_file, size=96)
    assert info["variant"] == "fid"
    same = fid_kid(image_sets / "a", [str(image_sets / "a")], model=model, kid_subsets=10)
    assert same["fid"] < 1e-6 and same["n_samples"] == same["n_ref"] == 24
    ab = fid_kid(image_sets / "a", [str(image_sets / "b")], model=model, kid_subsets=10)
    ba = fid_kid(image_sets / "b", [str(image_sets / "a")], model=model, kid_subsets=10)
    assert ab["fid"] > 100 * same["fid"] and ab["fid"] == pytest.approx(ba["fid"], rel=1e-6)
    assert math.isfinite(ab["kid"]) and ab["kid_subset_size"] == 24


def test_inception_variants_load_through_torchvision_layout(inception_file, tmp_path):
    """A 1000-class file is torchvision's network unchanged (features = its avgpool output); a 1008-class
    file gets the FID network's pooling (features differ from torchvision's forward on the same weights)."""
    from torchvision.models.inception import Inception3

    sd = torch.load(inception_file, weights_only=True)
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    tv.load_state_dict(sd)
    grabbed = {}
    tv.avgpool.register_forward_hook(lambda m, i, o: grabbed.__setitem__("f", o.flatten(1)))
    x = torch.rand(2, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tv(2 * x - 1)
    fid_net, _ = load_inception(inception_file, size=80)
    assert not torch.allclose(fid_net(x), grabbed["f"], atol=1e-4)
    sd1000 = {k: v for k, v in sd.items()}
    sd1000["fc.weight"], sd1000["fc.bias"] = sd["fc.weight"][:1000].clone(), sd["fc.bias"][:1000].clone()
    torch.save(sd1000, tmp_path / "tv_inception.pth")
    tv_net, info = load_inception(tmp_path / "tv_inception.pth", size=80)
    assert info["variant"] == "torchvision"
    assert torch.equal(tv_net(x), grabbed["f"])


def test_fid_cli_reads_reference_shards_and_a_weights_file(inception_file, image_sets, synth_data):
    rc, out, err = cli("eval", "fid", image_sets / "a", f"{synth_data}/00000.tar", "--inception", inception_file,
                       "--inception-size", "80", "--kid-subsets", "5", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["n_samples"] == 24 and r["n_ref"] == 64 and r["fid"] > 0 and math.isfinite(r["kid"])
    assert r["inception"]["path"] == str(inception_file)


def test_missing_eval_weights_name_the_expected_files(tmp_path, monkeypatch, image_sets):
    monkeypatch.setenv("LDM_EVAL_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("LDM_CLIP_WEIGHTS", raising=False)
    with pytest.raises(EvalWeightsError) as e:
        load_inception()
    assert str(tmp_path / FID_WEIGHTS) in str(e.value) and TORCHVISION_WEIGHTS in str(e.value)
    from launch.evaluate.scores import resolve_clip_weights

    with pytest.raises(EvalWeightsError, match="open_clip_ViT-B-32.safetensors"):
        resolve_clip_weights("ViT-B-32")
    rc, _, err = cli("eval", "fid", image_sets / "a", str(image_sets / "b"), "--inception", tmp_path / "none.pth")
    assert rc == 2 and "none.pth" in err


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    cfg = root / f"{TINY_CLIP}.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    weights = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg, weights, model.eval()


def test_clip_score_uses_the_weights_file_and_matches_a_direct_computation(tiny_clip, image_sets, tmp_path):
    import open_clip

    from launch.evaluate.scores import clip_score

    cfg, weights, model = tiny_clip
    samples = tmp_path / "s"
    samples.mkdir()
    prompts = {}
    for i, p in enumerate(sorted((image_sets / "a").glob("*.png"))[:6]):
        Image.open(p).save(samples / p.name)
        prompts[p.name] = f"a picture number {i}"
    (samples / "prompts.json").write_text(json.dumps(prompts))
    r = clip_score(samples, arch=TINY_CLIP, weights=str(weights), model_config=str(cfg), batch_size=4)
    # direct: the same model object, open_clip's own preprocessing
    _, _, pre = open_clip.create_model_and_transforms(TINY_CLIP)
    tok = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        img = torch.stack([pre(Image.open(samples / n).convert("RGB")) for n in sorted(prompts)])
        fi = torch.nn.functional.normalize(model.encode_image(img), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tok([prompts[n] for n in sorted(prompts)])), dim=-1)
        want = (100 * (fi * ft).sum(-1)).clamp_min(0).double().mean().item()
    assert r["n"] == 6 and r["clip_score"] == pytest.approx(want, abs=1e-4)
    rc, out, err = cli("eval", "clip-score", samples, "--clip-arch", TINY_CLIP, "--clip-weights", weights,
                       "--clip-model-config", cfg, "--json")
    assert rc == 0, err
    assert json.loads(out)["clip_score"] == pytest.approx(want, abs=1e-4)


def test_recon_metrics_on_an_autoencoder_export(ae_export, synth_data, tmp_path):
    from launch.evaluate.scores import recon_metrics, reconstruct
    from launch.runtime.exportdir import load_autoencoder

    rc, out, err = cli("eval", "recon", ae_export, f"{synth_data}/00000.tar", "--max-samples", "20", "--lpips", "off",
                       "--json", "--out", tmp_path / "r.json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["samples"] == 20 and r["lpips"] is None and json.loads((tmp_path / "r.json").read_text()) == r
    # the same numbers computed by hand on the same images
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_eval_loader

    ae, _ = load_autoencoder(ae_export)
    x = next(iter(build_eval_loader(DataConfig(urls=[f"{synth_data}/00000.tar"], image_size=32, num_workers=0),
                                    [f"{synth_data}/00000.tar"], rank=0, world_size=1, batch_size=20)))["image"]
    y = reconstruct(ae, x)
    assert r["psnr"] == pytest.approx(float(psnr(y, x).mean()), abs=1e-4)
    assert r["ssim"] == pytest.approx(float(ssim(y, x).mean()), abs=1e-5)
    # LPIPS with an explicit VGG file that is not there: an error naming it
    with pytest.raises(FileNotFoundError, match="missing_vgg"):
        recon_metrics(ae_export, [f"{synth_data}/00000.tar"], max_samples=4, vgg=str(tmp_path / "missing_vgg.pth"))


def test_fid_reduction_to_the_feature_span_leaves_the_value_unchanged():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.3
    full = frechet_distance(*feature_stats(a), *feature_stats(b))       # 40x40 covariances, rank <= 11
    assert fid_from_features(a, b) == pytest.approx(full, rel=1e-6)   # (the full form carries sqrt(1e-16) noise)


def test_recon_lpips_with_a_vgg16_file(ae_export, synth_data, tmp_path):
    """LPIPS through the training code's loader: a VGG16 `features.*` file with random He-init weights,
    named vgg16-<sha256 prefix>.pth as torchvision names its files (the loader checks that hash)."""
    import hashlib
    import os

    import torchvision

    from autoencoder.perceptual import LPIPS
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_eval_loader
    from launch.evaluate.scores import recon_metrics, reconstruct
    from launch.runtime.exportdir import load_autoencoder

    with torch.device("meta"):
        layout = torchvision.models.vgg16().features.state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {f"features.{k}": (torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5 if k.endswith("weight")
                            else torch.zeros(v.shape)) for k, v in layout.items()}
    tmp = tmp_path / "vgg.tmp"
    torch.save(sd, tmp)
    vgg = tmp_path / f"vgg16-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    os.replace(tmp, vgg)
    url = f"{synth_data}/00000.tar"
    r = recon_metrics(ae_export, [url], max_samples=8, vgg=str(vgg))
    assert r["lpips_backbone"] == "vgg16" and r["lpips"] > 0
    ae, _ = load_autoencoder(ae_export)
    x = next(iter(build_eval_loader(DataConfig(urls=[url], image_size=32, num_workers=0), [url], rank=0,
                                    world_size=1, batch_size=8)))["image"]
    with torch.no_grad():
        want = float(LPIPS("vgg16", vgg_path=str(vgg))(reconstruct(ae, x), x).mean())
    assert r["lpips"] == pytest.approx(want, rel=1e-5)
