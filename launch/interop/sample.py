"""`ldm sample`: images from a stage-two export, one PNG per image.

    DIR/00000.png ...     image i of the run (prompt-major: every prompt `num` times, in order)
    DIR/prompts.json      {"00000.png": "a red circle on a blue background", ...}
    DIR/sampling.json     the settings (export, step, sampler, steps, cfg, seed, dtype, ...)
    --grid PNG            all images in one grid (one row per prompt when num > 1)

Determinism: image i starts from its own noise, drawn from a generator seeded with
derive_seed(seed, "sample", i), so the same seed gives the same image whatever the batch size and
the position of the image in its batch (the network's arithmetic can differ in the last bits between
batch sizes; for one batch size, two runs write byte-identical PNGs). Stochastic samplers (ddpm, ddim with
eta > 0) draw their per-step noise from one generator per batch (seeded from the seed and the batch's first
index), so for them the batch size is part of the result.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from launch.runtime.images import save_grid, save_images

SAMPLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: a JSON list of strings, a JSON object {name: prompt} (e.g. another run's
    prompts.json, in file-name order), or plain text with one prompt per non-empty line."""
    text = Path(path).read_text()
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        data = json.loads(stripped)
        if isinstance(data, dict):
            return [str(data[k]) for k in sorted(data)]
        return [str(p) for p in data]
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def image_seed(seed: int, index: int) -> int:
    from data_pipeline.state import derive_seed

    return derive_seed(int(seed), "sample", int(index))


def initial_noise(shape: Sequence[int], seed: int, indices: Sequence[int]) -> torch.Tensor:
    """[len(indices), *shape] standard normal noise, row i from its own generator (image_seed)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


@torch.no_grad()
def generate_latents(stage, prompts: Sequence[str], indices: Sequence[int], *, seed: int, steps: int,
                     cfg_scale: float, sampler: str, latent_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                     guidance_interval: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Latents (denoiser units, fp32) for one batch of prompts; image indices pick the noise. Guidance applies
    on `guidance_interval` of unit time (None: the stage's sampling.guidance_interval; (0, 1): every step)."""
    from ldm.conditioning import unconditional_like
    from ldm.guidance import guided
    from ldm.samplers import sample

    s = stage.sampling
    device = stage.device
    cond = stage.condition({"caption": list(prompts)})
    if dtype != torch.float32:
        cond = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cond.items()}
    noise = initial_noise(latent_shape, seed, indices).to(device)
    fn = stage.model_fn(stage.denoiser)
    if cfg_scale != 1.0:
        empty = stage.condition({"caption": [""]}) if stage.conditioning.null_embedding == "empty" else None
        if empty is not None and dtype != torch.float32:
            empty = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                     for k, v in empty.items()}
        uncond = unconditional_like(cond, stage.conditioning.null_embedding, empty)
        interval = s.guidance_interval if guidance_interval is None else tuple(guidance_interval)
        fn = guided(fn, uncond, cfg_scale, unit_time=stage.objective.unit_time, interval=interval,
                    rescale=s.guidance_rescale)
    base = fn

    def fp32_out(x, t, c):   # the sampler's arithmetic stays in fp32 whatever the network runs in
        return base(x, t, c).float()

    g = torch.Generator().manual_seed(image_seed(seed, -1 - int(indices[0])))
    z = sample(sampler, fp32_out, stage.objective, noise, cond, steps, eta=s.eta, spacing=s.spacing,
               shift=s.flow_shift, generator=g, clip_x0=s.clip_x0)
    return z.float()


def sample_export(export_dir: str | Path, prompts: Sequence[str], out_dir: str | Path, *, num: int = 1,
                  steps: Optional[int] = None, cfg_scale: Optional[float] = None, sampler: Optional[str] = None,
                  seed: int = 0, batch_size: int = 8, device: str = "cpu", dtype: str = "fp32",
                  grid: Optional[str | Path] = None, size: Optional[int] = None, progress: bool = True,
                  pipeline=None, guidance_interval: Optional[Sequence[float]] = None) -> dict:
    """Sample `num` images per prompt from an export into `out_dir`. Returns the summary written to
    DIR/sampling.json. `pipeline` = (stage, config) from `launch.runtime.exportdir.load_pipeline` to reuse one.
    `guidance_interval` (lo, hi) overrides the export's; (0, 1) guides every step."""
    from launch.runtime.exportdir import load_pipeline
    from launch.runtime.progress import task_bar

    if dtype not in SAMPLE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(SAMPLE_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked but torch sees no CUDA device")
    if not prompts:
        raise ValueError("no prompts")
    if num < 1 or batch_size < 1:
        raise ValueError("num and batch size must be >= 1")
    if guidance_interval is not None:   # the config's own rule, checked before loading anything
        from ldm.config import SamplingConfig

        guidance_interval = tuple(float(v) for v in guidance_interval)
        SamplingConfig(guidance_interval=guidance_interval).validate()
    stage, config = pipeline if pipeline is not None else load_pipeline(export_dir, device)
    torch_dtype = SAMPLE_DTYPES[dtype]
    stage.denoiser.to(device=device, dtype=torch_dtype).eval()
    s = stage.sampling
    steps = steps or s.steps
    cfg_scale = s.cfg_scale if cfg_scale is None else float(cfg_scale)
    sampler = sampler or s.sampler
    interval = s.guidance_interval if guidance_interval is None else guidance_interval
    shape = list(stage.latent_shape)
    if size is not None:
        factor = stage.autoencoder.downsample_factor if stage.autoencoder is not None else 1
        if size % factor:
            raise ValueError(f"--size {size} is not a multiple of the autoencoder's downsampling factor {factor}")
        shape[1] = shape[2] = size // factor
    items = [p for p in prompts for _ in range(num)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    images = []
    t0 = time.time()
    bar = task_bar(len(items), "sample", unit="img", enabled=progress)
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            indices = list(range(start, start + len(batch)))
            z = generate_latents(stage, batch, indices, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                 sampler=sampler, latent_shape=shape, dtype=torch_dtype, guidance_interval=interval)
            x = stage.decode(z).float().cpu()
            for i, p in zip(indices, batch):
                names[f"{i:05d}.png"] = p
            save_images(x, out_dir, start=start)
            if grid is not None:
                images.append(x)
            bar.update(len(batch))
    finally:
        bar.close()
    (out_dir / "prompts.json").write_text(json.dumps(names, indent=1))
    summary = {"export": str(Path(export_dir).resolve()), "step": config.get("step"), "weights": config.get("weights"),
               "num_images": len(items), "prompts": len(prompts), "per_prompt": num, "sampler": sampler,
               "steps": steps, "cfg_scale": cfg_scale, "guidance_interval": list(interval) if interval else None,
               "seed": seed, "batch_size": batch_size, "device": device, "dtype": dtype, "latent_shape": shape,
               "seconds": round(time.time() - t0, 3)}
    (out_dir / "sampling.json").write_text(json.dumps(summary, indent=1))
    if grid is not None:
        nrow = num if num > 1 else max(1, math.ceil(math.sqrt(len(items))))
        save_grid(torch.cat(images), grid, nrow=nrow)
        summary["grid"] = str(grid)
    return summary
