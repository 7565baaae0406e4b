"""Condition dropout (train time) and classifier-free guidance (sampling time)."""
from __future__ import annotations

import pytest
import torch

from ldm.conditioning import (apply_condition_dropout, concat_conds, replace_with_empty, sample_drop_mask,
                              unconditional_like)
from ldm.guidance import cfg_batch, cfg_combine, guided, interval_scale


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_rate_over_10000_draws(p):
    """Measured rate within 1 percentage point of p (binomial std at p = 0.1 is 0.3 points)."""
    drop = sample_drop_mask(10000, p, generator=torch.Generator().manual_seed(0))
    assert abs(drop.float().mean().item() - p) < 0.01
    # and through the training entry point, on a text condition
    cond = {"context": torch.randn(10000, 3, 2), "context_mask": torch.ones(10000, 3, dtype=torch.bool)}
    empty = {"context": torch.zeros(1, 3, 2), "context_mask": torch.tensor([[True, False, False]])}
    out, drop = apply_condition_dropout(cond, p, "empty", empty, generator=torch.Generator().manual_seed(1))
    assert abs(drop.float().mean().item() - p) < 0.01
    assert torch.equal(out["context"][drop], torch.zeros(int(drop.sum()), 3, 2))
    assert torch.equal(out["context"][~drop], cond["context"][~drop])
    assert torch.equal(out["context_mask"][drop].sum(1), torch.ones(int(drop.sum()), dtype=torch.long))


def test_dropout_is_fresh_each_step():
    cond = {"context": torch.randn(256, 2, 2)}
    _, d1 = apply_condition_dropout(cond, 0.5, "learned")
    _, d2 = apply_condition_dropout(cond, 0.5, "learned")
    assert not torch.equal(d1, d2)           # per step, never fixed per sample


def test_learned_mode_sets_drop_flag_and_empty_fits_length():
    cond = {"context": torch.randn(4, 5, 3), "context_mask": torch.ones(4, 5, dtype=torch.bool)}
    out, drop = apply_condition_dropout(cond, 1.0, "learned")
    assert drop.all() and torch.equal(out["drop"], drop) and torch.equal(out["context"], cond["context"])
    empty = {"context": torch.ones(1, 77, 3), "context_mask": torch.ones(1, 77, dtype=torch.bool)}
    swapped = replace_with_empty(cond, torch.tensor([True, False, True, False]), empty)  # 77 -> 5 tokens
    assert torch.equal(swapped["context"][0], torch.ones(5, 3))
    uncond = unconditional_like(cond, "learned")
    assert uncond["drop"].all()


def test_cfg_batch_layout_and_combine():
    x = torch.randn(3, 4)
    t = torch.tensor([1.0, 2.0, 3.0])
    cond = {"context": torch.randn(3, 2, 5)}
    uncond = {"context": torch.zeros(3, 2, 5), "drop": torch.ones(3, dtype=torch.bool)}
    x2, t2, c2 = cfg_batch(x, t, cond, uncond)
    assert torch.equal(x2, torch.cat([x, x])) and torch.equal(t2, torch.cat([t, t]))
    assert torch.equal(c2["context"][:3], uncond["context"]) and torch.equal(c2["context"][3:], cond["context"])
    assert c2["drop"].tolist() == [True] * 3 + [False] * 3          # missing key filled with "not dropped"
    u, c = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(cfg_combine(torch.cat([u, c]), 4.0), u + 4.0 * (c - u))
    assert torch.allclose(cfg_combine(torch.cat([u, c]), 1.0), c)
    assert torch.allclose(cfg_combine(torch.cat([u, c]), torch.tensor([0.0, 1.0, 2.0])),
                          torch.stack([u[0], c[1], u[2] + 2 * (c[2] - u[2])]))
    with pytest.raises(KeyError):
        concat_conds({"context": x}, {"pooled": x})


def test_guidance_rescale_matches_lin_et_al():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    w, phi = 7.5, 0.7
    plain = u + w * (c - u)
    std_c = c.std(dim=(1, 2, 3), keepdim=True)
    std_g = plain.std(dim=(1, 2, 3), keepdim=True)
    expected = phi * plain * std_c / std_g + (1 - phi) * plain
    out = cfg_combine(torch.cat([u, c]), w, rescale=phi)
    assert torch.allclose(out, expected, atol=1e-5)
    full = cfg_combine(torch.cat([u, c]), w, rescale=1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)), atol=1e-5)


def test_guidance_interval():
    unit = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95])
    assert interval_scale(unit, 5.0, (0.1, 0.9)).tolist() == [1.0, 5.0, 5.0, 5.0, 1.0]
    assert interval_scale(unit, 5.0, None).tolist() == [5.0] * 5

    def model(x, t, cond):
        return x + cond["context"].sum(dim=(1, 2))[:, None]

    x = torch.zeros(2, 3)
    cond = {"context": torch.ones(2, 1, 1)}
    uncond = {"context": torch.zeros(2, 1, 1)}
    fn = guided(model, uncond, 3.0, unit_time=lambda t: t, interval=(0.2, 0.8))
    assert torch.allclose(fn(x, torch.full((2,), 0.5), cond), torch.full((2, 3), 3.0))   # guided
    assert torch.allclose(fn(x, torch.full((2,), 0.95), cond), torch.full((2, 3), 1.0))  # plain conditional
    with pytest.raises(ValueError, match="unit_time"):
        guided(model, uncond, 3.0, interval=(0.2, 0.8))


def test_cfg_layout_exports_to_onnx(tmp_path):
    """The guided step is plain tensor code: it traces to ONNX as one graph."""
    onnx = pytest.importorskip("onnx")

    class Guided(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, t, context, null_context):
            def model(x2, t2, cond2):
                return self.lin(x2) + cond2["context"].mean(dim=1) + t2[:, None]
            fn = guided(model, {"context": null_context}, 4.0, unit_time=lambda tt: tt / 1000,
                        interval=(0.1, 0.9), rescale=0.5)
            return fn(x, t, {"context": context})

    args = (torch.randn(2, 4), torch.tensor([500.0, 50.0]), torch.randn(2, 3, 4), torch.zeros(2, 3, 4))
    path = tmp_path / "cfg.onnx"
    module = Guided().eval()
    torch.onnx.export(module, args, str(path), dynamo=True, input_names=["x", "t", "context", "null"])
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, dict(zip(names, (a.numpy() for a in args))))
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), module(*args), atol=1e-5)
