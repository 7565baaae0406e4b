"""`ldm sample`: PNGs + prompts.json + grid from an export; deterministic for a seed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from export_helpers import cli, ldm
from launch.runtime.exportdir import load_pipeline
from launch.interop.sample import read_prompts, sample_export

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def test_cli_twice_with_one_seed_gives_byte_identical_pngs(unet_export, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        ldm("sample", unet_export, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", "3", "--steps", "4",
            "--cfg", "3", "--seed", "7", "--batch-size", "4", "--out", out, "--grid", tmp_path / f"{name}.png",
            "--no-progress")
        runs.append(out)
    names = [f"{i:05d}.png" for i in range(6)]
    assert sorted(p.name for p in runs[0].glob("*.png")) == names
    for n in names:
        assert (runs[0] / n).read_bytes() == (runs[1] / n).read_bytes(), n
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    prompts = json.loads((runs[0] / "prompts.json").read_text())
    assert prompts == {n: PROMPTS[i // 3] for i, n in enumerate(names)}
    grid = Image.open(tmp_path / "a.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)        # one row per prompt, 32 px images, 2 px padding
    settings = json.loads((runs[0] / "sampling.json").read_text())
    assert settings["steps"] == 4 and settings["seed"] == 7 and settings["sampler"] == "ddim"
    # another seed gives other images
    other = tmp_path / "c"
    rc, _, err = cli("sample", unet_export, "--prompt", PROMPTS[0], "--steps", "4", "--seed", "8", "--out", other,
                     "--no-progress")
    assert rc == 0, err
    assert (other / "00000.png").read_bytes() != (runs[0] / "00000.png").read_bytes()


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_images_do_not_depend_on_the_batch_size(unet_export, tmp_path, sampler):
    pipe = load_pipeline(unet_export)
    kw = dict(num=3, steps=3, cfg_scale=2.0, sampler=sampler, seed=1, progress=False, pipeline=pipe)
    sample_export(unet_export, PROMPTS, tmp_path / "b1", batch_size=1, **kw)
    sample_export(unet_export, PROMPTS, tmp_path / "b4", batch_size=4, **kw)
    worst = 0
    for i in range(6):
        a = np.asarray(Image.open(tmp_path / "b1" / f"{i:05d}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b4" / f"{i:05d}.png")).astype(int)
        worst = max(worst, int(np.abs(a - b).max()))
    assert worst <= 1      # the same images up to float rounding at a pixel boundary


def test_bf16_prompts_file_and_errors(unet_export, tmp_path):
    pfile = tmp_path / "prompts.txt"
    pfile.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    assert read_prompts(pfile) == PROMPTS
    (tmp_path / "p.json").write_text(json.dumps({"00001.png": PROMPTS[1], "00000.png": PROMPTS[0]}))
    assert read_prompts(tmp_path / "p.json") == PROMPTS
    out = tmp_path / "bf16"
    rc, _, err = cli("sample", unet_export, "--prompts", pfile, "--steps", "3", "--dtype", "bf16", "--out", out,
                     "--no-progress")
    assert rc == 0, err
    assert len(list(out.glob("*.png"))) == 2
    assert json.loads((out / "sampling.json").read_text())["dtype"] == "bf16"
    fp32 = tmp_path / "fp32"
    sample_export(unet_export, PROMPTS, fp32, steps=3, progress=False)
    a = np.asarray(Image.open(out / "00000.png")).astype(int)
    b = np.asarray(Image.open(fp32 / "00000.png")).astype(int)
    assert np.abs(a - b).mean() < 8           # bf16 arithmetic, same images within a few levels
    rc, _, err = cli("sample", tmp_path / "nothing", "--prompt", "x", "--out", tmp_path / "o")
    assert rc == 2 and "config.json not found" in err
    if not torch.cuda.is_available():
        rc, _, err = cli("sample", unet_export, "--prompt", "x", "--device", "cuda", "--out", tmp_path / "o")
        assert rc == 2 and "CUDA" in err


def test_learned_null_dit_export_samples_with_guidance(ae_export, tmp_path):
    from export_helpers import make_dit_export

    export = make_dit_export(tmp_path / "dit", ae_export)
    pipe = load_pipeline(export)
    a = sample_export(export, PROMPTS[:1], tmp_path / "w3", num=2, cfg_scale=3.0, progress=False, pipeline=pipe)
    sample_export(export, PROMPTS[:1], tmp_path / "w1", num=2, cfg_scale=1.0, progress=False, pipeline=pipe)
    assert a["sampler"] == "euler" and a["steps"] == 4 and a["num_images"] == 2
    img3 = np.asarray(Image.open(tmp_path / "w3" / "00000.png")).astype(int)
    img1 = np.asarray(Image.open(tmp_path / "w1" / "00000.png")).astype(int)
    assert np.abs(img3 - img1).max() > 0        # guidance against the learned null changes the image


def _pngs(folder, n):
    return [np.asarray(Image.open(folder / f"{i:05d}.png")).astype(int) for i in range(n)]


def test_guidance_interval_override_guides_only_inside_it(unet_export, tmp_path):
    pipe = load_pipeline(unet_export)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # the toy export barely trained its zero-initialised outputs: give the text a say
        for p in pipe[0].denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    kw = dict(num=2, steps=4, sampler="euler", seed=3, batch_size=4, progress=False, pipeline=pipe)
    sample_export(unet_export, PROMPTS, tmp_path / "cfg1", cfg_scale=1.0, **kw)
    # no sampling time of 4 Euler steps lies in [0, 1e-6]: guidance 3 is never applied
    off = sample_export(unet_export, PROMPTS, tmp_path / "off", cfg_scale=3.0, guidance_interval=(0.0, 1e-6), **kw)
    sample_export(unet_export, PROMPTS, tmp_path / "full", cfg_scale=3.0, guidance_interval=(0.0, 1.0), **kw)
    sample_export(unet_export, PROMPTS, tmp_path / "default", cfg_scale=3.0, **kw)   # the export guides everywhere
    cfg1, off_imgs = _pngs(tmp_path / "cfg1", 4), _pngs(tmp_path / "off", 4)
    full, default = _pngs(tmp_path / "full", 4), _pngs(tmp_path / "default", 4)
    assert max(int(np.abs(a - b).max()) for a, b in zip(cfg1, off_imgs)) <= 1     # u + 1 * (c - u) rounds
    assert all((a == b).all() for a, b in zip(full, default))
    assert np.mean([np.abs(a - b).mean() for a, b in zip(full, cfg1)]) > 1.0       # guidance did act
    assert off["guidance_interval"] == [0.0, 1e-6]
    assert json.loads((tmp_path / "default" / "sampling.json").read_text())["guidance_interval"] is None
    rc, _, err = cli("sample", unet_export, "--prompt", "x", "--guidance-interval", "0.8", "0.2",
                     "--out", tmp_path / "bad", "--no-progress")
    assert rc == 2 and "0 <= lo <= hi <= 1" in err
