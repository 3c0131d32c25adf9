"""``bench --vs-diffusers``: one training step of our LCM stage against diffusers' LCM-LoRA
distillation example (bench/peer_lcm.py), on the same model and the same batch.

Both start from the same pixels and captions and do everything a step does: text
encoder, VAE encode, the stage's UNet passes, backward, clip, AdamW. They are timed
interleaved (the order alternates every repeat) so machine load hits both alike; the
figure is the median. TSCD (with and without the adversarial term) and DMD (a generator
step) steps of ours are timed on the same batch beside them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hypersd_core.bench.measure import machine_header, summarise, time_call


def _pixels(backbone, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    from hypersd_core.bench.measure import bench_prompts

    g = torch.Generator().manual_seed(seed)
    res = backbone.resolution
    return torch.rand(batch_size, 3, res, res, generator=g) * 2 - 1, bench_prompts("digits", batch_size)


def bench_vs_diffusers(model: str = "random:sd15-tiny", batch_size: int = 4, repeats: int = 7,
                       warmup: int = 2, device: str = "cpu", others: tuple[str, ...] = ("tscd", "tscd+adv", "dmd"),
                       out: str | Path | None = None, log=print) -> dict:
    """Median step seconds of ours (LCM) and the diffusers example; ratio; other stages.

    Args:
        model: a model both load (``random:sd15-tiny`` on the CPU, ``random:sd15`` on a GPU).
        batch_size: samples per step (the same batch for every side).
        repeats: timed steps per side (after ``warmup`` untimed ones).
        others: our other stage types timed on the same batch.
        out: a JSON path (optional).
    """
    from hypersd_core.bench.peer_lcm import DiffusersLCMStep
    from hypersd_core.bench.training import StepRunner
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training.batch import encode_batch

    t0 = time.perf_counter()
    dev = torch.device(device)
    ours = StepRunner(model, "lcm", batch_size, device)
    images, prompts = _pixels(ours.backbone, batch_size)
    peer = DiffusersLCMStep(load_backbone(model, device=device), ours.cfg.lora_rank,
                            ours.cfg.lora_alpha, batch_size)

    def our_step(i: int):
        ours.stage_step(encode_batch(ours.backbone, images, prompts), seed=i)

    def their_step(i: int):
        torch.manual_seed(i)
        peer.step(images, prompts)

    for i in range(warmup):
        our_step(i)
        their_step(i)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for i in range(repeats):
        pair = [("ours", our_step), ("diffusers", their_step)]
        for name, fn in (pair if i % 2 == 0 else pair[::-1]):
            times[name].append(time_call(lambda: fn(100 + i), dev))  # noqa: B023
    result = {"header": machine_header(dev), "model": model, "batch": batch_size,
              "lora_rank": ours.cfg.lora_rank, "ours_lcm": summarise(times["ours"]),
              "diffusers_lcm": summarise(times["diffusers"])}
    result["ratio"] = result["ours_lcm"]["median_s"] / result["diffusers_lcm"]["median_s"]
    result["ok"] = result["ratio"] <= 1.0
    log(f"  LCM step, batch {batch_size} on {model}: ours {1000 * result['ours_lcm']['median_s']:.1f} ms, "
        f"diffusers example {1000 * result['diffusers_lcm']['median_s']:.1f} ms "
        f"= {result['ratio']:.2f}x (target <= 1.0)")
    result["others"] = {}
    for stage in others:
        runner = StepRunner(model, stage, batch_size, device)

        def step(i: int, runner=runner):
            runner.stage_step(encode_batch(runner.backbone, images, prompts), seed=i)

        for i in range(warmup):
            step(i)
        row = summarise([time_call(lambda: step(100 + i), dev) for i in range(repeats)])  # noqa: B023
        row["vs_our_lcm"] = row["median_s"] / result["ours_lcm"]["median_s"]
        result["others"][stage] = row
        log(f"  {stage:>9} step: {1000 * row['median_s']:.1f} ms = {row['vs_our_lcm']:.2f}x our LCM step")
        del runner
    result["seconds"] = time.perf_counter() - t0
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        log(f"wrote {out}")
    return result
