"""The cache-data pre-pass: encode every readable sample of a data source once with the
model's VAE and text encoder(s) into safetensors shards (format: training/cache.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from hypersd_core.training.batch import DataOptions, encode_batch
from hypersd_core.training.cache import DTYPES, FORMAT, MANIFEST, CachedData
from hypersd_core.training.data import make_data


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
