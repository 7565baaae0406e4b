"""Decoding and geometry: mode conversions, EXIF orientation, resize/crop, flip, range, buckets, filters."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import DataConfig
from data_pipeline.samples import Decoder, Filtered, Sample
from data_pipeline.transforms import (JsonFilter, decode_to, draw_flip, make_buckets, mirror_caption, nearest_bucket,
                                      open_image, says_left_or_right, to_float, to_float_on_device, to_rgb)
from datakit import jpeg, odd_mode_images, png


def decode(data: bytes, size=(16, 16), **kw) -> np.ndarray:
    return decode_to(open_image(data), size, **kw)


def test_mode_conversions_give_expected_rgb():
    imgs = odd_mode_images()
    # RGBA (255, 0, 0, alpha 128) over white -> (255, 127, 127)
    assert np.abs(decode(imgs["rgba"][1]).astype(int) - [255, 127, 127]).max() <= 1
    # LA fully transparent -> white
    assert (decode(imgs["la"][1]) == 255).all()
    # P with transparent index 0 -> white
    assert (decode(imgs["p"][1]) == 255).all()
    # L 77 -> grey (77, 77, 77) (JPEG: within a step)
    assert np.abs(decode(imgs["l"][1]).astype(int) - 77).max() <= 2
    # 16-bit grey 40000 -> 40000 / 257 = 155.6
    assert np.abs(decode(imgs["i16"][1]).astype(int) - 156).max() <= 1
    # CMYK (0, 255, 255, 0) is red
    r, g, b = decode(imgs["cmyk"][1]).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    # webp decodes
    assert decode(imgs["webp"][1]).shape == (16, 16, 3)
    for ext, data in imgs.values():
        out = decode(data)
        assert out.dtype == np.uint8 and out.shape == (16, 16, 3)


def test_to_rgb_modes_directly():
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("PA", (4, 4), (0, 0))).mode == "RGB"


def test_exif_orientation_is_applied():
    # stored 40 wide x 20 high, left half red / right half blue, orientation 6 (rotate 90 clockwise to view)
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(Image.fromarray(a), exif=exif.tobytes())
    out = decode_to(open_image(data), (20, 40)).astype(int)  # upright it is 20 wide x 40 high
    assert out.shape == (40, 20, 3)
    top, bottom = out[:15].reshape(-1, 3).mean(0), out[25:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60       # red on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60


def test_resize_crop_shapes_and_random_crop_position():
    a = np.zeros((30, 90, 3), np.uint8)
    a[:, :, 0] = np.arange(90)[None, :] * 2  # horizontal ramp
    data = png(Image.fromarray(a))
    center = decode(data, (10, 10))
    assert center.shape == (10, 10, 3)
    # shorter side 30 -> 10: width 90 -> 30, the center crop covers source x in [30, 60)
    assert abs(int(center[:, :, 0].mean()) - 2 * 45) <= 4
    lefts = set()
    for seed in range(20):
        out = decode(data, (10, 10), crop="random", rng=random.Random(seed))
        assert out.shape == (10, 10, 3)
        lefts.add(int(out[0, 0, 0]))
    assert len(lefts) > 5  # positions vary with the rng
    # same rng, same pixels
    assert np.array_equal(decode(data, (10, 10), crop="random", rng=random.Random(3)),
                          decode(data, (10, 10), crop="random", rng=random.Random(3)))


def test_flip_and_draft_decode():
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, :32] = 255
    data = jpeg(Image.fromarray(a))
    plain = decode(data, (16, 16)).astype(int)   # a 4x reduction: the JPEG decoder scales (draft)
    flipped = decode(data, (16, 16), rng=random.Random(0), flip_prob=1.0).astype(int)
    assert plain[:, :4].mean() > 200 and plain[:, -4:].mean() < 50
    assert np.abs(flipped - plain[:, ::-1]).max() <= 2
    img = open_image(data)
    decode_to(img, (16, 16))
    assert img.size == (16, 16)  # the decoder delivered the reduced size directly


def test_flip_drawn_by_the_caller_keeps_the_random_stream():
    """The decoder draws the flip itself (to mirror the caption) and passes it: the image, and the crop
    drawn after the flip, are those decode_to draws on its own from the same seed."""
    a = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    data = png(Image.fromarray(a))
    for seed in range(6):
        alone = decode(data, (16, 16), rng=random.Random(seed), flip_prob=0.5, crop="random")
        rng = random.Random(seed)
        flip = draw_flip(rng, 0.5)
        assert np.array_equal(decode(data, (16, 16), rng=rng, flip=flip, crop="random"), alone)
    assert draw_flip(None, 1.0) is False and draw_flip(random.Random(0), 0.0) is False


def test_mirror_caption_swaps_sides_and_nothing_else():
    assert mirror_caption("a yellow square to the left of a purple circle") == \
        "a yellow square to the right of a purple circle"
    assert mirror_caption("Left: a cat; RIGHT: a dog, rightmost a bird, looking leftwards") == \
        "Right: a cat; LEFT: a dog, leftmost a bird, looking rightwards"
    assert mirror_caption("his left-hand glove, all rights reserved, copyright, leftover") == \
        "his right-hand glove, all rights reserved, copyright, leftover"
    assert mirror_caption("a red circle above a blue square") == "a red circle above a blue square"
    for caption in ("a cat to the left of a dog", "Rightmost tree", "leftover pizza", "bright light"):
        assert mirror_caption(mirror_caption(caption)) == caption
        assert says_left_or_right(caption) == (mirror_caption(caption) != caption)


def test_to_float_range_and_layout():
    u8 = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # [1, 1, 1, 3]
    f = to_float(u8)
    assert f.shape == (1, 3, 1, 1) and f.dtype == torch.float32
    assert f.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def test_device_scaling_equals_host_scaling_for_every_byte():
    """to_float_on_device (torch, where the runtime trains) and to_float (numpy, the loader's host path) give
    the same float32 for all 256 values and the same NCHW layout, so either path trains the same numbers."""
    u8 = torch.randint(0, 256, (3, 4, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dev, host = to_float_on_device(u8), to_float(u8)
    assert dev.shape == host.shape == (3, 3, 4, 8) and dev.is_contiguous()
    assert torch.equal(dev, host)
    every = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    assert torch.equal(to_float_on_device(every), to_float(every))


def test_buckets_have_about_equal_area_and_bounded_ratio():
    buckets = make_buckets(256, 64, 2.0)
    assert (256, 256) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert max(w / h, h / w) <= 2.0
        assert abs(w * h / 256 ** 2 - 1) < 0.15
    assert {(h, w) for w, h in buckets} == set(buckets)  # symmetric
    assert nearest_bucket(buckets, 1000, 500) == max(buckets, key=lambda b: b[0] / b[1])
    assert nearest_bucket(buckets, 500, 500) == (256, 256)


def test_json_filters_and_size_filter():
    f = JsonFilter(["pwatermark < 0.5", "aesthetic.score >= 5"], min_original_size=100, max_aspect_ratio=3)
    assert f.rejects({"pwatermark": 0.1, "aesthetic": {"score": 6}}) is None
    assert f.rejects({"pwatermark": 0.7, "aesthetic": {"score": 6}}) == "pwatermark < 0.5"
    assert f.rejects({"pwatermark": 0.1}) == "aesthetic.score missing"
    assert f.rejects_size((200, 150)) is None
    assert f.rejects_size((200, 90)) == "min_original_size"
    assert f.rejects_size((400, 120)) == "max_aspect_ratio"


def test_decoder_filters_are_not_faults():
    cfg = DataConfig(image_size=8, json_filters=["pwatermark < 0.5"], min_original_size=20)
    dec = Decoder(cfg, train=False)
    img = jpeg(Image.new("RGB", (32, 32)))
    raw = {"__key__": "k", "__url__": "u", "jpg": img, "txt": b"c"}
    ok = dec({**raw, "json": json.dumps({"pwatermark": 0.1, "original_width": 32, "original_height": 32})}, None)
    assert isinstance(ok, Sample) and ok.image.shape == (8, 8, 3)
    assert isinstance(dec({**raw, "json": json.dumps({"pwatermark": 0.9})}, None), Filtered)
    small = dec({**raw, "json": json.dumps({"pwatermark": 0.1, "original_width": 10, "original_height": 40})}, None)
    assert isinstance(small, Filtered) and small.reason == "min_original_size"


def test_config_validation_through_configio():
    from launch.runtime.configio import ConfigError, build_dataclass

    cfg = build_dataclass(DataConfig, {"sources": [{"urls": "a.tar", "weight": 2}, {"urls": ["b.tar"]}],
                                       "json_filters": ["punsafe < 0.1"], "batches_per_epoch": 10}, "data")
    assert [s.weight for s in cfg.sources] == [2.0, 1.0] and cfg.sources[0].urls == ["a.tar"]
    for bad, msg in [({"json_filters": ["punsafe maybe"]}, "json filter"),
                     ({"urls": ["a"], "sources": [{"urls": ["b"]}]}, "not both"),
                     ({"flip_prob": 1.5}, "flip_prob"),
                     ({"crop": "corner"}, "crop"),
                     ({"sources": [{"urls": [], "weight": 1}]}, "at least one url"),
                     ({"batches_per_epoch": 2, "samples_per_epoch": 10}, "not both")]:
        with pytest.raises(ConfigError, match=msg):
            build_dataclass(DataConfig, bad, "data")
