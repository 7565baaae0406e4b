"""`ldm export --format diffusers`: diffusers loads unet/, vae/ (and transformer/ for the PixArt-form DiT)
with from_pretrained, no conversion, and computes what our modules compute (within 1e-4)."""
from __future__ import annotations

import json

import pytest
import torch

from export_helpers import cli
from launch.runtime.exportdir import ExportError, load_autoencoder, load_pipeline

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4


def _max(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def test_unet_and_vae_load_in_diffusers_and_match_ours(unet_run, tmp_path):
    out = tmp_path / "diff"
    rc, stdout, err = cli("export", unet_run, out, "--format", "diffusers")
    assert rc == 0, err
    files = json.loads(stdout.strip().splitlines()[-1])["files"]
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "model.safetensors", "config.json"):
        assert f in files
    unet = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").eval()
    stage, config = load_pipeline(out)
    ours = stage.denoiser
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5.0, 400.0, 999.0])
    cond = stage.condition({"caption": ["a red circle on a blue background", "", "a white square on a black background"]})
    with torch.no_grad():
        a = ours(x, t, cond["context"], cond["context_mask"])
        b = unet(x, t, encoder_hidden_states=cond["context"], encoder_attention_mask=cond["context_mask"]).sample
        assert a.abs().max() > 1e-3          # not a trivially zero output
        assert _max(a, b) < TOL
        # the VAE: decode (the sampler's latents, un-scaled by the factors diffusers stores) and encode
        ae = stage.autoencoder
        vc = vae.config
        assert vc.scaling_factor == pytest.approx(config["scaling_factor"])
        assert vc.shift_factor == config["shift_factor"]
        z = torch.randn(2, 4, 8, 8, generator=g)
        raw = z / vc.scaling_factor + (vc.shift_factor or 0.0)
        assert _max(ae.decode(raw), vae.decode(raw).sample) < TOL
        img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        post = ae.encode(img)
        theirs = vae.encode(img).latent_dist
        assert _max(post.mean, theirs.mean) < TOL and _max(post.logvar, theirs.logvar) < TOL


def test_autoencoder_run_writes_vae_only_with_its_latent_statistics(ae_run, ae_export, tmp_path):
    from launch.interop.export import export_run

    out = export_run(ae_run, tmp_path / "vae", fmt="diffusers")
    assert (out / "vae" / "config.json").is_file() and not (out / "unet").exists()
    vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").eval()
    config = json.loads((ae_export / "config.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(config["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(config["shift_factor"])
    ours, _ = load_autoencoder(out)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max(ours.decode(z), vae.decode(z).sample) < TOL


def test_pixart_form_dit_loads_as_pixart_transformer(tmp_path):
    from launch.interop.export_diffusers import write_denoiser
    from ldm.config import DenoiserConfig, DiTConfig
    from launch.runtime.configio import to_plain
    from ldm.dit import DiT

    cfg = DenoiserConfig(kind="dit", dit=DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                                                   context_dim=32))
    torch.manual_seed(0)
    ours = DiT(cfg.dit).eval()
    with torch.no_grad():   # the zero-initialised output layer and cross-attention would hide mismatches
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sub, class_name = write_denoiser(tmp_path, to_plain(cfg), ours.state_dict())
    assert (sub, class_name) == ("transformer", "PixArtTransformer2DModel")
    theirs = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4], dtype=torch.bool)
    t = torch.tensor([20.0, 800.0])
    with torch.no_grad():
        a = ours(x, t, ctx, mask)
        b = theirs(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask.long()).sample
    assert _max(a, b) < TOL


def test_models_diffusers_cannot_express_are_refused_before_writing(unet_run, tmp_path):
    import shutil

    from launch.runtime.config import load_config
    from launch.runtime.configio import to_plain
    from launch.interop.export import export_run
    from launch.interop.export_diffusers import diffusers_problems

    dit = load_config("configs/ldm/dit-small.yaml").denoiser       # qk_norm: rms
    problems = diffusers_problems("diffusion", to_plain(dit), {"ch": 32})
    assert any("PixArt" in p and "QK-norm" in p for p in problems)
    unet = load_config("configs/ldm/unet-small.yaml", ["denoiser.unet.qk_norm=rms"]).denoiser
    assert any("qk_norm" in p for p in diffusers_problems("diffusion", to_plain(unet), None))
    # an autoencoder with attention inside its levels has no AutoencoderKL form: refused, nothing written
    meta = json.loads((unet_run / "checkpoints" / "step_00000003" / "meta.json").read_text())
    ae = tmp_path / "ae_attn"
    shutil.copytree(meta["config"]["latents"]["autoencoder"], ae)
    config = json.loads((ae / "config.json").read_text())
    config["autoencoder"]["attn_resolutions"] = [16]
    (ae / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="attn_resolutions"):
        export_run(unet_run, tmp_path / "x", fmt="diffusers", autoencoder=ae)
    assert not (tmp_path / "x").exists()


def test_mmdit_run_exports_a_transformer_sd3_loads_and_matches_ours(mmdit_run, tmp_path):
    """A tiny MMDiT trained by the real runtime: OUT/transformer/ is an SD3Transformer2DModel folder that
    from_pretrained loads; same latents, time, text and pooled text -> same output within 1e-4."""
    out = tmp_path / "mmdit"
    rc, stdout, err = cli("export", mmdit_run, out, "--format", "diffusers")
    assert rc == 0, err
    files = json.loads(stdout.strip().splitlines()[-1])["files"]
    assert "transformer/config.json" in files and "transformer/diffusion_pytorch_model.safetensors" in files
    theirs = diffusers.SD3Transformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    stage, _ = load_pipeline(out)
    ours = stage.denoiser.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([120.0, 900.0])
    cond = stage.condition({"caption": ["a red circle on a blue background", "a white square on a black background"]})
    ctx, pooled = cond["context"], cond["pooled"]
    with torch.no_grad():
        a0 = ours(x, t, ctx, pooled=pooled)
        c = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        assert _max(a0, c) < TOL
        # 2 steps leave the zero-initialised output layer near zero: perturb ours, write it again, compare
        torch.manual_seed(1)
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from launch.interop.export_diffusers import write_denoiser

    write_denoiser(tmp_path / "perturbed", json.loads((out / "config.json").read_text())["denoiser"],
                   ours.state_dict())
    perturbed = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "perturbed", subfolder="transformer")
    with torch.no_grad():
        a = ours(x, t, ctx, pooled=pooled)
        b = perturbed.eval()(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    assert a.abs().max() > 1e-2
    print(f"\nMMDiT export vs SD3Transformer2DModel: trained {_max(a0, c):.2e}, perturbed {_max(a, b):.2e}")
    assert _max(a, b) < TOL


def test_several_text_encoders_are_refused_before_writing_not_exported_as_one():
    """Until each encoder is written, an export of a CLIP + CLIP + T5 run must not silently hold one tower."""
    from launch.interop.export import text_encoder_problems
    from launch.runtime.config import load_config

    problems = text_encoder_problems(load_config("configs/ldm/mmdit-sd3-medium.yaml"))
    assert len(problems) == 1 and "3 entries (open_clip, open_clip, t5)" in problems[0]
    assert text_encoder_problems(load_config("configs/ldm/unet-small.yaml")) == []
