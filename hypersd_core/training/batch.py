"""Training batch types and image preparation, shared by every data source
(training/data.py picks the source; datasets.py and cache.py read the large ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from hypersd_core.models.backbone import Backbone, PromptEmbeds

# Caps on one decoded training member: anything larger is a bad sample (skipped, counted),
# never read into memory. LAION-style shards hold images of a few hundred KB and captions
# of a few hundred bytes; CLIP reads 77 tokens.
MAX_IMAGE_BYTES = 32 * 2**20  # an encoded image file / cell
MAX_IMAGE_PIXELS = 8192 * 8192  # checked from the header, before decoding
MAX_CAPTION_BYTES = 64 * 2**10  # a .txt caption, a caption cell, a metadata line
MAX_JSON_BYTES = 1 * 2**20  # a webdataset .json member (captions plus other fields)


class MemberTooLarge(ValueError):
    """A training member over its cap (a bad sample, never decoded)."""


def check_caption(text: str) -> str:
    """``text`` when it is within MAX_CAPTION_BYTES of UTF-8, else MemberTooLarge."""
    if len(text) > MAX_CAPTION_BYTES or len(text.encode("utf-8", "replace")) > MAX_CAPTION_BYTES:
        raise MemberTooLarge(f"caption over {MAX_CAPTION_BYTES:,} bytes")
    return text


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, h, w], scaled
    embeds: PromptEmbeds
    uncond: PromptEmbeds
    prompts: list[str]
    images: torch.Tensor | None  # [B, 3, H, W] in [-1, 1]; None when read from a latent cache
    masks: torch.Tensor | None = None  # [B, H, W] bool (digits)
    labels: torch.Tensor | None = None  # [B] digit labels (digits)


class Sample(NamedTuple):
    """One prepared training example, as sources yield them to the cache pre-pass."""

    image: torch.Tensor  # [3, res, res] in [-1, 1]
    caption: str
    original: tuple[int, int]  # (h, w) before resize (SDXL conditioning)
    crop: tuple[int, int]  # (top, left) of the center crop
    extras: dict  # per-sample tensors a stage may need (digits: masks, labels)


@dataclass
class DataOptions:
    """How a ``datasets`` dataset or webdataset shards are read (StageConfig data_* fields)."""

    image_column: str = "image"  # datasets column / webdataset extension ("image": jpg/png/webp)
    caption_column: str = "text"  # datasets column / .json key; webdataset also reads .txt
    split: str = "train"
    streaming: bool = False  # datasets: stream instead of download/memory-map (large sets)
    shuffle_buffer: int = 1000  # streamed sources: encoded samples held for shuffling
    shuffle_buffer_mb: float = 256.0  # ... and at most this many MB of them (per process)
    workers: int = -1  # DataLoader worker processes; -1: auto (training/loader.py)
    prefetch: int = 2  # batches each worker prepares ahead
    buckets: bool = False  # image folders: aspect-ratio buckets instead of square crops
    rank: int | None = None  # process index / count; default from RANK / WORLD_SIZE
    world_size: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> DataOptions:
        return cls(**{k: getattr(cfg, f"data_{k}") for k in
                      ("image_column", "caption_column", "split", "streaming", "shuffle_buffer",
                       "buckets", "shuffle_buffer_mb", "workers", "prefetch")
                      if hasattr(cfg, f"data_{k}")})

    def process(self) -> tuple[int, int]:
        """(rank, world size) of this process: torchrun / accelerate set RANK and WORLD_SIZE."""
        import os

        rank = self.rank if self.rank is not None else int(os.environ.get("RANK", 0))
        world = self.world_size if self.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
        return rank, world


def prepare_image(img: Image.Image, res: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """RGB, shorter side resized to ``res``, center crop: ([3,res,res] in [-1,1],
    original (h, w), crop (top, left) in the resized image) - SDXL's size conditioning."""
    if img.width * img.height > MAX_IMAGE_PIXELS:  # the header's size: nothing decoded yet
        raise MemberTooLarge(f"image of {img.width} x {img.height} pixels; at most "
                             f"{MAX_IMAGE_PIXELS:,} are decoded")
    original = (img.height, img.width)
    if img.format == "JPEG":  # decode at the smallest DCT scale still >= res (a 4k JPEG: 1/8 the work)
        img.draft("RGB", (res, res))
    img = img.convert("RGB")
    scale = res / min(img.size)
    img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - res) // 2, (img.height - res) // 2
    img = img.crop((left, top, left + res, top + res))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
    return arr.permute(2, 0, 1), original, (top, left)


def sdxl_time_ids(originals: list[tuple[int, int]], crops: list[tuple[int, int]], res: int,
                  like: torch.Tensor, target: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, 6] SDXL add_time_ids: original (h, w), crop (top, left), target (h, w) (default
    (res, res); an aspect-ratio bucket's size when bucketing)."""
    th, tw = target or (res, res)
    rows = [[*o, *c, th, tw] for o, c in zip(originals, crops)]
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def encode_collated(backbone: Backbone, raw: dict, target: tuple[int, int] | None = None) -> Batch:
    """A batch from a loader's collated images and captions (training/loader.py)."""
    return encode_batch(backbone, raw["images"], raw["captions"], raw["originals"], raw["crops"],
                        target)


@torch.no_grad()
def unconditional(backbone: Backbone, n: int) -> PromptEmbeds:
    """The unconditional embedding repeated ``n`` times, encoded once per backbone (the
    text encoders are frozen in training): a step encodes only its own captions."""
    one = backbone.__dict__.get("_uncond_one")
    if one is None:
        one = backbone.__dict__["_uncond_one"] = backbone.encode_prompt([""], negative=True)
    return PromptEmbeds(*(None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))
                          for t in (one.hidden, one.pooled, one.time_ids)))


@torch.no_grad()
def encode_batch(backbone: Backbone, images: torch.Tensor, prompts: list[str],
                 originals: list[tuple[int, int]] | None = None,
                 crops: list[tuple[int, int]] | None = None,
                 target: tuple[int, int] | None = None) -> Batch:
    """Latents and prompt embeddings of prepared images (SDXL: per-image time ids; ``target``
    the images' (h, w) when they are not the model's square resolution)."""
    images = images.to(backbone.device, non_blocking=True)
    latents = backbone.encode_images(images).float()
    embeds = backbone.encode_prompt(prompts)
    uncond = unconditional(backbone, len(prompts))
    if embeds.time_ids is not None and originals is not None:
        ids = sdxl_time_ids(originals, crops, backbone.resolution, embeds.time_ids, target)
        embeds.time_ids, uncond.time_ids = ids, ids.clone()
    return Batch(latents, embeds, uncond, list(prompts), images)
