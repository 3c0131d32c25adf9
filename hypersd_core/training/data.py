"""Training batches: image latents with their prompt embeddings.

``make_data(backbone, source, options)`` picks the source from ``source``:

- ``digits``: the digits world's training split (never the held-out digits), with masks
  and labels for the perceptual loss;
- a folder with ``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}`` (the Hugging
  Face imagefolder layout), or images with ``.txt`` captions beside them (kohya's layout);
  ``data_buckets: true`` trains on aspect-ratio buckets (training/buckets.py);
- a ``datasets`` dataset: a ``save_to_disk`` folder, a ``.parquet`` / ``.arrow`` file or
  glob, or ``hf:owner/name`` (a hub id) - see training/datasets.py;
- webdataset shards: a ``.tar`` file, a glob or a ``{000..099}`` range - training/datasets.py;
- a cache folder written by ``cache-data`` (``cache.json``): VAE latents and prompt
  embeddings read from safetensors shards, nothing encoded per step - training/cache.py.

Images are resized (shorter side) and center-cropped to the model's resolution; SDXL gets
each image's original size and crop offset in its ``add_time_ids``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from hypersd_core.models.backbone import Backbone
from hypersd_core.training.batch import (  # noqa: F401  (re-exported: Batch, DataOptions, ...)
    MAX_CAPTION_BYTES,
    MAX_IMAGE_BYTES,
    Batch,
    DataOptions,
    MemberTooLarge,
    Sample,
    encode_batch,
    prepare_image,
    sdxl_time_ids,
)
from hypersd_core.worlds import digits


class DigitsData:
    """Random batches from the digits training split (all 8 colours)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.data = digits.DigitsDataset("train").tensors()
        prompts = [p for p, _, _ in digits.ALL_PROMPTS]
        self.prompt_ids = self.data["digits"] * len(digits.COLOUR_NAMES) + self.data["colours"]
        self.prompts = prompts
        self.embeds = backbone.encode_prompt(prompts)
        self.uncond = backbone.encode_prompt(prompts[:1], negative=True)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.batch(idx)

    @torch.no_grad()
    def batch(self, idx: torch.Tensor) -> Batch:
        device = self.backbone.device
        images = self.data["images"][idx].to(device)
        latents = self.backbone.encode_images(images).float()
        p = self.prompt_ids[idx]
        uncond = self.uncond.index(torch.zeros(len(idx), dtype=torch.long))
        return Batch(latents, self.embeds.index(p.to(device)), uncond,
                     [self.prompts[i] for i in p.tolist()], images,
                     self.data["masks"][idx].to(device), self.data["digits"][idx].to(device))

    def __iter__(self):
        """Every training example once (the cache pre-pass), this process's share."""
        rank, world = DataOptions().process()
        res = self.data["images"].shape[-1]
        for i in range(rank, len(self), world):
            p = int(self.prompt_ids[i])
            yield Sample(self.data["images"][i], self.prompts[p], (res, res), (0, 0),
                         {"masks": self.data["masks"][i], "labels": self.data["digits"][i]})


class FolderData:
    """Images + captions from a folder with metadata.jsonl, resized to the model's size.

    Every ``file_name`` must stay inside the folder once resolved; an unreadable, missing,
    outside or oversized image is skipped and counted in ``skipped`` (metrics: data_skipped).
    """

    def __init__(self, backbone: Backbone, folder: str | Path, options: DataOptions | None = None):
        from hypersd_core.training import buckets as B

        self.backbone = backbone
        self.folder = Path(folder)
        self.root = self.folder.resolve()
        self.skipped = 0  # unreadable images, counted (metrics: data_skipped)
        meta = self.folder / "metadata.jsonl"
        if meta.is_file():
            self.items = read_metadata(meta)
        elif B.has_caption_files(self.folder):
            self.items = B.caption_items(self.folder, MAX_CAPTION_BYTES)
        else:
            raise FileNotFoundError(
                f"{self.folder.name} has no metadata.jsonl (one JSON line per image: "
                '{"file_name": "0001.png", "text": "a caption"}) and no .txt captions '
                "beside its images")
        if not self.items:
            raise ValueError(f"{self.folder.name}/metadata.jsonl lists no images")
        self.bucket_of: list[tuple[int, int]] | None = None  # per item, when bucketing
        if options is not None and options.buckets:
            sizes = B.bucket_sizes(backbone.resolution, B.latent_step(backbone))
            self.bucket_of = [B.nearest_bucket(*self._size(item), sizes) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _size(self, item: dict) -> tuple[int, int]:
        """(h, w) from the image's header (1, 1 when unreadable: skipped when loaded)."""
        try:
            with Image.open(inside_folder(self.root, item["file_name"])) as img:
                return img.height, img.width
        except (OSError, ValueError, KeyError, TypeError, Image.DecompressionBombError):
            return 1, 1

    def _load(self, item: dict, bucket: tuple[int, int] | None = None):
        """(image, original size, crop) or None for an unreadable image; fitted to
        ``bucket`` (h, w) when given, else the model's square resolution."""
        try:
            path = inside_folder(self.root, item["file_name"])
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise MemberTooLarge(f"{item['file_name']} is over {MAX_IMAGE_BYTES:,} bytes")
            with Image.open(path) as img:
                if bucket is not None:
                    from hypersd_core.training.buckets import fit_to_bucket

                    return fit_to_bucket(img, bucket)
                return prepare_image(img, self.backbone.resolution)
        except (OSError, ValueError, KeyError, TypeError, Image.DecompressionBombError):
            self.skipped += 1
            return None

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        got = []
        pool, bucket = list(range(len(self))), None
        if self.bucket_of is not None:  # one bucket per batch: the bucket of a random image
            bucket = self.bucket_of[int(torch.randint(0, len(self), (1,), generator=generator))]
            pool = [i for i, b in enumerate(self.bucket_of) if b == bucket]
        for _ in range(100):
            picks = torch.randint(0, len(pool), (batch_size - len(got),), generator=generator)
            idx = [pool[i] for i in picks.tolist()]
            got += [(self.items[i]["text"], x) for i in idx
                    if (x := self._load(self.items[i], bucket))]
            if len(got) == batch_size:
                break
        else:
            raise ValueError(f"{self.folder.name}: no readable images in {self.skipped} tries")
        return encode_batch(self.backbone, torch.stack([x[0] for _, x in got]),
                            [p for p, _ in got], [x[1] for _, x in got], [x[2] for _, x in got],
                            target=bucket)

    def __iter__(self):
        """Every readable image once, in order (the cache pre-pass): (image, caption, size, crop)."""
        rank, world = DataOptions().process()
        for item in self.items[rank::world]:
            if (x := self._load(item)) is not None:
                yield Sample(x[0], item["text"], x[1], x[2], {})


def inside_folder(root: Path, name) -> Path:
    """``root / name`` resolved; ValueError unless it stays inside ``root`` (no ``..``,
    no absolute path, no symlink out)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file_name must be a non-empty string, got {name!r}")
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"file_name {name!r} points outside the data folder")
    return path


def read_metadata(meta: Path) -> list[dict]:
    """The lines of a metadata.jsonl; a malformed line is one error naming the file and line."""
    items = []
    where = f"{meta.parent.name}/{meta.name}"
    with open(meta, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if len(line) > MAX_CAPTION_BYTES + 1024:
                raise ValueError(f"{where} line {number}: over {MAX_CAPTION_BYTES:,} bytes")
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("file_name"), str) \
                    or not isinstance(item.get("text"), str):
                raise ValueError(f"{where} line {number}: expected "
                                 '{"file_name": "...", "text": "..."}')
            items.append(item)
    return items


def make_data(backbone: Backbone, source: str, options: DataOptions | None = None):
    """The training source named by ``source`` (see the module docstring)."""
    options = options or DataOptions()
    if source == "digits":
        if backbone.kind != "digits":
            raise ValueError("data='digits' needs the digits model; give a dataset folder "
                             f"for {backbone.kind}")
        return DigitsData(backbone)
    if source == "scenes":
        from hypersd_core.training.scenes_data import ScenesData

        return ScenesData(backbone)
    from hypersd_core.training import cache, datasets

    path = Path(source).expanduser()
    if (path / cache.MANIFEST).is_file():
        return cache.CachedData(backbone, path, options)
    from hypersd_core.training.buckets import has_caption_files

    if (path / "metadata.jsonl").is_file() or has_caption_files(path):
        return FolderData(backbone, path, options)
    if options.buckets:
        raise ValueError("data_buckets works with image folders (metadata.jsonl or .txt "
                         f"captions); {source!r} is not one")
    return datasets.open_source(backbone, source, options)
