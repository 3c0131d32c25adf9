"""Training batches: image latents with their prompt embeddings.

``digits``: the digits world's training split (never the held-out digits), with masks
and labels for the perceptual loss. A folder: images plus ``metadata.jsonl`` lines
``{"file_name": ..., "text": ...}`` (the Hugging Face imagefolder layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hypersd_core.digits import world as digits
from hypersd_core.models.backbone import Backbone, PromptEmbeds


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, h, w], scaled
    embeds: PromptEmbeds
    uncond: PromptEmbeds
    prompts: list[str]
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    masks: torch.Tensor | None = None  # [B, H, W] bool (digits)
    labels: torch.Tensor | None = None  # [B] digit labels (digits)


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


class FolderData:
    """Images + captions from a folder with metadata.jsonl, resized to the model's size."""

    def __init__(self, backbone: Backbone, folder: str | Path):
        self.backbone = backbone
        self.folder = Path(folder)
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no metadata.jsonl (one JSON line per image: "
                '{"file_name": "0001.png", "text": "a caption"})')
        self.items = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        if not self.items:
            raise ValueError(f"{meta} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, item: dict) -> torch.Tensor:
        res = self.backbone.resolution
        img = Image.open(self.folder / item["file_name"]).convert("RGB")
        scale = res / min(img.size)
        img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        img = img.crop((left, top, left + res, top + res))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1)
        return arr.permute(2, 0, 1)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator).tolist()
        items = [self.items[i] for i in idx]
        prompts = [it["text"] for it in items]
        images = torch.stack([self._load(it) for it in items]).to(self.backbone.device)
        with torch.no_grad():
            latents = self.backbone.encode_images(images).float()
        return Batch(latents, self.backbone.encode_prompt(prompts),
                     self.backbone.encode_prompt(prompts, negative=True), prompts, images)


def make_data(backbone: Backbone, source: str):
    if source == "digits":
        if backbone.kind != "digits":
            raise ValueError("data='digits' needs the digits model; give a dataset folder "
                             f"for {backbone.kind}")
        return DigitsData(backbone)
    return FolderData(backbone, source)
