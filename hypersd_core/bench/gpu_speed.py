"""``bench --gpu-speed``: our fused inference path against stock diffusers at SD1.5 and
SDXL sizes on a GPU (fp16, random weights from ``assets/configs``; nothing downloaded).

Per model at its native resolution (SD1.5 512, SDXL 1024), with a random rank-64 LoRA
on Hyper-SD's target layers:

* Hyper-SD 1 and 4 steps at batch 1 through ``Sampler.generate`` (adapter fused into the
  base weights, no PEFT layers, prompts cached) against a stock pipeline with
  ``load_lora_weights`` (unfused) and one with ``load_lora_weights`` + ``fuse_lora``,
  the three interleaved, medians, and the largest pixel difference;
* the switch between two fused adapters (synchronised), and the memory the kept
  original weights take;
* where the time of a 1-step generation goes against the teacher's 25 steps with CFG.

The stock pipelines share the text encoders and VAE and hold their own UNet copy.
Sized to finish in under 3 minutes on one H100; a budget skips the parts left when it
runs long, and the JSON is rewritten after each model. ``--dry-run`` runs the same
code on the CPU with the architectures shrunk (float32; the tests run it).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hypersd_core.bench.costs import bench_breakdown
from hypersd_core.bench.measure import (
    BenchPlan,
    machine_header,
    random_adapter,
    summarise,
    time_call,
)
from hypersd_core.bench.sampling import StockPair, compare_with_stock


@dataclass(frozen=True)
class SpeedPlan:
    models: tuple[str, ...] = ("sd15", "sdxl")
    steps: tuple[int, ...] = (1, 4)
    rank: int = 64
    pairs: int = 8
    switch_repeats: int = 10
    teacher_steps: int = 25
    breakdown_pairs: int = 3
    budget_s: float = 140.0  # start no new part after this
    dry_run: bool = False


DRY_PLAN = SpeedPlan(steps=(1, 2), rank=4, pairs=2, switch_repeats=3, teacher_steps=2,
                     breakdown_pairs=1, dry_run=True)


def _stock_copy(backbone):
    """A stock pipeline of the same class over the same modules, with its own UNet copy
    (taken before anything is fused into ours)."""
    pipe = backbone.pipe
    parts = dict(pipe.components)
    parts["unet"] = copy.deepcopy(pipe.unet)
    stock = type(pipe)(**parts)
    stock.set_progress_bar_config(disable=True)
    return stock


def _model_part(kind: str, plan: SpeedPlan, device: str, dtype: torch.dtype, t0: float,
                log) -> dict:
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    dev = torch.device(device)
    backbone = load_backbone(f"random:{kind}{'-tiny' if plan.dry_run else ''}", device=device,
                             dtype=dtype)
    out: dict = {"resolution": backbone.resolution, "rank": plan.rank,
                 "unet_params_m": sum(p.numel() for p in backbone.unet.parameters()) / 1e6}
    prompt = "a photo of a red fox sitting in tall grass, golden hour"
    with tempfile.TemporaryDirectory(prefix="hypersd-gpu-speed-") as scratch:
        paths = {name: random_adapter(backbone, name, plan.rank, Path(scratch))
                 for name in ("hypersd-k1", "hypersd-k4")}
        stock = StockPair(_stock_copy(backbone), _stock_copy(backbone))
        sampler = Sampler(backbone)
        lora = str(paths["hypersd-k1"])
        log(f"{kind}: ours vs stock ({backbone.resolution} px, {out['unet_params_m']:.0f}M UNet)")
        out["vs_stock"] = compare_with_stock(
            sampler, stock, [("hypersd", s) for s in plan.steps], lambda m, s: lora, prompt,
            plan.pairs, dev, log)
        del stock
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        sampler.adapters.load("hypersd-k4", paths["hypersd-k4"])
        names = [sampler.adapters.active, "hypersd-k4"]
        adapters = sampler.adapters
        times = [time_call(lambda i=i: adapters.use(names[(i + 1) % 2]), dev)
                 for i in range(plan.switch_repeats)]
        out["switch"] = {**summarise(times), "originals_mb": sampler.adapters.originals_mb()}
        log(f"  switch between fused adapters {1000 * out['switch']['median_s']:.2f} ms; kept "
            f"originals {out['switch']['originals_mb']:.0f} MB")
        if time.perf_counter() - t0 < plan.budget_s:
            bplan = BenchPlan(teacher_steps=plan.teacher_steps, overhead_pairs=plan.breakdown_pairs)
            adapters = {n: {"path": str(p)} for n, p in paths.items()}
            out["breakdown"] = bench_breakdown(sampler, bplan, adapters, prompt, dev, log)
        else:
            out["breakdown"] = {"skipped": "time budget spent"}
    del sampler, backbone
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def run_gpu_speed(out: str | Path = "out/bench/bench_gpu_speed.json", dry_run: bool = False,
                  device: str | None = None, plan: SpeedPlan | None = None, log=print) -> dict:
    """Run the comparison for each model of the plan and write one JSON file.

    Args:
        dry_run: tiny architectures on the CPU in float32 (what the tests run).
        device: default "cuda" (required unless dry_run).
    """
    plan = plan or (DRY_PLAN if dry_run else SpeedPlan())
    if dry_run:
        device, dtype = "cpu", torch.float32
    else:
        device, dtype = device or "cuda", torch.float16
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise RuntimeError("bench --gpu-speed needs a CUDA GPU (or --dry-run for the CPU "
                               "code path at tiny sizes)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"header": machine_header(torch.device(device)), "dry_run": dry_run,
                    "dtype": str(dtype).removeprefix("torch."), "plan": asdict(plan),
                    "models": {}, "errors": []}
    for kind in plan.models:
        if time.perf_counter() - t0 > plan.budget_s:
            result["models"][kind] = {"skipped": "time budget spent"}
            continue
        try:
            result["models"][kind] = _model_part(kind, plan, device, dtype, t0, log)
        except Exception as err:  # one model's failure must not lose the other's figures
            result["errors"].append(f"{kind}: {type(err).__name__}: {err}")
            log(f"error in {kind}: {type(err).__name__}: {err}")
        result["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(result, indent=1, default=str))
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out} in {result['seconds']:.0f} s")
    return result
