"""`ldm train CONFIG init.from=DIFFUSERS_PIPELINE` through the real DeepSpeed engine (2 ranks, ZeRO-2, gloo):
the engines start from the diffusers weights, and a run directory that already holds a checkpoint resumes
from it instead (init.from is then not read at all)."""
from __future__ import annotations

import json


import harness
from init_helpers import VAE_SCALE, save_pipeline_parts, tiny_pixart, tiny_unet, tiny_vae

FLAGS = ["train.checkpoint_every=1000", "validation.every=0", "validation.sample_every=0", "logging.progress=false",
         "data.num_workers=0", "train.micro_batch_size=2", "train.log_every=1", "data.image_size=16",
         f"latents.scaling_factor={VAE_SCALE}", "optimizer.lr=1e-12", "optimizer.warmup_steps=0",
         "deepspeed.zero_stage=2"]


def test_ldm_train_init_from_diffusers_pipeline(tmp_path):
    from data_pipeline.synthetic import write_synthetic
    from launch.interop.vae_import import import_diffusers_vae
    from launch.runtime.runweights import ema_weights, live_weights, open_run
    from ldm.convert import unet_to_diffusers
    from ldm.config import UNetConfig

    write_synthetic(tmp_path / "data", 16, size=16, seed=0, shard_size=16)
    unet = tiny_unet()
    pipe = save_pipeline_parts(tmp_path / "pipe", unet=unet, vae=tiny_vae())
    ae = import_diffusers_vae(pipe, tmp_path / "ae")
    run = tmp_path / "run"
    args = ["train", "configs/ldm/unet-small.yaml", f"run_dir={run}", f"data.urls={tmp_path}/data/00000.tar",
            f"latents.autoencoder={ae}", f"init.from={pipe}", "init.what=weights+ema", "train.max_steps=2", *FLAGS]
    harness.assert_ok(harness.run(args, nproc=2, script=harness.LDM, timeout=600))

    report = json.loads((run / "init.json").read_text())
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    ck = open_run(run)
    cfg = ck.cfg.denoiser.unet
    assert isinstance(cfg, UNetConfig)
    ref = {k: v.detach() for k, v in unet.state_dict().items()}
    for name, got in (("live", live_weights(ck)), ("ema", ema_weights(ck))):
        conv = unet_to_diffusers({k: v for k, v in got.items() if not k.startswith("null_")}, cfg)
        worst = max(float((conv[k].detach() - ref[k]).abs().max()) for k in ref)
        print(f"{name} weights after 2 steps at lr 1e-12 vs the diffusers UNet: max |diff| {worst:.2e}")
        assert set(conv) == set(ref) and worst < 1e-6
    losses = harness.train_losses(run)
    assert len(losses) == 2 and all(0 < v < 10 for v in losses.values())

    # resume takes precedence: init.from now names a source that does not fit (strict would stop), unread
    pix = tiny_pixart()
    pix.save_pretrained(str(tmp_path / "pixart"))
    args2 = [a for a in args if not a.startswith(("init.from=", "train.max_steps="))]
    proc = harness.run([*args2, f"init.from={tmp_path / 'pixart'}", "train.max_steps=3"], nproc=2,
                       script=harness.LDM, timeout=600)
    harness.assert_ok(proc)
    assert harness.result(run)["step"] == 3
    assert json.loads((run / "init.json").read_text())["source"] == report["source"]
