"""Cached latents and prompt embeddings: encode a data set once, train from the cache.

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
import os
import time
from pathlib import Path

import torch

from hypersd_core.models.backbone import Backbone, PromptEmbeds
from hypersd_core.training.data import Batch, DataOptions, encode_batch

MANIFEST = "cache.json"
FORMAT = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _write_shard(out: Path, index: int, rows: dict[str, list[torch.Tensor]], captions: list[str],
                 dtype: torch.dtype) -> dict:
    from safetensors.torch import save_file

    name = f"shard-{index:05d}.safetensors"
    tensors = {}
    for key, parts in rows.items():
        t = torch.cat(parts).cpu()
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    save_file(tensors, str(out / name), metadata={"captions": json.dumps(captions)})
    return {"file": name, "count": len(captions)}


def cache_data(model: str, data: str, out: str | Path, batch_size: int = 32,
               shard_size: int = 4096, max_samples: int | None = None, dtype: str = "fp16",
               device: str = "cpu", options: DataOptions | None = None,
               progress: bool = True) -> dict:
    """Encode ``data`` with ``model``'s VAE and text encoder(s) into a cache folder; returns
    the manifest (also written to ``out/cache.json``)."""
    from tqdm.auto import tqdm

    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.data import make_data

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a cache ({MANIFEST}); choose another --out")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    backbone = load_backbone(model, device=device)
    opts = options or DataOptions()
    opts.rank, opts.world_size = 0, 1  # one process encodes everything
    source = make_data(backbone, data, opts)
    if isinstance(source, CachedData):
        raise ValueError(f"{data} is already a cache")
    if not hasattr(source, "__iter__"):
        raise ValueError(f"data {data!r} cannot be read in order for caching")
    out.mkdir(parents=True, exist_ok=True)
    st_dtype = DTYPES[dtype]
    try:
        total = len(source)
    except TypeError:
        total = None
    if max_samples:
        total = min(total, max_samples) if total else max_samples
    bar = tqdm(total=total, desc="cache-data", unit="img", disable=not progress, dynamic_ncols=True)
    shards, rows, captions, pending = [], {}, [], []
    count, t0 = 0, time.perf_counter()

    def flush_batch():
        nonlocal count
        batch = encode_batch(backbone, torch.stack([s.image for s in pending]),
                             [s.caption for s in pending], [s.original for s in pending],
                             [s.crop for s in pending])
        parts = {"latents": batch.latents, "hidden": batch.embeds.hidden}
        if batch.embeds.pooled is not None:
            parts.update(pooled=batch.embeds.pooled, time_ids=batch.embeds.time_ids)
        for key in pending[0].extras:
            parts[key] = torch.stack([s.extras[key] for s in pending])
        for key, value in parts.items():
            rows.setdefault(key, []).append(value.detach().cpu())
        captions.extend(batch.prompts)
        count += len(pending)
        bar.update(len(pending))
        pending.clear()

    with torch.no_grad():
        for sample in source:
            pending.append(sample)
            if len(pending) == batch_size or (max_samples and count + len(pending) >= max_samples):
                flush_batch()
                if len(captions) >= shard_size:
                    shards.append(_write_shard(out, len(shards), rows, captions, st_dtype))
                    rows, captions = {}, []
                if max_samples and count >= max_samples:
                    break
        if pending:
            flush_batch()
        if captions:
            shards.append(_write_shard(out, len(shards), rows, captions, st_dtype))
        bar.close()
        if not count:
            raise ValueError(f"{data}: no readable samples to cache ({getattr(source, 'skipped', 0)} skipped)")
        from safetensors.torch import save_file

        uncond = backbone.encode_prompt([""], negative=True)
        u = {"hidden": uncond.hidden.cpu().to(st_dtype).contiguous()}
        if uncond.pooled is not None:
            u["pooled"] = uncond.pooled.cpu().to(st_dtype).contiguous()
        save_file(u, str(out / "uncond.safetensors"))
    manifest = {
        "format": FORMAT, "model": str(model), "kind": backbone.kind, "data": str(data),
        "resolution": backbone.resolution, "latent_shape": list(rows_shape(out, shards)),
        "dtype": dtype, "num_samples": count, "skipped": int(getattr(source, "skipped", 0)),
        "seconds": round(time.perf_counter() - t0, 2), "shards": shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def rows_shape(out: Path, shards: list[dict]) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
        return list(f.get_slice("latents").get_shape()[1:])


class CachedData:
    """Training batches read from a cache folder: latents and embeddings, no encoding."""

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

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        pick = torch.randint(0, len(self.rows), (batch_size,), generator=generator)
        t, captions = self.rows_at(self.rows[pick].tolist())
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

