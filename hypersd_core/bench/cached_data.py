"""Training step time with cached latents against encoding every step.

``python -m hypersd_core.bench.cached_data [--model digits] [--stage tscd] [--batch-size 32]``
builds, in a scratch folder, a cache (``cache-data``) and an image folder of the same
digits images, then times one full training step (batch, stage loss, backward, update)
for each source, interleaved, median of ``--repeats`` rounds of ``--steps`` steps:

- ``images``: an image folder (decode + resize + VAE encode + text encoders every step,
  as any real data set is read);
- ``digits``: the digits split (VAE encode every step; its 80 prompt embeddings are
  computed once when it loads);
- ``cache``: latents and embeddings read from the safetensors shards.

Prints a table and the ratios; writes JSON with ``--out``. GPU: pass ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _image_folder(folder: Path, n: int) -> Path:
    """The first n digits training images as PNGs with their captions (metadata.jsonl)."""
    import numpy as np
    from PIL import Image

    from hypersd_core.worlds import digits

    data = digits.DigitsDataset("train").tensors()
    prompts = [p for p, _, _ in digits.ALL_PROMPTS]
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        arr = ((data["images"][i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:05d}.png")
        p = int(data["digits"][i]) * len(digits.COLOUR_NAMES) + int(data["colours"][i])
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": prompts[p]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def bench_cached_data(model: str = "digits", stage: str = "tscd", batch_size: int = 32,
                      samples: int = 2048, repeats: int = 5, steps: int = 5,
                      device: str = "cpu", scratch: str | Path | None = None, log=print) -> dict:
    from hypersd_core.bench.measure import machine_header, time_call
    from hypersd_core.bench.training import StepRunner
    from hypersd_core.training.cache_build import cache_data
    from hypersd_core.training.data import make_data

    scratch = Path(scratch or tempfile.mkdtemp(prefix="hypersd-cache-bench-"))
    dev = torch.device(device)
    header = machine_header(dev)
    images = _image_folder(scratch / "images", samples)
    t0 = time.perf_counter()
    manifest = cache_data(model, str(images), scratch / "cache", batch_size=64, device=device,
                          progress=False)
    cache_seconds = time.perf_counter() - t0
    runner = StepRunner(model, stage, batch_size, device)
    sources = {"images": make_data(runner.backbone, str(images)),
               "cache": make_data(runner.backbone, str(scratch / "cache"))}
    if runner.backbone.kind == "digits":
        sources["digits"] = make_data(runner.backbone, "digits")
    names = list(sources)
    g = torch.Generator().manual_seed(0)

    def step(name: str):
        runner.stage_step(sources[name].sample(batch_size, g))

    def data_only(name: str):
        sources[name].sample(batch_size, g)

    for name in names:  # warm-up
        step(name)
    per_step = {n: [] for n in names}
    per_batch = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]  # alternate which goes first
        for name in order:
            per_step[name].append(sum(time_call(lambda: step(name), dev)  # noqa: B023
                                      for _ in range(steps)) / steps)
            per_batch[name].append(sum(time_call(lambda: data_only(name), dev)  # noqa: B023
                                       for _ in range(steps)) / steps)
    rows = []
    cache_ms = statistics.median(per_step["cache"]) * 1000
    for name in names:
        ms = statistics.median(per_step[name]) * 1000
        rows.append({"source": name, "step_ms": round(ms, 2),
                     "batch_ms": round(statistics.median(per_batch[name]) * 1000, 2),
                     "step_ms_all": [round(t * 1000, 2) for t in per_step[name]],
                     "ratio_vs_cache": round(ms / cache_ms, 3),
                     # paired: each repeat's ratio (same moment, same load), then the median
                     "paired_ratio_median": round(statistics.median(
                         a / c for a, c in zip(per_step[name], per_step["cache"])), 3)})
    result = {"header": header, "model": model, "stage": stage, "batch_size": batch_size,
              "samples": samples, "repeats": repeats, "steps_per_repeat": steps,
              "cache_build_s": round(cache_seconds, 2), "cache_samples": manifest["num_samples"],
              "rows": rows, "loadavg_end": list(os.getloadavg())}
    log(f"{model} {stage}, batch {batch_size}, {device}; load average {header.get('loadavg')}")
    log(f"cache-data: {manifest['num_samples']} samples in {cache_seconds:.1f} s")
    log("| source | ms / step | batch alone, ms | step / cached step (medians) | paired per repeat |")
    log("|---|---|---|---|---|")
    for row in rows:
        log(f"| {row['source']} | {row['step_ms']:.1f} | {row['batch_ms']:.1f} | "
            f"{row['ratio_vs_cache']:.2f} | {row['paired_ratio_median']:.2f} |")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--stage", default="tscd")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=2048, help="images in the folder and the cache")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scratch", help="scratch folder (default: a new temp folder)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    result = bench_cached_data(args.model, args.stage, args.batch_size, args.samples, args.repeats,
                               args.steps, args.device, args.scratch)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
