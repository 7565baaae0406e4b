"""Online stage two on a VQ autoencoder (issue 18 item 4): encode() returns (quantized z, info), not a
posterior; the stage takes the quantized latents, the same ones `ldm data precompute` stores."""
from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _vq_autoencoder():
    from autoencoder.model import build_autoencoder
    from launch.runtime.config import load_config

    cfg = load_config(REPO / "configs/autoencoder/vq-f4-small.yaml", ["autoencoder.resolution=32"])
    torch.manual_seed(0)
    return build_autoencoder(cfg.autoencoder).eval()


def test_online_training_step_on_a_vq_autoencoder():
    from launch.runtime.precompute import image_encoder
    from ldm.config import ConditioningConfig, DenoiserConfig, LatentConfig, UNetConfig
    from ldm.objectives import DiscreteDiffusion
    from ldm.training import DiffusionStage, build_denoiser, latent_shape

    ae = _vq_autoencoder()
    dcfg = DenoiserConfig(kind="unet", unet=UNetConfig(sample_size=8, model_channels=32, channel_mult=(1, 2),
                                                       num_res_blocks=1, attention_levels=(1,), num_heads=4,
                                                       context_dim=64, norm_groups=8))
    torch.manual_seed(0)
    stage = DiffusionStage(build_denoiser(dcfg), DiscreteDiffusion("eps"), autoencoder=ae,
                           conditioning=ConditioningConfig(dropout_prob=0.0),
                           latents=LatentConfig(scaling_factor=0.5, shift_factor=0.1), latent_shape=latent_shape(dcfg))
    stage.setup(torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text = {"text_hidden": torch.randn(2, 77, 64), "text_mask": torch.ones(2, 77, dtype=torch.bool)}
    codebook = {k: v.clone() for k, v in ae.state_dict().items()}

    z = stage.encode_latents({"image": images})
    zq, _ = ae.encode(images)
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(z, (zq.float() - 0.1) * 0.5)
    pre = image_encoder(ae, torch.device("cpu"))(images)                 # what precompute writes
    assert torch.equal(stage.encode_latents(pre), z)

    opt = torch.optim.SGD(stage.denoiser.parameters(), lr=1e-3)
    losses, _ = stage.training_step(stage.trainable_modules(), {"image": images, **text}, 0)
    loss = losses["denoiser"]
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    opt.step()
    assert all(torch.equal(v, codebook[k]) for k, v in ae.state_dict().items())   # frozen: no codebook update
    print(f"VQ online step-0 loss {float(loss.detach()):.4f}")
