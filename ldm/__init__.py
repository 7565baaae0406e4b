"""Stage two: text-conditioned latent denoisers (UNet, DiT), open_clip text encoder, objectives, guidance
and samplers, in plain PyTorch. Entry points: `ldm.training.DiffusionStage` (the TrainingStage the runtime
drives) and `ldm.training.build_denoiser` (a DenoiserConfig -> module, meta-device safe).
The time convention every part shares is written once, in `ldm/objectives.py`."""
