"""Training batches of the scenes world: renders of its ``train`` split (never the reward,
evaluation-net, reference or evaluation scenes), with their captions."""

from __future__ import annotations

import torch

from hypersd_core.models.backbone import Backbone
from hypersd_core.training.batch import Batch, DataOptions, Sample
from hypersd_core.worlds import scenes

POOL = 8000  # scenes rendered once per run (uint8, 98 MB); batches draw from them


class ScenesData:
    """Random batches from the first ``pool`` scenes of the training split."""

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

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.batch(idx)

    @torch.no_grad()
    def batch(self, idx: torch.Tensor) -> Batch:
        device = self.backbone.device
        images = scenes.to_model(self.images[idx]).to(device)
        latents = self.backbone.encode_images(images).float()
        prompts = [self.prompts[i] for i in idx.tolist()]
        uncond = self.uncond.index(torch.zeros(len(idx), dtype=torch.long))
        return Batch(latents, self._embed(prompts), uncond, prompts, images, None, None)

    def __iter__(self):
        """Every pooled scene once (the cache pre-pass), this process's share."""
        rank, world = DataOptions().process()
        res = scenes.RESOLUTION
        for i in range(rank, len(self), world):
            yield Sample(scenes.to_model(self.images[i]), self.prompts[i], (res, res), (0, 0), {})
