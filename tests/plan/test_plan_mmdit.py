"""`ldm plan` on an MMDiT: the forward walk (launch/plan/denoisers.mmdit_forward) against one measured
forward + backward on CPU (launch/plan/measure.py, as tests/plan/test_plan_activations.py does for the
UNet and DiT), and its FLOPs against torch's flop counter."""
from __future__ import annotations

import pytest
import torch

from launch.plan import denoisers as A
from launch.plan import measure as M
from plankit import load, rel

SMALL = ("denoiser.kind=mmdit", "denoiser.pooled_dim=64", "denoiser.mmdit.input_size=16",
         "denoiser.mmdit.in_channels=4", "denoiser.mmdit.hidden_size=128", "denoiser.mmdit.depth=3",
         "denoiser.mmdit.num_heads=4", "denoiser.mmdit.context_dim=96", "denoiser.mmdit.qk_norm=rms")
CTX = 24


@pytest.fixture
def fused_attention(monkeypatch):
    import ldm.attention

    monkeypatch.setattr(ldm.attention, "_LOW_PRECISION", (), raising=False)


@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_mmdit_activations_match_a_measured_step(precision, ckpt, fused_attention):
    from ldm.training import build_denoiser

    d = load("ldm/unet-small", *SMALL).denoiser
    side = d.mmdit.input_size
    torch.manual_seed(0)
    net = build_denoiser(d)
    net.set_activation_checkpointing(ckpt)

    def full_captions(b):
        inputs = M.denoiser_inputs(d, b, (side, side), ctx_len=CTX)
        inputs["context_mask"][:] = True
        return inputs

    measured = M.activation_bytes_per_sample(net, full_captions, batches=(2, 6),
                                             autocast=torch.bfloat16 if precision == "bf16" else None)
    fc = A.mmdit_forward(d.mmdit, (side, side), CTX, precision, ckpt, d.pooled_dim, policy="cpu")
    print(f"\nMMDiT {precision} ckpt={ckpt}: predicted peak {fc.peak_bytes} measured {measured['peak']:.0f} "
          f"({rel(fc.peak_bytes, measured['peak']):.1%}); kept {fc.saved_bytes} vs {measured['forward_end']:.0f} "
          f"({rel(fc.saved_bytes, measured['forward_end']):.1%})")
    assert rel(fc.peak_bytes, measured["peak"]) <= 0.25
    assert rel(fc.saved_bytes, measured["forward_end"]) <= 0.05


@pytest.mark.parametrize("overrides", [SMALL, (*SMALL, "denoiser.mmdit.context_pre_only=false"),
                                       ("denoiser.kind=mmdit",)])      # the SD3-medium-sized default (meta)
def test_plan_mmdit_flops_match_flop_counter(overrides):
    from ldm.training import build_denoiser

    d = load("ldm/unet-small", *overrides).denoiser
    side = d.mmdit.input_size
    with torch.device("meta"):
        net = build_denoiser(d)
    batch = 2
    inputs = M.denoiser_inputs(d, batch, (side, side), ctx_len=CTX, device="meta", mask=False)
    measured = M.count_flops(net, **inputs) / batch          # full captions: the plan's worst case
    analytic = A.mmdit_forward(d.mmdit, (side, side), CTX, pooled_dim=d.pooled_dim).flops
    print(f"\nMMDiT flops analytic {analytic:.4g} measured {measured:.4g}")
    assert abs(analytic - measured) <= 0.02 * measured, (analytic, measured)
