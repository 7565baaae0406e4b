"""A small MMDiT conditioned on a CLIP + T5 pair trains under ZeRO-3 on two ranks through `ldm train`
(torchrun, gloo, real DeepSpeed engines), from shards that hold both encoders' outputs. ~40 s on 2 cores."""
from __future__ import annotations

import torch
import yaml

CLIP = {"kind": "open_clip", "arch": "ldm-tiny-text", "model_config": "configs/ldm/open_clip/ldm-tiny-text.json",
        "pretrained": None, "context_length": 16, "layer": "last", "dropout_prob": 0.1}


def _config(run, urls, t5, steps):
    return {
        "stage": "diffusion", "run_dir": str(run),
        "train": {"max_steps": steps, "seed": 0, "micro_batch_size": 16, "log_every": 3, "checkpoint_every": steps,
                  "keep_checkpoints": 1, "precision": "fp32", "grad_clip": 1.0},
        "optimizer": {"lr": 2.0e-3, "betas": [0.9, 0.99], "warmup_steps": 5},
        "deepspeed": {"zero_stage": 3},
        "ema": {"enabled": True},
        "data": {"kind": "precomputed", "urls": urls, "image_size": 32, "num_workers": 0},
        "denoiser": {"kind": "mmdit", "pooled_dim": 64,
                     "mmdit": {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2,
                               "num_heads": 4, "context_dim": 128, "qk_norm": "rms"}},
        "text": {"encoders": [CLIP, {"kind": "t5", "path": str(t5), "max_length": 16, "dropout_prob": 0.1}]},
        "objective": {"kind": "flow", "shift": "auto", "shift_base": 1.0, "shift_base_latent": 8},
        "conditioning": {"dropout_prob": 0.0, "null_embedding": "empty"},
        "latents": {"source": "precomputed", "scaling_factor": 1.0, "shift_factor": 0.0},
        "sampling": {"sampler": "euler", "steps": 4, "cfg_scale": 2.0},
    }


def test_mmdit_with_clip_and_t5_trains_under_zero3_on_two_ranks(tiny_t5, tmp_path):
    import harness as H
    from data_pipeline import DataConfig
    from data_pipeline.precompute import precompute_shards
    from data_pipeline.synthetic import write_synthetic
    from launch.runtime.config import load_config
    from ldm.text_encoders import build_text_encoders, encode_for_storage

    write_synthetic(tmp_path / "src", 128, size=32, seed=0, shard_size=64)
    cfg_path = tmp_path / "mmdit.yaml"
    urls = str(tmp_path / "pre" / "{00000..00001}.tar")
    run = tmp_path / "run"
    cfg_path.write_text(yaml.safe_dump(_config(run, urls, tiny_t5, 30)))
    text = build_text_encoders(load_config(cfg_path))

    def images(x):   # a fixed stand-in first stage: 4 x 8 x 8 latents with the image's colours and layout
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        return {"latent_mean": torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * 2}
    dcfg = DataConfig(urls=[str(tmp_path / "src")], image_size=32, num_workers=0)
    precompute_shards(dcfg, dcfg.urls, tmp_path / "pre", encode_images=images,
                      encode_captions=lambda caps: encode_for_storage(text, caps), rank=0, world_size=1,
                      batch_size=64)
    proc = H.run(["train", str(cfg_path)], nproc=2, script=H.LDM, timeout=600)
    H.assert_ok(proc)
    assert H.result(run)["status"] == "completed"
    losses = H.train_losses(run)
    assert sorted(losses) == list(range(3, 31, 3))
    first, last = (losses[3] + losses[6]) / 2, (losses[27] + losses[30]) / 2
    print(f"\nZeRO-3, 2 ranks, MMDiT + CLIP + T5: loss {first:.3f} -> {last:.3f}")
    assert last < 0.85 * first, f"loss should fall ({first:.3f} -> {last:.3f})"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
