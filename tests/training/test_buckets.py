"""Aspect-ratio buckets and .txt caption files on tiny SD1.5 and SDXL models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from hypersd_core.training.buckets import bucket_sizes, fit_to_bucket, nearest_bucket

WIDE = (24, 72)  # (h, w) of the wide test images: aspect 1:3, beyond the 1:2 limit


def test_bucket_sizes_sdxl():
    sizes = bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and (768, 1344) in sizes and (1344, 768) in sizes
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 for h, w in sizes)
    assert all(max(h, w) / min(h, w) <= 2.0 for h, w in sizes)
    assert nearest_bucket(600, 1200, sizes) == (704, 1408)  # aspect 1:2 exactly
    assert nearest_bucket(1000, 1010, sizes) == (1024, 1024)
    with pytest.raises(ValueError, match="res >= step"):
        bucket_sizes(32, 64)


def test_fit_to_bucket_covers_and_center_crops():
    img = Image.fromarray(np.zeros((100, 300, 3), np.uint8))  # h 100, w 300
    x, original, crop = fit_to_bucket(img, (64, 128))
    assert x.shape == (3, 64, 128) and original == (100, 300)
    # scale max(64/100, 128/300) = 0.64: resized to 192 x 64, cropped 32 px from the left
    assert crop == (0, 32)


def _caption_folder(folder, n=6):
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = WIDE if i % 2 == 0 else (48, 48)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a red handwritten digit {i}\n")
    return folder


def _batches(model, folder, n=8):
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.batch import DataOptions
    from hypersd_core.training.data import make_data

    backbone = load_backbone(str(model), device="cpu")
    data = make_data(backbone, str(folder), DataOptions(buckets=True))
    gen = torch.Generator().manual_seed(0)
    return backbone, [data.sample(2, gen) for _ in range(n)]


def test_sd15_batches_share_a_bucket_and_captions_come_from_txt(tiny_sd15, tmp_path):
    from hypersd_core.training.buckets import latent_step

    backbone, batches = _batches(tiny_sd15, _caption_folder(tmp_path))
    res, step = backbone.resolution, latent_step(backbone)
    wide = nearest_bucket(*WIDE, bucket_sizes(res, step))
    assert wide[1] > wide[0]  # a landscape bucket
    shapes = {tuple(b.images.shape[-2:]) for b in batches}
    assert shapes == {wide, (res // step * step,) * 2}  # both buckets drawn, never mixed
    for b in batches:
        assert b.latents.shape[-2:] == tuple(s * b.latents.shape[-1] // b.images.shape[-1]
                                             for s in b.images.shape[-2:])
        assert all(p.startswith("a red handwritten digit ") and not p.endswith("\n")
                   for p in b.prompts)


def test_sdxl_time_ids_carry_original_size_crop_and_bucket(tiny_sdxl, tmp_path):
    backbone, batches = _batches(tiny_sdxl, _caption_folder(tmp_path))
    wide = [b for b in batches if b.images.shape[-1] > b.images.shape[-2]]
    assert wide, "no landscape batch drawn"
    bh, bw = wide[0].images.shape[-2:]
    scale = max(bh / WIDE[0], bw / WIDE[1])
    rw, rh = max(bw, round(WIDE[1] * scale)), max(bh, round(WIDE[0] * scale))
    expect = [WIDE[0], WIDE[1], (rh - bh) // 2, (rw - bw) // 2, bh, bw]
    for ids in (wide[0].embeds.time_ids, wide[0].uncond.time_ids):
        assert ids.tolist() == [expect, expect]
    square = [b for b in batches if b.images.shape[-1] == b.images.shape[-2]][0]
    res = square.images.shape[-1]
    assert square.embeds.time_ids[0].tolist() == [48, 48, 0, 0, res, res]
    assert not math.isnan(float(wide[0].latents.sum()))


def test_a_bucketed_run_trains_from_caption_files(tiny_sd15, tmp_path):
    from hypersd_core.training.config import make_config
    from hypersd_core.training.runs import Run
    from hypersd_core.training.trainer import train

    (tmp_path / "data").mkdir()
    folder = _caption_folder(tmp_path / "data")
    cfg = make_config({"model": str(tiny_sd15), "data": str(folder), "data_buckets": True,
                       "steps": 4, "batch_size": 2, "log_every": 1, "sample_every": 100,
                       "checkpoint_every": 100, "lora_rank": 4, "lora_alpha": 4,
                       "sample_prompts": ["a red handwritten digit 1"]})
    run = Run.create(tmp_path / "run", cfg)
    assert train(run.dir)["state"] == "done"
    records, _ = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
