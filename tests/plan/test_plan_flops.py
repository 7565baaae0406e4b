"""FLOPs per sample: launch/plan/'s analytic count against torch.utils.flop_counter (meta device,
or small real inputs where an op has no meta kernel), for the UNet, the DiT and the autoencoder."""
from __future__ import annotations

import pytest
import torch

from launch.plan.tape import Tape
from launch.plan import denoisers as A
from launch.plan import frozen as FZ
from launch.plan import measure as M
from plankit import load

TOL = 0.02


def _denoiser(name, *overrides):
    cfg = load(name, *overrides)
    d = cfg.denoiser
    side = d.unet.sample_size if d.kind == "unet" else d.dit.input_size
    from ldm.training import build_denoiser

    with torch.device("meta"):
        net = build_denoiser(d)
    batch = 2
    measured = M.count_flops(net, **M.denoiser_inputs(d, batch, (side, side), device="meta")) / batch
    if d.kind == "unet":
        analytic = A.unet_forward(d.unet, (side, side), 77, pooled_dim=d.pooled_dim).flops
    else:
        learned = cfg.conditioning.null_embedding == "learned" and d.learned_null_tokens > 0
        analytic = A.dit_forward(d.dit, (side, side), 77, pooled_dim=d.pooled_dim, learned_null=learned).flops
    return analytic, measured


@pytest.mark.parametrize("name,overrides", [
    ("ldm/unet-small", ()),
    ("ldm/unet-small", ("denoiser.pooled_dim=64", "denoiser.unet.qk_norm=layer")),
    ("ldm/unet-sd15", ("denoiser.unet.sample_size=32",)),     # 256 px
    ("ldm/unet-sd15", ()),                                     # 512 px
    ("ldm/unet-sd15", ("denoiser.unet.head_dim=64", "denoiser.unet.linear_projection=true",
                       "denoiser.unet.context_dim=1024", "denoiser.unet.sample_size=32")),   # SD2-base topology
])
def test_plan_unet_flops_match_flop_counter(name, overrides):
    analytic, measured = _denoiser(name, *overrides)
    assert abs(analytic - measured) <= TOL * measured, (analytic, measured)


@pytest.mark.parametrize("name,overrides", [
    ("ldm/dit-small", ()),
    ("ldm/dit-b-2", ()),
    ("ldm/dit-xl-2", ()),                                      # 256 px
    ("ldm/dit-xl-2", ("denoiser.dit.input_size=64",)),         # 512 px
    ("ldm/dit-xl-2", ("denoiser.dit.adaln=zero", "denoiser.dit.qk_norm=rms", "denoiser.pooled_dim=1024")),
])
def test_plan_dit_flops_match_flop_counter(name, overrides):
    analytic, measured = _denoiser(name, *overrides)
    assert abs(analytic - measured) <= TOL * measured, (analytic, measured)


@pytest.mark.parametrize("name,res,meta", [("autoencoder/kl-f8", 256, True), ("autoencoder/kl-f4-small", 64, True),
                                           ("autoencoder/vq-f4-small", 32, False)])
def test_plan_autoencoder_flops_match_flop_counter(name, res, meta):
    """The whole Autoencoder.forward (encode, regularizer, decode) and the encoder alone (online latents).
    VQ's bincount has no meta kernel: that one runs for real on a small image."""
    from autoencoder.model import build_autoencoder

    a = load(name).autoencoder
    device = "meta" if meta else "cpu"
    with torch.device(device):
        ae = build_autoencoder(a).eval()
    x = torch.empty(1, a.in_channels, res, res, device=device) if meta else torch.randn(1, a.in_channels, res, res)
    full = M.count_flops(ae, x, sample=False, update=False)
    enc = M.count_flops(lambda im: ae.encode(im), x)
    analytic_full = FZ.autoencoder_forward(a, (res, res)).flops
    analytic_enc = FZ.autoencoder_forward(a, (res, res), decoder=False).flops
    assert abs(analytic_full - full) <= TOL * full, (analytic_full, full)
    assert abs(analytic_enc - enc) <= TOL * enc, (analytic_enc, enc)
    assert FZ.autoencoder_params(a) == sum(p.numel() for p in ae.parameters())


def test_plan_text_tower_params_match_open_clip():
    """The analytic parameter count of the frozen text tower equals the module the stage builds."""
    from ldm.text import build_text_encoder

    cfg = load("ldm/unet-small")
    tower = FZ.text_tower(cfg.text_encoder)
    enc = build_text_encoder(cfg.text_encoder)
    assert tower.params == sum(p.numel() for p in enc.parameters())
    assert tower.context_length == enc.context_length


def test_plan_closed_forms_match_the_walk():
    """The per-block closed forms in launch/plan/denoisers.py's formulas are what the walk adds up (fp32)."""
    C, n, L, H, C_ctx = 320, 4096, 77, 8, 768
    t = Tape("fp32")
    ctx = t.new(L * C_ctx)
    t.save(ctx)
    base = t.saved_bytes
    A._unet_transformer_block(t, t.new(C * n), ctx, n, C, H, L, C_ctx, "none")
    assert (t.saved_bytes - base) // 4 == 28 * C * n + 2 * L * C + 2 * H * n + 6 * n
    assert t.flops == 8 * n * C * C + 4 * n * n * C + 4 * n * C * C + 4 * L * C_ctx * C + 4 * n * L * C + 24 * n * C * C

    t = Tape("fp32")
    c_in, c_out, E, h = 320, 640, 1280, 32
    emb = t.new(E)
    t.save(emb)
    base = t.saved_bytes
    A._unet_resblock(t, t.new(c_in * h * h), emb, h * h, (h, h), c_in, c_out, E, 32)
    groups_stats = 2 * 2 * 32
    assert (t.saved_bytes - base) // 4 == 3 * (c_in + c_out) * h * h + E + groups_stats
    assert t.flops == 18 * h * h * c_out * (c_in + c_out) + 2 * E * c_out + 2 * h * h * c_in * c_out

    for qk, extra in (("none", 0), ("rms", 1)):
        D, N, M, H = 1152, 256, 4608, 16
        t = Tape("fp32")
        ctx = t.new(L * D)
        t.save(ctx)
        base = t.saved_bytes
        A._dit_block(t, t.new(D * N), t.new(6 * D), ctx, N, D, H, M, L, "single", qk, D)
        small = 4 * D + 6 * D          # the two (1 + scale) vectors, two gates' storage (the modulation, 6 D)
        want = ((15 + 2 * M // D + 3 * extra) * D * N + (2 + extra) * L * D + (2 + 3 * extra) * H * N
                + extra * H * L + 4 * N + small)
        assert abs((t.saved_bytes - base) // 4 - want) <= 2 * D, ((t.saved_bytes - base) // 4, want)
        assert t.flops == 8 * N * D * D + 4 * N * N * D + 4 * N * D * D + 4 * L * D * D + 4 * N * L * D + 4 * N * D * M
