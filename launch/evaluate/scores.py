"""`ldm eval recon | fid | clip-score`: metrics for exports and sample folders (weights from local files only).

- recon: an autoencoder export against shards: each image is encoded (posterior mode / quantized code),
  decoded, clamped to [-1, 1], and compared with PSNR and SSIM (autoencoder.metrics, on [0, 1] pixels),
  plus LPIPS (VGG16) when its weights file is there (autoencoder.perceptual finds it; --vgg names one).
  PSNR of identical images is capped at 100 dB (MSE floor 1e-10).
- fid: FID and KID between a folder of samples and reference images (shards, or a folder), with the
  Inception-v3 of launch/evaluate/inception.py. Both sets are read as 8-bit images, so samples and references see
  the same quantisation; references are center-cropped to the samples' size by the shard loader.
- clip-score: 100 * max(cos(image, text), 0) averaged over images, text from the folder's prompts.json,
  with an open_clip model from a local weights file (open_clip's own loader and preprocessing).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# ----------------------------------------------------------------------------- images

def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _to_unit(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


def folder_batches(files: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """[B, 3, H, W] in [0, 1] from image files (all of one size)."""
    for i in range(0, len(files), batch_size):
        yield torch.stack([_to_unit(read_rgb(f)) for f in files[i:i + batch_size]])


def _is_shard_spec(ref: Sequence[str]) -> bool:
    return not (len(ref) == 1 and Path(ref[0]).is_dir() and not any(Path(ref[0]).glob("*.tar")))


def shard_batches(urls: Sequence[str], image_size: int, batch_size: int, limit: Optional[int] = None
                  ) -> Iterator[torch.Tensor]:
    """[B, 3, S, S] in [0, 1] from shards (one pass, center crop), quantised to 8 bits like saved samples."""
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_eval_loader

    cfg = DataConfig(urls=list(urls), image_size=image_size, num_workers=0)
    seen = 0
    for batch in build_eval_loader(cfg, list(urls), rank=0, world_size=1, batch_size=batch_size):
        x = ((batch["image"].float().clamp(-1, 1) + 1) * 127.5).round() / 255.0
        if limit is not None:
            x = x[: max(0, limit - seen)]
        if len(x):
            yield x
        seen += len(x)
        if limit is not None and seen >= limit:
            return


# ----------------------------------------------------------------------------- reconstruction

@torch.no_grad()
def reconstruct(autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction: KL posterior mode, or the quantized code (VQ / FSQ)."""
    enc = autoencoder.encode(x)
    z = enc[0] if isinstance(enc, tuple) else enc.mode()
    return autoencoder.decode(z).float().clamp(-1, 1)


def _lpips(vgg: Optional[str], mode: str):
    """(LPIPS module or None, note). mode: auto (when a VGG16 file is found), on, off."""
    if mode == "off":
        return None, "off"
    from autoencoder.perceptual import LPIPS, PerceptualWeightsError

    try:
        return LPIPS("vgg16", vgg_path=vgg), "vgg16"
    except PerceptualWeightsError as e:
        if mode == "on" or vgg:
            raise
        return None, f"skipped: {e}"


@torch.no_grad()
def recon_metrics(export_dir: str | Path, urls: Sequence[str], *, batch_size: int = 16,
                  max_samples: Optional[int] = None, image_size: Optional[int] = None, vgg: Optional[str] = None,
                  lpips: str = "auto", device: str = "cpu", progress: bool = False) -> dict:
    """Mean PSNR / SSIM (/ LPIPS) of an autoencoder export's reconstructions of shard images."""
    from autoencoder.metrics import psnr, ssim
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_eval_loader

    from launch.runtime.exportdir import load_autoencoder
    from launch.runtime.progress import task_bar

    ae, config = load_autoencoder(export_dir, device)
    size = image_size or ae.config.resolution
    metric, lpips_note = _lpips(vgg, lpips)
    if metric is not None:
        metric.to(device)
    cfg = DataConfig(urls=list(urls), image_size=size, num_workers=0)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n = 0
    bar = task_bar(max_samples or 0, "recon", unit="img", enabled=progress)
    for batch in build_eval_loader(cfg, list(urls), rank=0, world_size=1, batch_size=batch_size):
        x = batch["image"].to(device)
        if max_samples is not None:
            x = x[: max_samples - n]
        if not len(x):
            break
        y = reconstruct(ae, x)
        sums["psnr"] += float(psnr(y, x).sum())
        sums["ssim"] += float(ssim(y, x).sum())
        if metric is not None:
            sums["lpips"] += float(metric(y, x).sum())
        n += len(x)
        bar.update(len(x))
        if max_samples is not None and n >= max_samples:
            break
    bar.close()
    if n == 0:
        raise ValueError(f"no images read from {list(urls)}")
    return {"samples": n, "image_size": size, "psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n,
            "lpips": sums["lpips"] / n if metric is not None else None, "lpips_backbone": lpips_note,
            "export": str(Path(export_dir).resolve()), "step": config.get("step")}


# ----------------------------------------------------------------------------- FID / KID

@torch.no_grad()
def features(model, batches: Iterable[torch.Tensor], device: str = "cpu") -> np.ndarray:
    out = [model(b.to(device)).double().cpu().numpy() for b in batches]
    if not out:
        raise ValueError("no images")
    return np.concatenate(out)


def fid_kid(samples_dir: str | Path, ref: Sequence[str] | str, *, inception: Optional[str] = None,
            size: int = 299, batch_size: int = 32, max_ref: Optional[int] = None, kid_subsets: int = 100,
            kid_subset_size: int = 1000, device: str = "cpu", model=None) -> dict:
    """FID and KID between the images of `samples_dir` and the reference (shard URLs or an image folder)."""
    from .fid import fid_from_features, kernel_inception_distance
    from .inception import load_inception

    if model is None:
        model, info = load_inception(inception, size=size)
    else:
        info = {"path": None, "variant": "given", "size": model.size}
    model.to(device)
    files = list_images(samples_dir)
    f_samples = features(model, folder_batches(files, batch_size), device)
    ref = [ref] if isinstance(ref, str) else list(ref)
    if _is_shard_spec(ref):
        side = read_rgb(files[0]).shape[0]
        f_ref = features(model, shard_batches(ref, side, batch_size, max_ref), device)
    else:
        ref_files = list_images(ref[0])[: max_ref or None]
        f_ref = features(model, folder_batches(ref_files, batch_size), device)
    if len(f_samples) < 2 or len(f_ref) < 2:
        raise ValueError(f"FID needs at least 2 images per set (samples {len(f_samples)}, reference {len(f_ref)})")
    kid_mean, kid_std = kernel_inception_distance(f_samples, f_ref, num_subsets=kid_subsets,
                                                  subset_size=kid_subset_size)
    return {"fid": fid_from_features(f_samples, f_ref), "kid": kid_mean, "kid_std": kid_std,
            "kid_subset_size": min(kid_subset_size, len(f_samples), len(f_ref)), "n_samples": len(f_samples),
            "n_ref": len(f_ref), "inception": info,
            "note": None if min(len(f_samples), len(f_ref)) >= 2048 else
            "fewer images than feature dimensions (2048): FID is biased upwards; compare only like-sized sets"}


# ----------------------------------------------------------------------------- CLIP score

def resolve_clip_weights(arch: str, path: Optional[str] = None) -> Path:
    from .inception import EvalWeightsError, eval_weights_dir

    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise EvalWeightsError(f"CLIP weights file {str(p)!r} not found (open_clip {arch} state dict)")
    env = os.environ.get("LDM_CLIP_WEIGHTS")
    if env:
        return resolve_clip_weights(arch, env)
    folder = eval_weights_dir()
    names = [f"open_clip_{arch}.{ext}" for ext in ("safetensors", "bin", "pt", "pth")]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise EvalWeightsError(f"CLIP score needs open_clip weights for {arch} and found none: expected "
                           f"{str(folder / names[0])!r} (or .bin/.pt/.pth). Nothing is downloaded: put the file "
                           f"there (or set LDM_EVAL_WEIGHTS_DIR / LDM_CLIP_WEIGHTS), or pass --clip-weights FILE.")


def load_clip(arch: str = "ViT-B-32", weights: Optional[str] = None, model_config: Optional[str] = None):
    """(open_clip model, image preprocess, tokenizer, info) from a local weights file."""
    import open_clip

    if model_config:
        open_clip.add_model_config(model_config)
    path = resolve_clip_weights(arch, weights)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path))
    return model.eval(), preprocess, open_clip.get_tokenizer(arch), {"arch": arch, "path": str(path)}


@torch.no_grad()
def clip_score(samples_dir: str | Path, *, prompts: Optional[dict[str, str]] = None, arch: str = "ViT-B-32",
               weights: Optional[str] = None, model_config: Optional[str] = None, batch_size: int = 32,
               device: str = "cpu", clip=None) -> dict:
    """Mean CLIP score of the images of a sample folder against their prompts (prompts.json)."""
    samples_dir = Path(samples_dir)
    if prompts is None:
        pfile = samples_dir / "prompts.json"
        if not pfile.is_file():
            raise FileNotFoundError(f"{pfile} not found: CLIP score needs the prompt of each image "
                                    f"(written by `ldm sample`)")
        prompts = json.loads(pfile.read_text())
    model, preprocess, tokenizer, info = clip if clip is not None else load_clip(arch, weights, model_config)
    model.to(device)
    names = sorted(prompts)
    missing = [n for n in names if not (samples_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"images named in prompts.json are missing: {missing[:5]}")
    scores = []
    for i in range(0, len(names), batch_size):
        chunk = names[i:i + batch_size]
        images = torch.stack([preprocess(Image.open(samples_dir / n).convert("RGB")) for n in chunk]).to(device)
        text = tokenizer([prompts[n] for n in chunk]).to(device)
        fi = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
        scores.append((100.0 * (fi * ft).sum(-1)).clamp_min(0).cpu())
    s = torch.cat(scores).double()
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if len(s) > 1 else 0.0,
            "n": len(s), "clip": info if isinstance(info, dict) else {"arch": arch}}

