"""Training batches of the scenes world: renders of its ``train`` split (never the reward,
evaluation-net, reference or evaluation scenes), with their captions."""

from __future__ import annotations

import torch

from hypersd_core.models.backbone import Backbone
from hypersd_core.training.batch import Batch, DataOptions, Sample
from hypersd_core.training.loader import MapSource, collate
from hypersd_core.worlds import scenes

POOL = 8000  # scenes rendered once per run (uint8, 98 MB); batches draw from them


class ScenesData(MapSource):
    """Random batches from the first ``pool`` scenes of the training split (in memory)."""

    in_memory = True

    def __init__(self, backbone: Backbone, pool: int = POOL):
        if backbone.kind != "scenes":
            raise ValueError("data='scenes' needs the scenes model; give a dataset folder "
                             f"for {backbone.kind}")
        self.backbone = backbone
        self.items = scenes.scenes("train", pool)
        self.images = scenes.render_many(self.items)
        self.prompts = [s.prompt for s in self.items]
        self._embeds: dict[str, object] = {}
        self.uncond = backbone.encode_prompt([""], negative=True)

    def __len__(self) -> int:
        return len(self.items)

    def _embed(self, prompts: list[str]):
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeds))
        if missing:
            e = self.backbone.encode_prompt(missing)
            for i, p in enumerate(missing):
                self._embeds[p] = e.index(slice(i, i + 1))
        parts = [self._embeds[p] for p in prompts]
        out = parts[0]
        for p in parts[1:]:
            out = out.cat(p)
        return out

    def item(self, i: int) -> Sample:
        res = scenes.RESOLUTION
        return Sample(self.images[i], self.prompts[i], (res, res), (0, 0), {})  # uint8 render

    @torch.no_grad()
    def to_batch(self, raw: dict) -> Batch:
        device = self.backbone.device
        images = scenes.to_model(raw["images"]).to(device)
        latents = self.backbone.encode_images(images).float()
        prompts = list(raw["captions"])
        uncond = self.uncond.index(torch.zeros(len(prompts), dtype=torch.long))
        return Batch(latents, self._embed(prompts), uncond, prompts, images, None, None)

    def batch(self, idx: torch.Tensor) -> Batch:
        """The batch of pool indices ``idx``."""
        return self.to_batch(collate([self.item(int(i)) for i in idx]))

    def __iter__(self):
        """Every pooled scene once (the cache pre-pass), this process's share."""
        rank, world = DataOptions().process()
        res = scenes.RESOLUTION
        for i in range(rank, len(self), world):
            yield Sample(scenes.to_model(self.images[i]), self.prompts[i], (res, res), (0, 0), {})
