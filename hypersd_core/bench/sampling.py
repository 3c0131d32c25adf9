"""Sampling benchmarks: latency per method and step count, ``generate`` against a stock
diffusers call, adapter switching, and throughput against batch size."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from hypersd_core.bench.measure import BenchPlan, _adapter_arg, measure, summarise, time_call


def bench_sampling(sampler, plan: BenchPlan, adapters: dict, prompts: list[str],
                   device: torch.device, log=print) -> list[dict]:
    """Latency per (method, steps) at batch 1 and ``big_batch``, with teacher speed-ups."""
    jobs = [("teacher", plan.teacher_steps)] + [(m, s) for m in plan.methods for s in plan.steps]
    rows = []
    for method, steps in jobs:
        adapter = _adapter_arg(adapters, method, steps)
        row: dict = {"method": method, "steps": steps,
                     "adapter": None if adapter is None else Path(adapter).name}
        for batch in (1, plan.big_batch):
            ps, seeds = prompts[:batch], list(range(batch))
            stats = measure(lambda: sampler.generate(method, steps, ps, seeds, adapter=adapter),  # noqa: B023
                            device, plan.repeats, plan.warmup)
            row[f"b{batch}"] = {**stats, "images_per_s": batch / stats["median_s"],
                                "ms_per_image": 1000 * stats["median_s"] / batch}
        log(f"  {method:>16} {steps:>2} steps: {1000 * row['b1']['median_s']:8.2f} ms (batch 1)  "
            f"{row[f'b{plan.big_batch}']['images_per_s']:8.1f} img/s (batch {plan.big_batch})")
        rows.append(row)
    teacher = rows[0]
    for row in rows:
        for b in (1, plan.big_batch):
            row[f"b{b}"]["speedup_vs_teacher"] = teacher[f"b{b}"]["median_s"] / row[f"b{b}"]["median_s"]
    return rows


def _stock_pipeline(backbone):
    """A second, stock diffusers pipeline from the same folder (same weights)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if backbone.kind == "sdxl" else StableDiffusionPipeline
    extra = {} if backbone.kind == "sdxl" else {"safety_checker": None,
                                                "requires_safety_checker": False}
    pipe = cls.from_pretrained(backbone.source, torch_dtype=backbone.dtype, **extra)
    pipe.to(backbone.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _overhead_calls(sampler, stock, method: str, steps: int, adapter: str | None,
                    guidance: float, extra: dict, prompt: str):
    """The three timed calls: our generate, the stock pipeline, our pipeline called directly."""
    backbone = sampler.backbone

    def ours():
        return sampler.generate(method, steps, [prompt], [0], adapter=adapter).images[0]

    def theirs():
        return stock(prompt=[prompt], num_inference_steps=steps, guidance_scale=guidance,
                     generator=[torch.Generator().manual_seed(0)], **extra).images[0]

    def same_pipe():  # isolates generate's own wrapper from the pipeline's cost
        pipe = backbone.pipe
        pipe.scheduler = sampler.scheduler(method)
        try:
            return pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=guidance,
                        generator=[torch.Generator().manual_seed(0)], **extra).images[0]
        finally:
            pipe.scheduler = sampler.base_scheduler

    return ours, theirs, same_pipe


def bench_overhead(backbone, sampler, plan: BenchPlan, adapters: dict, prompt: str,
                   device: torch.device, log=print) -> list[dict]:
    """``Sampler.generate`` vs a stock pipeline call, interleaved (ABBA order) in one loop."""
    import diffusers
    import numpy as np

    from hypersd_core.models.lora import WEIGHT_NAME
    from hypersd_core.models.sampling import get_recipe

    stock = _stock_pipeline(backbone)
    rows = []
    for method, steps in plan.overhead_cases:
        recipe = get_recipe(method)
        adapter = _adapter_arg(adapters, method, steps)
        want = [] if adapter is None else [Path(adapter).name]
        loaded = stock.get_list_adapters().get("unet", [])
        if loaded != want:  # stock holds exactly the adapter in use, as a user's pipeline would
            if loaded:
                stock.unload_lora_weights()
            if adapter is not None:
                stock.load_lora_weights(adapter, weight_name=WEIGHT_NAME, adapter_name=want[0])
        stock.scheduler = getattr(diffusers, recipe.scheduler).from_config(
            stock.scheduler.config, **recipe.scheduler_kwargs)
        guidance = backbone.guidance_scale if recipe.cfg else 0.0
        extra = {"eta": recipe.eta} if recipe.eta is not None else {}

        ours, theirs, same_pipe = _overhead_calls(sampler, stock, method, steps, adapter,
                                                  guidance, extra, prompt)
        a, b = ours(), theirs()  # warm-up, and the outputs must agree
        same_pipe()
        diff = int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
        times: dict[str, list[float]] = {"generate": [], "stock": [], "same_pipe": []}
        calls = [("generate", ours), ("stock", theirs), ("same_pipe", same_pipe)]
        for i in range(plan.overhead_pairs):
            for key, fn in (calls if i % 2 == 0 else calls[::-1]):
                times[key].append(time_call(fn, device))
        stats = {k: summarise(v) for k, v in times.items()}
        ratio = stats["generate"]["median_s"] / stats["stock"]["median_s"]
        wrapper = stats["generate"]["median_s"] / stats["same_pipe"]["median_s"]
        rows.append({"method": method, "steps": steps, **stats, "ratio": ratio,
                     "wrapper_ratio": wrapper, "adapters_resident": len(sampler.adapters.loaded),
                     "max_pixel_diff": diff})
        log(f"  {method} {steps} steps: generate {1000 * stats['generate']['median_s']:.2f} ms, "
            f"stock {1000 * stats['stock']['median_s']:.2f} ms, ratio {ratio:.3f} "
            f"(same pipeline called directly: {wrapper:.3f}), max pixel diff {diff}")
    del stock
    return rows


def bench_switch(sampler, plan: BenchPlan, adapters: dict, one_step_s: float,
                 log=print) -> dict:
    """Switch latency between loaded adapters (and to the base model); load time from disk."""
    names = list(sampler.adapters.loaded)
    if len(names) < 2:
        return {"note": "fewer than two adapters loaded: nothing to switch between"}
    switches, to_base = [], []
    sampler.adapters.use(names[0])
    for i in range(plan.switch_repeats):
        switches.append(sampler.adapters.use(names[(i + 1) % len(names)]))
    for i in range(max(2, plan.switch_repeats // 2)):
        to_base.append(sampler.adapters.use(None if i % 2 == 0 else names[0]))
    loads = []
    probe = next(iter(adapters.values()))["path"]
    for i in range(3):
        t0 = time.perf_counter()
        sampler.adapters.load(f"probe{i}", probe)
        loads.append(time.perf_counter() - t0)
    for i in range(3):
        sampler.adapters.unload(f"probe{i}")
    out = {"adapters_loaded": len(names), "switch": summarise(switches),
           "switch_base": summarise(to_base), "load_from_disk": summarise(loads),
           "one_step_generation_s": one_step_s,
           "share_of_one_step": statistics.median(switches) / one_step_s}
    log(f"  switch {1000 * out['switch']['median_s']:.3f} ms between {len(names)} adapters = "
        f"{100 * out['share_of_one_step']:.2f}% of a 1-step generation; load from disk "
        f"{1000 * out['load_from_disk']['median_s']:.1f} ms")
    return out


def bench_sampling_scaling(sampler, plan: BenchPlan, adapters: dict, prompts: list[str],
                           device: torch.device, log=print) -> list[dict]:
    """Hyper-SD 1-step generation time against batch size."""
    adapter = _adapter_arg(adapters, "hypersd", 1)
    rows = []
    for batch in plan.sample_batches:
        ps = [prompts[i % len(prompts)] for i in range(batch)]
        stats = measure(lambda: sampler.generate("hypersd", 1, ps, list(range(batch)),  # noqa: B023
                                                 adapter=adapter),
                        device, plan.repeats, plan.warmup)
        rows.append({"batch": batch, **stats, "images_per_s": batch / stats["median_s"]})
        log(f"  sampling batch {batch:>3}: {batch / stats['median_s']:8.1f} img/s")
    return rows
