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
    encode_collated,
    prepare_image,
    sdxl_time_ids,
)
from hypersd_core.training.loader import Loader, MapSource, collate
from hypersd_core.worlds import digits


class DigitsData(MapSource):
    """The digits training split (all 8 colours), held in memory: nothing to decode."""

    in_memory = True

    def __init__(self, backbone: Backbone, options: DataOptions | None = None):
        self.backbone, self.options = backbone, options or DataOptions()
        self.data = digits.DigitsDataset("train").tensors()
        prompts = [p for p, _, _ in digits.ALL_PROMPTS]
        self.prompt_ids = self.data["digits"] * len(digits.COLOUR_NAMES) + self.data["colours"]
        self.prompts = prompts
        self.embeds = backbone.encode_prompt(prompts)
        self.uncond = backbone.encode_prompt(prompts[:1], negative=True)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def item(self, i: int) -> Sample:
        res = self.data["images"].shape[-1]
        p = int(self.prompt_ids[i])
        return Sample(self.data["images"][i], self.prompts[p], (res, res), (0, 0),
                      {"masks": self.data["masks"][i], "labels": self.data["digits"][i],
                       "prompt_ids": self.prompt_ids[i]})

    @torch.no_grad()
    def to_batch(self, raw: dict) -> Batch:
        device = self.backbone.device
        latents = self.backbone.encode_images(raw["images"].to(device, non_blocking=True)).float()
        p = raw["extras"]["prompt_ids"].to(device)
        uncond = self.uncond.index(torch.zeros(len(p), dtype=torch.long, device=device))
        return Batch(latents, self.embeds.index(p), uncond, list(raw["captions"]),
                     raw["images"].to(device), raw["extras"]["masks"].to(device),
                     raw["extras"]["labels"].to(device))

    def batch(self, idx: torch.Tensor) -> Batch:
        """The batch of training-split indices ``idx``."""
        return self.to_batch(collate([self.item(int(i)) for i in idx]))

    def __iter__(self):
        """Every training example once (the cache pre-pass), this process's share."""
        rank, world = self.options.process()
        for i in range(rank, len(self), world):
            s = self.item(i)
            yield s._replace(extras={k: v for k, v in s.extras.items() if k != "prompt_ids"})


class FolderData(MapSource):
    """Images + captions from a folder with metadata.jsonl, resized to the model's size.

    Every ``file_name`` must stay inside the folder once resolved; an unreadable, missing,
    outside or oversized image is skipped and counted in ``skipped`` (metrics: data_skipped).
    """

    def __init__(self, backbone: Backbone, folder: str | Path, options: DataOptions | None = None):
        from hypersd_core.training import buckets as B

        self.backbone, self.options = backbone, options or DataOptions()
        self.folder = Path(folder)
        self.root = self.folder.resolve()
        self.name = self.folder.name
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

    def item(self, i: int) -> Sample | None:
        """The prepared image ``i`` with its caption, or None when it does not read
        (unreadable, missing, outside the folder or over the size caps); fitted to its
        aspect-ratio bucket when bucketing, else the model's square resolution."""
        entry = self.items[i]
        bucket = self.bucket_of[i] if self.bucket_of is not None else None
        try:
            path = inside_folder(self.root, entry["file_name"])
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise MemberTooLarge(f"{entry['file_name']} is over {MAX_IMAGE_BYTES:,} bytes")
            with Image.open(path) as img:
                if bucket is not None:
                    from hypersd_core.training.buckets import fit_to_bucket

                    image, original, crop = fit_to_bucket(img, bucket)
                else:
                    image, original, crop = prepare_image(img, self.backbone.resolution)
            return Sample(image, entry["text"], original, crop, {})
        except (OSError, ValueError, KeyError, TypeError, Image.DecompressionBombError):
            return None

    def to_batch(self, raw: dict) -> Batch:
        # a bucketed batch shares one bucket: its images' (h, w) are SDXL's target size
        target = tuple(raw["images"].shape[-2:]) if self.bucket_of is not None else None
        return encode_collated(self.backbone, raw, target)

    def __iter__(self):
        """Every readable image once, in order (the cache pre-pass)."""
        rank, world = self.options.process()
        for i in range(rank, len(self), world):
            if (s := self.item(i)) is not None:
                yield s
            else:
                self.skipped += 1


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
        return DigitsData(backbone, options)
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


def make_loader(backbone: Backbone, cfg, device_type: str = "cpu") -> Loader:
    """The training loader of a stage config: its source, batch size, seed and data_* options."""
    options = DataOptions.from_config(cfg)
    return Loader(make_data(backbone, cfg.data, options), cfg.batch_size, cfg.seed, options,
                  device_type=device_type)
