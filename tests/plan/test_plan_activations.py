"""Activation memory per sample: launch/plan/'s prediction against the peak measured on CPU.

Measurement (launch/plan/measure.py): every op's output storage is tracked by a TorchDispatchMode with
weak references, so the live bytes of tensors are known at each op of one forward + backward (the CPU
allocator's view of the tensors, no torch.cuda); parameter gradients and autocast's copies of the weights
are excluded (model state); the per-sample value is the slope of the peak between two batch sizes.
bf16 runs under CPU autocast, whose norms keep the input dtype, so the prediction uses policy="cpu" there;
`ldm plan` uses CUDA's policy (norms in fp32), the one difference the CPU cannot show."""
from __future__ import annotations

import pytest
import torch

from launch.plan import denoisers as A
from launch.plan import frozen as FZ
from launch.plan import measure as M
from plankit import load, rel


def _predict(cfg, precision, ckpt):
    d = cfg.denoiser
    if d.kind == "unet":
        side = d.unet.sample_size
        return A.unet_forward(d.unet, (side, side), 77, precision, ckpt, d.pooled_dim, policy="cpu")
    side = d.dit.input_size
    return A.dit_forward(d.dit, (side, side), 77, precision, ckpt, d.pooled_dim, learned_null=False, policy="cpu")


@pytest.fixture
def fused_attention(monkeypatch):
    """Attention through torch's fused SDPA, as on a GPU. (ldm.attention runs bf16 attention on CPU as
    plain matmuls + softmax for speed, which keeps the L x L probabilities; GPUs run SDPA's fused kernels,
    which is what `ldm plan` models. On CPU, SDPA runs its flash kernel, which saves what they save.)"""
    import ldm.attention

    monkeypatch.setattr(ldm.attention, "_LOW_PRECISION", (), raising=False)


@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["ldm/unet-small", "ldm/dit-small"])
def test_plan_activation_peak_per_sample_matches_cpu(name, precision, ckpt, fused_attention):
    from ldm.training import build_denoiser

    cfg = load(name)
    d = cfg.denoiser
    side = d.unet.sample_size if d.kind == "unet" else d.dit.input_size
    torch.manual_seed(0)
    net = build_denoiser(d)
    net.set_activation_checkpointing(ckpt)
    def full_captions(b):
        # the plan counts every caption at full length (the worst case; padding rows are packed away)
        inputs = M.denoiser_inputs(d, b, (side, side))
        inputs["context_mask"][:] = True
        return inputs

    measured = M.activation_bytes_per_sample(net, full_captions, batches=(4, 12),
                                             autocast=torch.bfloat16 if precision == "bf16" else None)
    fc = _predict(cfg, precision, ckpt)
    print(f"{name} {precision} ckpt={ckpt}: predicted peak {fc.peak_bytes} measured {measured['peak']:.0f} "
          f"({rel(fc.peak_bytes, measured['peak']):.1%}); kept {fc.saved_bytes} vs {measured['forward_end']:.0f}")
    assert rel(fc.peak_bytes, measured["peak"]) <= 0.25
    # what the forward pass keeps for backward is counted tensor by tensor: much tighter
    assert rel(fc.saved_bytes, measured["forward_end"]) <= 0.05
    if ckpt:
        assert fc.peak_bytes < _predict(cfg, precision, False).peak_bytes


def test_plan_autocast_weight_copies_are_two_bytes_per_parameter(fused_attention):
    """bf16 autocast keeps a bf16 copy of the weights for backward: launch/plan/zero.py counts 2 P for them."""
    from ldm.training import build_denoiser

    cfg = load("ldm/dit-small")
    d = cfg.denoiser
    torch.manual_seed(0)
    net = build_denoiser(d).train()
    params = sum(p.numel() for p in net.parameters())
    tracker = M.AllocationTracker(ignore={p.untyped_storage().data_ptr() for p in net.parameters()})
    with tracker:
        inputs = M.denoiser_inputs(d, 2, (d.dit.input_size,) * 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(**inputs).float().square().mean()
        tracker.mark("forward_end")
    copies = sum(n for serial, n in tracker.events[: tracker.marks["forward_end"]]
                 if n > 0 and serial in tracker.param_casts)
    del loss
    assert rel(2 * params, copies) <= 0.10, (2 * params, copies)


def test_plan_encoder_working_set_matches_cpu():
    """The frozen encoder's no-grad pass (online latents): ENCODER_WORKING_SET largest feature maps per sample."""
    from autoencoder.model import build_autoencoder
    from launch.plan.hardware import ENCODER_WORKING_SET

    a = load("autoencoder/kl-f8").autoencoder
    res = 64
    ae = build_autoencoder(a).eval()
    peaks = {}
    for batch in (2, 6):
        tracker = M.AllocationTracker(ignore={p.untyped_storage().data_ptr() for p in ae.parameters()})
        with tracker, torch.no_grad():
            x = torch.randn(batch, 3, res, res)
            z = ae.encode(x).mean
            del x, z
        peaks[batch] = tracker.curve()[0]
    measured = (peaks[6] - peaks[2]) / 4
    predicted = ENCODER_WORKING_SET * FZ.autoencoder_forward(a, (res, res), decoder=False).largest_tensor_bytes
    assert rel(predicted, measured) <= 0.25, (predicted, measured)
