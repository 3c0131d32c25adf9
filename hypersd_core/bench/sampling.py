"""Sampling benchmarks: latency per method and step count, ``generate`` against stock
diffusers (unfused ``load_lora_weights`` and ``fuse_lora``), adapter switching, and
throughput against batch size. The fixed-cost breakdown and the compare grid are in
``bench/costs.py``."""

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
    pipe = cls.from_pretrained(backbone.source, dtype=backbone.dtype, **extra)
    pipe.to(backbone.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StockPair:
    """Two stock pipelines as users run them: ``load_lora_weights`` (unfused) and the same
    followed by ``fuse_lora``. Each holds only the adapter in use; the fused one gets its
    base weights back from a kept copy on a change (stock ``unfuse_lora`` drifts)."""

    def __init__(self, unfused, fused):
        self.unfused, self.fused = unfused, fused
        self._base: dict | None = None  # the fused pipeline's base UNet weights
        self.adapter: str | None = None

    def set_adapter(self, path: str | None) -> None:
        from hypersd_core.models.lora import WEIGHT_NAME

        if path == self.adapter:
            return
        if self.adapter is not None:
            self.unfused.unload_lora_weights()
            self.fused.unfuse_lora()
            self.fused.unload_lora_weights()
            self.fused.unet.load_state_dict(self._base)
        if path is not None:
            if self._base is None:
                self._base = {k: v.clone() for k, v in self.fused.unet.state_dict().items()}
            folder, name = (str(Path(path).parent), Path(path).name) if Path(path).is_file() \
                else (str(path), WEIGHT_NAME)
            for pipe in (self.unfused, self.fused):
                pipe.load_lora_weights(folder, weight_name=name, adapter_name="bench")
            self.fused.fuse_lora(lora_scale=1.0)
        self.adapter = path

    def set_scheduler(self, scheduler) -> None:
        """A fresh scheduler of the same class and config as ``scheduler`` (ours)."""
        for pipe in (self.unfused, self.fused):
            pipe.scheduler = type(scheduler).from_config(scheduler.config)


def _recipe_of(sampler, method: str, steps: int):
    """(scheduler, eta) that ``generate`` uses for (method, steps): the stock pipelines
    get the same, whatever the recipe table says about step counts."""
    from hypersd_core.models import sampling as S

    try:
        scheduler = sampler.scheduler(method, steps)
    except TypeError:  # schedulers that do not depend on the step count
        scheduler = sampler.scheduler(method)
    recipe = S.get_recipe(method)
    eta = S.recipe_eta(recipe, steps)
    return scheduler, eta


def _pixel_diff(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def compare_with_stock(sampler, stock: StockPair, cases, adapter_of, prompt: str, pairs: int,
                       device: torch.device, log=print) -> list[dict]:
    """Our ``generate`` against stock unfused and stock fused, per (method, steps) at batch 1:
    the three calls interleaved (ABC, CBA, ...) in one loop, medians, and the largest pixel
    difference of our image from each. ``adapter_of(method, steps)``: LoRA path or None."""
    from hypersd_core.models.sampling import get_recipe

    rows = []
    for method, steps in sorted(cases, key=lambda c: str(adapter_of(*c))):  # load each once
        recipe, adapter = get_recipe(method), adapter_of(method, steps)
        stock.set_adapter(adapter)
        scheduler, eta = _recipe_of(sampler, method, steps)
        stock.set_scheduler(scheduler)
        guidance = sampler.backbone.guidance_scale if recipe.cfg else 0.0
        extra = {"eta": eta} if eta is not None else {}
        if recipe.timesteps is not None:
            extra["timesteps"] = list(recipe.timesteps)
        else:
            extra["num_inference_steps"] = steps

        def ours():
            return sampler.generate(method, steps, [prompt], [0], adapter=adapter).images[0]  # noqa: B023

        def stock_call(pipe):
            return pipe(prompt=[prompt], guidance_scale=guidance,  # noqa: B023
                        generator=[torch.Generator().manual_seed(0)], **extra).images[0]  # noqa: B023

        calls = [("ours", ours), ("stock_unfused", lambda: stock_call(stock.unfused)),
                 ("stock_fused", lambda: stock_call(stock.fused))]
        images = {k: fn() for k, fn in calls}  # warm-up, and the images must agree
        times: dict[str, list[float]] = {k: [] for k, _ in calls}
        for i in range(pairs):
            for key, fn in (calls if i % 2 == 0 else calls[::-1]):
                times[key].append(time_call(fn, device))
        stats = {k: summarise(v) for k, v in times.items()}
        med = {k: v["median_s"] for k, v in stats.items()}
        row = {"method": method, "steps": steps,
               "adapter": None if adapter is None else Path(adapter).name, **stats,
               "ratio_vs_unfused": med["ours"] / med["stock_unfused"],
               "ratio_vs_fused": med["ours"] / med["stock_fused"],
               "max_pixel_diff_vs_unfused": _pixel_diff(images["ours"], images["stock_unfused"]),
               "max_pixel_diff_vs_fused": _pixel_diff(images["ours"], images["stock_fused"])}
        rows.append(row)
        log(f"  {method:>16} {steps:>2} steps: ours {1000 * med['ours']:7.2f} ms, stock unfused "
            f"{1000 * med['stock_unfused']:7.2f} ms ({row['ratio_vs_unfused']:.3f}x), stock fused "
            f"{1000 * med['stock_fused']:7.2f} ms ({row['ratio_vs_fused']:.3f}x); pixel diff "
            f"{row['max_pixel_diff_vs_unfused']}/{row['max_pixel_diff_vs_fused']}")
    order = {c: i for i, c in enumerate(cases)}
    return sorted(rows, key=lambda r: order[(r["method"], r["steps"])])


def bench_vs_stock(backbone, sampler, plan: BenchPlan, adapters: dict, prompt: str,
                   device: torch.device, log=print) -> list[dict]:
    """``compare_with_stock`` for the plan's (method, steps) cases on this backbone."""
    stock = StockPair(_stock_pipeline(backbone), _stock_pipeline(backbone))
    try:
        return compare_with_stock(sampler, stock, plan.overhead_cases,
                                  lambda m, s: _adapter_arg(adapters, m, s), prompt,
                                  plan.overhead_pairs, device, log)
    finally:
        del stock


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
