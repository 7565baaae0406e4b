"""VQ: where beta goes, straight-through, EMA, dead-code restart, usage buffers; FSQ."""
from __future__ import annotations

import pytest
import torch

from autoencoder.quantize import FSQ, VectorQuantizer, set_collectives


def test_commitment_beta_multiplies_the_encoder_term():
    torch.manual_seed(0)
    beta = 0.3
    vq = VectorQuantizer(16, 4, beta=beta)
    with torch.no_grad():
        vq.embed.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, info = vq(z)
    info["loss"].backward()
    e = vq.embed.detach()[info["indices"]].permute(0, 3, 1, 2)   # chosen code per position
    n = z.numel()
    # encoder side: d/dz beta * mean((z - sg[e])^2) = 2 beta (z - e) / n
    assert torch.allclose(z.grad, 2 * beta * (z.detach() - e) / n, atol=1e-7)
    # codebook side: d/de mean((sg[z] - e)^2) = 2 (e - z) / n summed over assignments, no beta
    want = torch.zeros_like(vq.embed)
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    want.index_add_(0, info["indices"].flatten(), 2 * (vq.embed.detach()[info["indices"].flatten()] - flat_z) / n)
    assert torch.allclose(vq.embed.grad, want, atol=1e-7)
    assert float(info["commitment_loss"]) > 0


def test_straight_through_and_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2)
    with torch.no_grad():
        vq.embed.copy_(torch.randn(8, 2))
    z = torch.randn(1, 2, 4, 4, requires_grad=True)
    zq, info = vq(z)
    d = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 2), vq.embed.detach())
    assert torch.equal(info["indices"].flatten(), d.argmin(1))
    assert torch.allclose(zq, vq.lookup(info["indices"]), atol=1e-6)
    zq.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))


def _collapsed(ema: bool, restart: bool) -> VectorQuantizer:
    """64 codes, all but one parked far from the data: one code takes every assignment."""
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 4, ema=ema, restart=restart, restart_every=10, dead_threshold=0.1, usage_decay=0.9)
    with torch.no_grad():
        vq.embed.copy_(10.0 + 0.01 * torch.randn(64, 4))
        vq.embed[0] = 0.0
        if ema:
            vq.embed_avg.copy_(vq.embed)
    return vq.train()


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_raises_usage_and_perplexity(ema):
    results = {}
    for restart in (False, True):
        vq = _collapsed(ema, restart)
        g = torch.Generator().manual_seed(1)
        for _ in range(40):
            _, info = vq(torch.randn(8, 4, 8, 8, generator=g))   # 512 encoder outputs ~ N(0, I)
        results[restart] = (float(info["usage"]), float(info["perplexity"]), int(vq.restarts))
    (u0, p0, r0), (u1, p1, r1) = results[False], results[True]
    assert r0 == 0 and u0 <= 2 / 64 and p0 < 1.5          # dead codes stay dead
    assert r1 >= 63 and u1 > 0.8 and p1 > 30               # restarted codes take assignments
    assert p1 > 20 * p0


def test_usage_histogram_checkpoints():
    vq = _collapsed(ema=True, restart=True)
    vq(torch.randn(4, 4, 8, 8))
    sd = vq.state_dict()
    for key in ("usage", "updates", "restarts", "embed", "embed_avg", "cluster_size"):
        assert key in sd
    assert "recent" not in sd   # the restart pool is rank-local scratch
    fresh = VectorQuantizer(64, 4, ema=True, restart=True)
    fresh.load_state_dict(sd)
    a, b = vq.usage_stats(), fresh.usage_stats()
    assert torch.equal(a["usage"], b["usage"]) and torch.equal(a["perplexity"], b["perplexity"])
    assert int(fresh.updates) == 1


def test_ema_codebook_tracks_its_cluster_and_has_no_codebook_loss():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, ema=True, ema_decay=0.5).train()
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        vq.embed_avg.copy_(vq.embed)
    z = torch.tensor([[-3.0, 1.0], [3.0, 1.0]]).view(2, 2, 1, 1).repeat(4, 1, 2, 2)  # two clusters
    for _ in range(30):
        _, info = vq(z)
    assert torch.allclose(vq.embed, torch.tensor([[-3.0, 1.0], [3.0, 1.0]]), atol=1e-3)
    assert float(info["codebook_loss"]) == 0.0 and not isinstance(vq.embed, torch.nn.Parameter)


def test_collectives_are_called():
    calls = {"reduce": 0, "broadcast": 0}

    def all_reduce(t):
        calls["reduce"] += 1

    def broadcast(t, src):
        calls["broadcast"] += 1
        assert src == 0

    vq = _collapsed(ema=True, restart=True)
    assert set_collectives(vq, all_reduce, broadcast) == 1
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        vq(torch.randn(2, 4, 4, 4, generator=g))
    assert calls["reduce"] == 10 and calls["broadcast"] == 3   # embed, embed_avg, cluster_size at the restart
    vq.eval()
    vq(torch.randn(2, 4, 4, 4))
    assert calls["reduce"] == 10   # no state changes in eval


def test_fsq_grid_indices_and_gradient():
    fsq = FSQ((8, 5, 5, 5)).train()
    assert fsq.num_codes == 1000
    z = (3 * torch.randn(4, 4, 8, 8)).requires_grad_(True)
    out, info = fsq(z)
    levels = torch.tensor([8, 5, 5, 5]).view(1, 4, 1, 1)
    half = levels // 2
    grid = out.detach() * half
    assert torch.allclose(grid, grid.round(), atol=1e-5)                  # on the integer grid
    assert bool(((grid >= -half) & (grid <= levels - 1 - half)).all())    # L values per channel
    idx = info["indices"]
    assert idx.shape == (4, 8, 8) and int(idx.min()) >= 0 and int(idx.max()) < 1000
    # distinct grid points <-> distinct indices
    pts = grid.permute(0, 2, 3, 1).reshape(-1, 4)
    assert len(torch.unique(pts, dim=0)) == len(torch.unique(idx))
    out.sum().backward()
    assert float(z.grad.abs().sum()) > 0 and float(info["loss"]) == 0.0
    assert 0 < float(info["usage"]) <= 1 and float(info["perplexity"]) > 1
