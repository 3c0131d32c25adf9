"""Aspect-ratio bucketing and kohya-style caption files for image folders.

Buckets (NovelAI / kohya sd-scripts): sizes (h, w) with about the model's pixel count
``res**2``, both sides multiples of ``step`` (what the VAE and the UNet's downsampling
divide), aspect ratios up to ``max_ratio``. Each image goes to the bucket nearest its
aspect ratio (in log space), is resized to cover it and center-cropped; a batch is drawn
from one bucket so its latents share a shape. SDXL's time ids then carry the original
size, the crop offset in the resized image, and the bucket as the target size
(SDXL paper, section 2.2: size and crop conditioning).

Caption files: ``0001.png`` with ``0001.txt`` beside it (kohya's layout), read when the
folder has no ``metadata.jsonl``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def bucket_sizes(res: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) buckets, h and w multiples of ``step``, h*w <= res**2, aspect <= max_ratio;
    for each width the tallest height that fits, both orientations, square included."""
    if step < 1 or res < step:
        raise ValueError(f"buckets need res >= step >= 1, got res={res}, step={step}")
    out = {(res // step * step,) * 2}
    w = step
    while w <= res * max_ratio:
        h = (res * res // w) // step * step
        if h >= step and max(h, w) / min(h, w) <= max_ratio:
            out.add((h, w))
            out.add((w, h))
        w += step
    return sorted(out)


def nearest_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest h/w (log distance; larger area on a tie)."""
    target = math.log(h / w)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]
                  ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize to cover the bucket, center crop: ([3, bh, bw] in [-1, 1], original (h, w),
    crop (top, left) in the resized image)."""
    bh, bw = bucket
    img = img.convert("RGB")
    original = (img.height, img.width)
    scale = max(bh / img.height, bw / img.width)
    img = img.resize((max(bw, round(img.width * scale)), max(bh, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - bw) // 2, (img.height - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
    return arr.permute(2, 0, 1), original, (top, left)


def latent_step(backbone) -> int:
    """The pixel multiple a bucket side must be: VAE factor x the UNet's downsampling."""
    vae = 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    unet = 2 ** (len(backbone.unet.config.down_block_types) - 1)
    return vae * unet


def caption_items(folder: Path, max_bytes: int) -> list[dict]:
    """metadata.jsonl-like items from ``<image>.txt`` files beside images; images without a
    caption file are left out. ValueError when a caption is larger than ``max_bytes``."""
    items = []
    for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            continue
        if txt.stat().st_size > max_bytes:
            raise ValueError(f"{folder.name}/{txt.name}: caption over {max_bytes:,} bytes")
        items.append({"file_name": img.name,
                      "text": txt.read_text(encoding="utf-8", errors="replace").strip()})
    return items


def has_caption_files(folder: Path) -> bool:
    """True for a folder holding at least one image with a ``.txt`` caption beside it."""
    if not folder.is_dir():
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()
               for p in folder.iterdir())
