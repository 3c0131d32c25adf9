"""Cached latents and prompt embeddings: encode a data set once, train from the cache
(this module reads a cache; training/cache_build.py writes one).

``python -m hypersd_core cache-data --model M --data D --out DIR`` runs the VAE and the
text encoder(s) over every readable sample of D once and writes ``DIR/shard-NNNNN.safetensors``
(``latents`` [n,4,h,w], ``hidden`` [n,L,D]; SDXL also ``pooled`` [n,D2] and ``time_ids``
[n,6] with each image's original size and crop; digits also ``masks`` and ``labels``;
the captions in the header), ``DIR/uncond.safetensors`` (the unconditional embedding) and
last ``DIR/cache.json`` (a folder without it is an unfinished cache). ``data: DIR`` then
trains from the cache: no VAE encode and no text encoder per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hypersd_core.models.backbone import Backbone, PromptEmbeds
from hypersd_core.training.batch import Batch, DataOptions, Sample
from hypersd_core.training.loader import MapSource

MANIFEST = "cache.json"
FORMAT = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class CachedData(MapSource):
    """Training batches read from a cache folder: latents and embeddings, no encoding."""

    in_memory = True  # nothing to decode: memory-mapped safetensors rows

    def __init__(self, backbone: Backbone, folder: str | Path, options: DataOptions | None = None):
        from safetensors.torch import load_file

        self.backbone, self.folder = backbone, Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        m = self.manifest
        if m.get("format") != FORMAT:
            raise ValueError(f"{folder}: cache format {m.get('format')} is not {FORMAT}; rebuild it")
        f = backbone.pipe.vae_scale_factor
        want = [backbone.unet.config.in_channels, backbone.resolution // f, backbone.resolution // f]
        if m["kind"] != backbone.kind or m["latent_shape"] != want:
            raise ValueError(
                f"{folder} was cached for a {m['kind']} model with latents {m['latent_shape']}; "
                f"this run's model is {backbone.kind} with latents {want}: rebuild the cache "
                "with this model (cache-data --model ...)")
        self.skipped = 0  # nothing is decoded here; the pre-pass's skips are in the manifest
        self.counts = [s["count"] for s in m["shards"]]
        self.offsets = torch.tensor([0] + self.counts).cumsum(0)
        rank, world = (options or DataOptions()).process()
        self.rows = torch.arange(rank, int(self.offsets[-1]), world)
        if len(self.rows) == 0:
            raise ValueError(f"{folder}: no cached samples for process {rank} of {world}")
        self._handles: dict[int, object] = {}
        self._captions: dict[int, list[str]] = {}
        uncond = load_file(str(self.folder / "uncond.safetensors"))
        self.uncond_hidden, self.uncond_pooled = uncond["hidden"], uncond.get("pooled")

    def __len__(self) -> int:
        return len(self.rows)

    def _shard(self, i: int):
        if i not in self._handles:
            from safetensors import safe_open

            handle = safe_open(str(self.folder / self.manifest["shards"][i]["file"]), framework="pt")
            self._handles[i] = handle
            self._captions[i] = json.loads(handle.metadata()["captions"])
        return self._handles[i]

    def rows_at(self, idx: list[int]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Cached tensors and captions of global sample indices."""
        parts: dict[str, list[torch.Tensor]] = {}
        captions = []
        for g in idx:
            s = int(torch.searchsorted(self.offsets, torch.tensor(g), right=True)) - 1
            r = g - int(self.offsets[s])
            handle = self._shard(s)
            for key in handle.keys():
                parts.setdefault(key, []).append(handle.get_slice(key)[r:r + 1])
            captions.append(self._captions[s][r])
        return {k: torch.cat(v) for k, v in parts.items()}, captions

    def item(self, i: int) -> Sample:
        t, captions = self.rows_at([int(self.rows[i])])
        return Sample(None, captions[0], (0, 0), (0, 0), {k: v[0] for k, v in t.items()})

    def to_batch(self, raw: dict) -> Batch:
        t, captions, batch_size = raw["extras"], list(raw["captions"]), len(raw["captions"])
        dev, dtype = self.backbone.device, self.backbone.dtype
        pooled = t["pooled"].to(dev, dtype) if "pooled" in t else None
        time_ids = t["time_ids"].to(dev, dtype) if "time_ids" in t else None
        embeds = PromptEmbeds(t["hidden"].to(dev, dtype), pooled, time_ids)
        b = batch_size
        uncond = PromptEmbeds(
            self.uncond_hidden.to(dev, dtype).expand(b, -1, -1),
            None if self.uncond_pooled is None else self.uncond_pooled.to(dev, dtype).expand(b, -1),
            None if time_ids is None else time_ids.clone())
        return Batch(t["latents"].to(dev).float(), embeds, uncond, captions, None,
                     t["masks"].to(dev) if "masks" in t else None,
                     t["labels"].to(dev) if "labels" in t else None)

