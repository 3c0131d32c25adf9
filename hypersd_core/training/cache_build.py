"""The cache-data pre-pass: encode every readable sample of a data source once with the
model's VAE and text encoder(s) into safetensors shards (format: training/cache.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from hypersd_core.training.batch import DataOptions, encode_batch
from hypersd_core.training.cache import DTYPES, FORMAT, MANIFEST, CachedData
from hypersd_core.training.data import make_data


def _write_shard(out: Path, index: int, rows: dict[str, list[torch.Tensor]], captions: list[str],
                 dtype: torch.dtype, prefix: str = "") -> dict:
    from safetensors.torch import save_file

    name = f"{prefix}shard-{index:05d}.safetensors"
    tensors = {}
    for key, parts in rows.items():
        t = torch.cat(parts).cpu()
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    save_file(tensors, str(out / name), metadata={"captions": json.dumps(captions)})
    return {"file": name, "count": len(captions)}


def _encode_share(model: str, data: str, out: Path, part: int, parts: int, batch_size: int,
                  shard_size: int, max_samples: int | None, dtype: str, device: str,
                  options: DataOptions | None, progress: bool) -> dict:
    """Encode share ``part`` of ``parts`` of ``data`` into ``out``; its shards and counts."""
    from tqdm.auto import tqdm

    from hypersd_core.models.backbone import load_backbone

    backbone = load_backbone(model, device=device)
    opts = dataclasses.replace(options or DataOptions(), rank=part, world_size=parts)
    source = make_data(backbone, data, opts)
    if isinstance(source, CachedData):
        raise ValueError(f"{data} is already a cache")
    if not hasattr(source, "__iter__"):
        raise ValueError(f"data {data!r} cannot be read in order for caching")
    st_dtype = DTYPES[dtype]
    try:
        total = -(-len(source) // (1 if getattr(source, "rows", None) is not None else parts))
    except TypeError:
        total = None
    if max_samples:
        total = min(total, max_samples) if total else max_samples
    bar = tqdm(total=total, desc=f"cache-data {part + 1}/{parts}" if parts > 1 else "cache-data",
               unit="img", disable=not progress, dynamic_ncols=True, position=part)
    prefix = f"part{part:03d}-" if parts > 1 else ""
    shards, rows, captions, pending = [], {}, [], []
    count = 0

    def flush_batch():
        nonlocal count
        batch = encode_batch(backbone, torch.stack([s.image for s in pending]),
                             [s.caption for s in pending], [s.original for s in pending],
                             [s.crop for s in pending])
        tensors = {"latents": batch.latents, "hidden": batch.embeds.hidden}
        if batch.embeds.pooled is not None:
            tensors.update(pooled=batch.embeds.pooled, time_ids=batch.embeds.time_ids)
        for key in pending[0].extras:
            tensors[key] = torch.stack([s.extras[key] for s in pending])
        for key, value in tensors.items():
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
                    shards.append(_write_shard(out, len(shards), rows, captions, st_dtype, prefix))
                    rows, captions = {}, []
                if max_samples and count >= max_samples:
                    break
        if pending:
            flush_batch()
        if captions:
            shards.append(_write_shard(out, len(shards), rows, captions, st_dtype, prefix))
    bar.close()
    result = {"shards": shards, "count": count, "skipped": int(getattr(source, "skipped", 0)),
              "kind": backbone.kind, "resolution": backbone.resolution}
    if part == 0:
        from safetensors.torch import save_file

        uncond = backbone.encode_prompt([""], negative=True)
        u = {"hidden": uncond.hidden.cpu().to(st_dtype).contiguous()}
        if uncond.pooled is not None:
            u["pooled"] = uncond.pooled.cpu().to(st_dtype).contiguous()
        save_file(u, str(out / "uncond.safetensors"))
    return result


def _share_job(kwargs: dict) -> dict:
    torch.set_num_threads(kwargs.pop("threads"))
    return _encode_share(**kwargs)


def cache_data(model: str, data: str, out: str | Path, batch_size: int = 32,
               shard_size: int = 4096, max_samples: int | None = None, dtype: str = "fp16",
               device: str = "cpu", options: DataOptions | None = None,
               progress: bool = True, processes: int = 1) -> dict:
    """Encode ``data`` with ``model``'s VAE and text encoder(s) into a cache folder; returns
    the manifest (also written to ``out/cache.json``, last).

    ``processes > 1`` splits the source as a multi-process training run would (rows, or an
    even share of shards) and encodes the shares in parallel processes, each with its own
    model copy (on CUDA, process i uses GPU ``i % device_count``); ``max_samples`` is split
    between them.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a cache ({MANIFEST}); choose another --out")
    if batch_size < 1 or shard_size < 1 or processes < 1:
        raise ValueError("batch_size, shard_size and processes must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = []
    for part in range(processes):
        dev = device
        if device.startswith("cuda") and processes > 1 and torch.cuda.device_count() > 1:
            dev = f"cuda:{part % torch.cuda.device_count()}"
        limit = None if not max_samples else max_samples // processes + (part < max_samples % processes)
        jobs.append({"model": model, "data": data, "out": out, "part": part, "parts": processes,
                     "batch_size": batch_size, "shard_size": shard_size, "max_samples": limit,
                     "dtype": dtype, "device": dev, "options": options, "progress": progress})
    if processes == 1:
        results = [_encode_share(**jobs[0])]
    else:
        import multiprocessing as mp

        threads = max(1, torch.get_num_threads() // processes)
        with mp.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_share_job, [{**j, "threads": threads} for j in jobs])
    count = sum(r["count"] for r in results)
    if not count:
        raise ValueError(f"{data}: no readable samples to cache "
                         f"({sum(r['skipped'] for r in results)} skipped)")
    shards = [s for r in results for s in r["shards"]]
    manifest = {
        "format": FORMAT, "model": str(model), "kind": results[0]["kind"], "data": str(data),
        "resolution": results[0]["resolution"], "latent_shape": list(rows_shape(out, shards)),
        "dtype": dtype, "num_samples": count, "skipped": sum(r["skipped"] for r in results),
        "seconds": round(time.perf_counter() - t0, 2), "processes": processes, "shards": shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def rows_shape(out: Path, shards: list[dict]) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
        return list(f.get_slice("latents").get_shape()[1:])
