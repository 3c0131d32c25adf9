"""Where the time of a few-step generation goes, and the compare grid's time.

``bench_breakdown``: Hyper-SD 1 step against the teacher's 25 steps with CFG at batch 1,
end to end through ``Sampler.generate``, with the parts timed on their own in the same
interleaved loop: text encoder (what an uncached call pays; ours is served from the
prompt cache), UNet forward, VAE decode, tensor-to-PIL; the pipeline overhead is what
the end-to-end time leaves (latents, scheduler, checks, device look-ups).

``bench_grid``: the app's compare grid (5 methods x 1/2/4/8 steps + the teacher
reference, the app's default rewards) through ``ModelService`` and ``compare_grid``,
as a click on Compare runs it: a new prompt and seed (reference computed), the same
again (reference cached), and without reward scoring.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from hypersd_core.bench.measure import BenchPlan, _adapter_arg, bench_prompts, summarise, time_call


def _latents(backbone, batch: int) -> torch.Tensor:
    unet = backbone.unet
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(
        backbone.device, backbone.dtype)


@torch.no_grad()
def bench_breakdown(sampler, plan: BenchPlan, adapters: dict, prompt: str,
                    device: torch.device, log=print) -> dict:
    """Hyper-SD 1 step vs teacher 25 + CFG (batch 1), and the parts of each."""
    bb = sampler.backbone
    adapter = _adapter_arg(adapters, "hypersd", 1)
    teacher_steps = plan.teacher_steps
    sampler.generate("hypersd", 1, [prompt], [0], adapter=adapter)  # loads and fuses k=1
    cond, uncond = bb.encode_prompt([prompt]), bb.encode_prompt([prompt], negative=True)
    both = uncond.cat(cond)
    x1, x2 = _latents(bb, 1), _latents(bb, 2)
    t = torch.tensor(999, device=bb.device)
    image = bb.decode_latents(x1)
    parts = {
        "hypersd_1step": lambda: sampler.generate("hypersd", 1, [prompt], [0], adapter=adapter),
        "teacher": lambda: sampler.generate("teacher", teacher_steps, [prompt], [0]),
        "text_encoder": lambda: bb.encode_prompt([prompt]),
        "text_encoder_cfg": lambda: (bb.encode_prompt([prompt]), bb.encode_prompt([prompt], negative=True)),
        "unet_b1": lambda: bb.unet(x1, t, **cond.unet_kwargs()),
        "unet_b2_cfg": lambda: bb.unet(x2, t, **both.unet_kwargs()),
        "vae_decode": lambda: bb.decode_latents(x1),
        "to_pil": lambda: bb.pipe.image_processor.postprocess(image, output_type="pil"),
    }
    # the teacher call switches the adapter off and the 1-step call back on: that switch
    # belongs to neither, so it is timed apart and taken out of the 1-step figure
    switches: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in parts}
    order = list(parts)
    for fn in parts.values():
        fn()
    for i in range(plan.overhead_pairs):
        for key in (order if i % 2 == 0 else order[::-1]):
            dt = time_call(parts[key], device)
            if key == "hypersd_1step" and sampler.adapters.last_switch_s > 0:
                switches.append(sampler.adapters.last_switch_s)
                dt -= sampler.adapters.last_switch_s
            times[key].append(dt)
    med = {k: summarise(v)["median_s"] for k, v in times.items()}
    switch = statistics.median(switches) if switches else 0.0
    one = med["hypersd_1step"]
    one_parts = {"text_encoder (cached)": 0.0, "unet": med["unet_b1"],
                 "vae_decode": med["vae_decode"], "to_pil": med["to_pil"]}
    one_parts["pipeline_overhead"] = max(0.0, one - sum(one_parts.values()))
    teacher_parts = {"text_encoder (cached)": 0.0, "unet": teacher_steps * med["unet_b2_cfg"],
                     "vae_decode": med["vae_decode"], "to_pil": med["to_pil"]}
    teacher_parts["pipeline_overhead"] = max(0.0, med["teacher"] - sum(teacher_parts.values()))
    out = {
        "hypersd_1step_s": one, "teacher_s": med["teacher"], "teacher_steps": teacher_steps,
        "switch_s": switch, "speedup": med["teacher"] / one,
        "unet_only_speedup": teacher_steps * med["unet_b2_cfg"] / med["unet_b1"],
        "text_encoder_uncached_s": med["text_encoder"],
        "text_encoder_cfg_uncached_s": med["text_encoder_cfg"],
        "hypersd_1step_parts_s": one_parts, "teacher_parts_s": teacher_parts,
        "parts_median_s": med, "pairs": plan.overhead_pairs,
    }
    shares = ", ".join(f"{k} {1000 * v:.2f} ms ({100 * v / one:.0f}%)" for k, v in one_parts.items())
    log(f"  hypersd 1 step {1000 * one:.2f} ms vs teacher {teacher_steps} + CFG "
        f"{1000 * med['teacher']:.2f} ms: {out['speedup']:.1f}x (UNet alone "
        f"{out['unet_only_speedup']:.1f}x); 1 step = {shares}")
    return out


def bench_grid(model: str, adapters: dict, plan: BenchPlan, device: str, log=print) -> dict:
    """The app's compare grid through ``ModelService``: first click, new prompt + seed,
    the same again, and without rewards (medians of ``plan.repeats``, interleaved)."""
    from hypersd_core.app.choices import default_rewards
    from hypersd_core.app.service import COMPARE_METHODS, COMPARE_STEPS, ModelService, compare_grid

    service = ModelService(model, device=device)
    backbone = service.sampler.backbone
    for name, info in adapters.items():  # random stand-ins where the model has none
        backbone.adapter_dirs.setdefault(name, Path(info["path"]))
    rows = [(m, None, m) for m in COMPARE_METHODS]
    if service.has_onestep_unet():  # the app shows this row too, where the model has one
        rows.append(("hypersd-unet", None, "hypersd-unet"))
    rewards = default_rewards(backbone.kind)
    pool = bench_prompts(backbone.kind, 64)
    dev = torch.device(device)

    def grid(prompt: str, seed: int, scored: bool = True, service=service):
        return compare_grid(service, [prompt], [seed], rows, COMPARE_STEPS,
                            rewards if scored else [])

    first_cells: list = []
    first = time_call(lambda: first_cells.extend(grid(pool[0], 0)[0]), dev)
    times: dict[str, list[float]] = {"new_prompt_seed": [], "same_again": [], "no_rewards": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    for i in range(plan.repeats):
        runs = [("new_prompt_seed", lambda: grid(pool[1 + 2 * i], 100 + i)),  # noqa: B023
                ("same_again", lambda: grid(pool[0], 0)),
                ("no_rewards", lambda: grid(pool[2 + 2 * i], 200 + i, scored=False))]  # noqa: B023
        for key, fn in (runs if i % 2 == 0 else runs[::-1]):
            c0 = time.process_time()
            times[key].append(time_call(fn, dev))
            cpu[key].append(time.process_time() - c0)
    stats = {k: summarise(v) for k, v in times.items()}
    # CPU seconds this process used (all its threads): on a machine shared with other
    # jobs the wall time stretches, this much less so
    out = {"cells": len(first_cells), "errors": sum(1 for c in first_cells if c.error),
           "rewards": rewards, "first_click_s": first, **stats,
           "cpu_s": {k: statistics.median(v) for k, v in cpu.items()}}
    log(f"  compare grid ({out['cells']} cells, rewards {', '.join(rewards) or 'none'}): "
        f"new prompt+seed {stats['new_prompt_seed']['median_s']:.3f} s, same again "
        f"{stats['same_again']['median_s']:.3f} s, no rewards {stats['no_rewards']['median_s']:.3f} s, "
        f"first click {first:.2f} s (loads adapters and rewards); CPU time of a new grid "
        f"{out['cpu_s']['new_prompt_seed']:.3f} s")
    del service
    return out
