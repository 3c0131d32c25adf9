"""``bench --data``: samples/s of the training loader alone against the trainer's step rate.

For each source (the digits world; an image folder of JPEGs written for the bench), the
loader is timed alone (``Loader.next``: read, decode, resize in the workers, VAE and text
encode in the main process) with 0 and ``workers`` DataLoader workers, and one trainer step
of a stage (TSCD k=8 by default, the digits preset) is timed on a batch of that loader.
The loader keeps up when its samples/s exceed the step's; the ratio says by how much.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from hypersd_core.bench.measure import machine_header, summarise, time_call


def write_image_folder(folder: Path, n: int, size: int = 512) -> Path:
    """``n`` digits-world images upscaled to ``size``^2 JPEGs with metadata.jsonl."""
    from PIL import Image

    from hypersd_core.worlds import digits

    data = digits.DigitsDataset("train").tensors()
    prompts = [p for p, _, _ in digits.ALL_PROMPTS]
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        arr = ((data["images"][i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
        img = Image.fromarray(arr.astype("uint8")).resize((size, size), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)
        p = int(data["digits"][i]) * len(digits.COLOUR_NAMES) + int(data["colours"][i])
        lines.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": prompts[p]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def loader_rate(backbone, source: str, batch_size: int, workers: int, batches: int) -> dict:
    """Samples/s of ``Loader.next`` (the first batch, which starts the workers, is not timed)."""
    from hypersd_core.training.data import DataOptions, make_data
    from hypersd_core.training.loader import Loader

    loader = Loader(make_data(backbone, source, DataOptions()), batch_size, seed=0, workers=workers)
    loader.next()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    seconds = time.perf_counter() - t0
    loader.close()
    return {"workers": workers, "batches": batches, "seconds": seconds,
            "samples_per_s": batches * batch_size / seconds}


def bench_data(model: str = "digits", batch_size: int = 32, workers: int = 2, batches: int = 20,
               repeats: int = 5, stage: str = "tscd", images: int = 256, device: str = "cpu",
               out: str | Path | None = None, log=print) -> dict:
    """Loader samples/s (0 and ``workers`` workers) and the trainer's samples/s, per source."""
    from hypersd_core.bench.training import StepRunner
    from hypersd_core.training.data import DataOptions, make_data
    from hypersd_core.training.loader import Loader

    t0 = time.perf_counter()
    dev = torch.device(device)
    result: dict = {"header": machine_header(dev), "model": model, "batch": batch_size,
                    "stage": stage, "sources": {}}
    runner = StepRunner(model, stage, batch_size, device)
    with tempfile.TemporaryDirectory(prefix="hypersd-data-bench-") as scratch:
        sources = {"digits": "digits",
                   f"image folder ({images} JPEGs, 512^2)": str(write_image_folder(Path(scratch) / "f", images))}
        for name, source in sources.items():
            rows = [loader_rate(runner.backbone, source, batch_size, w, batches)
                    for w in sorted({0, workers})]
            batch = Loader(make_data(runner.backbone, source, DataOptions()), batch_size, 0,
                           workers=0).next()
            runner.stage_step(batch, 0)  # warm-up
            step = summarise([time_call(lambda: runner.stage_step(batch, 1), dev)  # noqa: B023
                              for _ in range(repeats)])
            train_rate = batch_size / step["median_s"]
            for r in rows:
                r["vs_training"] = r["samples_per_s"] / train_rate
            result["sources"][name] = {"loader": rows, "train_step": step,
                                       "train_samples_per_s": train_rate}
            best = max(rows, key=lambda r: r["samples_per_s"])
            log(f"  {name}: loader " + ", ".join(f"{r['samples_per_s']:.0f} samples/s ({r['workers']} workers)"
                                                for r in rows)
                + f"; {stage} training {train_rate:.0f} samples/s "
                f"({1000 * step['median_s']:.0f} ms/step): loader {best['vs_training']:.1f}x the trainer")
    result["seconds"] = time.perf_counter() - t0
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        log(f"wrote {out}")
    return result
