"""``python -m hypersd_core bench``: speed, memory and scaling of sampling and training.

One process, one run, one JSON (+ Markdown + a scaling PNG):

* sampling latency per method x steps (1/2/4/8; teacher 25 steps with CFG), images/s at
  batch 1 and 16, speed-up over the teacher's 25 steps;
* ``generate`` (adapter fused, prompts cached) against stock diffusers with
  ``load_lora_weights`` (unfused, as users call it) and with ``fuse_lora``, per method
  and steps (same weights, scheduler, steps, seed; the three interleaved in one loop so
  machine load hits them alike), with the largest pixel difference;
* where the fixed cost of a 1-step generation goes (text encoder, UNet, VAE decode,
  pipeline overhead) against the teacher's 25 steps with CFG;
* the app's compare grid through ``ModelService`` (``bench/costs.py``);
* adapter switch latency and its share of a 1-step generation;
* training: one step of each stage type over one plain student forward+backward on the
  same batch (``bench_train``);
* scaling with batch size.

Every figure is the median of several repeats after a warm-up. Models without shipped
adapters get random LoRAs of the same rank (timing does not depend on their values).
``--gpu`` runs the full-size SD1.5/SDXL GPU check instead (``bench_gpu``), ``--gpu-speed``
the fused / stock unfused / stock fused comparison at SD1.5 and SDXL sizes (``gpu_speed``).

Where figures go: ``--out`` (default ``out/bench/``, git-ignored). Only ``--update-readme``
writes the published copies, ``assets/results/bench*.json`` (+ .md, .png), and rebuilds the
Performance section of the docs from them; a plain run never touches a tracked file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from hypersd_core.bench.measure import (  # noqa: F401  (re-exported for callers)
    PLANS,
    BenchPlan,
    PeakMemory,
    _adapter_arg,
    bench_prompts,
    machine_header,
    measure,
    prepare_adapters,
    random_adapter,
    rss_mb,
    summarise,
    time_call,
    training_processes,
)
from hypersd_core.paths import ASSETS

DEFAULT_OUT = Path("out") / "bench"  # git-ignored, under the working directory
PUBLISHED = ASSETS / "results"  # the figures the docs show: written by --update-readme only
# ------------------------------------------------------------------ the run

def run_bench(model: str = "digits", plan: BenchPlan | None = None, device: str = "cpu",
              out: str | Path = DEFAULT_OUT / "bench.json", log=print) -> dict:
    """Run every CPU/GPU benchmark on ``model`` and write JSON, Markdown and a PNG.

    Args:
        model: "digits" or a diffusers pipeline folder.
        plan: what to measure (default: ``PLANS["full"]``).
        device: "cpu" or "cuda".
        out: the JSON path; .md and .png are written beside it.
    Returns:
        The result dict (as written to ``out``).
    """
    from hypersd_core.bench.costs import bench_breakdown, bench_grid
    from hypersd_core.bench.report import write_outputs
    from hypersd_core.bench.sampling import (
        bench_sampling,
        bench_sampling_scaling,
        bench_switch,
        bench_vs_stock,
    )
    from hypersd_core.bench.training import bench_training, bench_training_scaling
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    plan = (plan or PLANS["full"]).validate()
    dev = torch.device(device)
    t_start = time.perf_counter()
    result: dict = {"header": machine_header(dev), "model": model, "plan": dataclasses.asdict(plan)}
    if result["header"]["concurrent_training"]:
        log("warning: training jobs are running; figures will be noisy")
    backbone = load_backbone(model, device=device)
    result["kind"] = backbone.kind
    prompts = bench_prompts(backbone.kind, max(plan.big_batch, max(plan.sample_batches)))
    with tempfile.TemporaryDirectory(prefix="hypersd-bench-") as scratch:
        adapters = prepare_adapters(backbone, plan, Path(scratch))
        result["adapters"] = {k: v["source"] for k, v in adapters.items()}
        sampler = Sampler(backbone)
        log("sampling latency")
        result["sampling"] = bench_sampling(sampler, plan, adapters, prompts, dev, log)
        one = [r for r in result["sampling"] if r["method"] == "hypersd" and r["steps"] == 1]
        one_step_s = (one or result["sampling"][1:2] or result["sampling"])[0]["b1"]["median_s"]
        log("generate vs stock diffusers (load_lora_weights unfused, fuse_lora)")
        result["vs_stock"] = bench_vs_stock(backbone, sampler, plan, adapters, prompts[0], dev, log)
        log("fixed cost: 1 step vs teacher")
        result["breakdown"] = bench_breakdown(sampler, plan, adapters, prompts[0], dev, log)
        log("compare grid")
        result["grid"] = bench_grid(model, adapters, plan, device, log)
        log("adapter switch")
        result["switch"] = bench_switch(sampler, plan, adapters, one_step_s, log)
        log("sampling scaling")
        result["scaling_sampling"] = bench_sampling_scaling(sampler, plan, adapters, prompts,
                                                            dev, log)
    del sampler, backbone
    log("training steps")
    result["training"] = bench_training(model, plan, device, log)
    log("training scaling")
    result["scaling_training"] = bench_training_scaling(model, plan, device, log)
    result["seconds"] = time.perf_counter() - t_start
    end = machine_header(dev)  # load and concurrent jobs once more, at the end
    result["header"]["loadavg_end"] = end["loadavg"]
    result["header"]["concurrent_training_end"] = end["concurrent_training"]
    result["summary"] = summary(result)
    paths = write_outputs(result, out)
    log(paths["markdown_text"])
    log(f"wrote {', '.join(str(p) for k, p in paths.items() if k != 'markdown_text')} "
        f"in {result['seconds']:.0f} s")
    return result


def summary(result: dict) -> dict:
    """The headline figures and their targets."""
    out: dict = {}
    samp = {(r["method"], r["steps"]): r for r in result.get("sampling", [])}
    if ("hypersd", 1) in samp:
        out["hypersd1_speedup_vs_teacher"] = samp[("hypersd", 1)]["b1"]["speedup_vs_teacher"]
    one = [r for r in result.get("vs_stock") or [] if r["steps"] == 1 and r.get("adapter")]
    if one:  # worst 1-step case with an adapter; targets 0.9x unfused, 1.02x fused
        out["ours_vs_stock_unfused_1step"] = max(r["ratio_vs_unfused"] for r in one)
        out["ours_vs_stock_unfused_ok"] = out["ours_vs_stock_unfused_1step"] <= 0.9
        out["ours_vs_stock_fused_1step"] = max(r["ratio_vs_fused"] for r in one)
        out["ours_vs_stock_fused_ok"] = out["ours_vs_stock_fused_1step"] <= 1.02
        out["max_pixel_diff_vs_stock"] = max(
            max(r["max_pixel_diff_vs_unfused"], r["max_pixel_diff_vs_fused"])
            for r in result["vs_stock"])
    br = result.get("breakdown")
    if br:
        out["hypersd1_speedup_vs_teacher_interleaved"] = br["speedup"]
    grid = result.get("grid")
    if grid:
        out["grid_s"] = grid["new_prompt_seed"]["median_s"]
        out["grid_cells"] = grid["cells"]
        out["grid_ok"] = out["grid_s"] < 1.5
    sw = result.get("switch", {})
    if "share_of_one_step" in sw:
        out["switch_ms"] = 1000 * sw["switch"]["median_s"]
        out["switch_share_of_one_step"] = sw["share_of_one_step"]
        out["switch_ok"] = sw["share_of_one_step"] < 0.05
    train = {r["stage"]: r for r in result.get("training", []) if "ratio" in r}
    if "tscd" in train:
        out["tscd_step_ratio"] = train["tscd"]["ratio"]
        out["tscd_step_ratio_ok"] = train["tscd"]["ratio"] <= 2.5
    return out


def add_arguments(p) -> None:
    p.add_argument("--model", default="digits", help="'digits' or a diffusers pipeline folder")
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes (about a minute)")
    p.add_argument("--out", default=None,
                   help="JSON path (default out/bench/bench.json; --gpu: out/bench/bench_gpu.json; "
                   "--gpu-speed: out/bench/bench_gpu_speed.json)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--steps", help="comma list of step counts (default 1,2,4,8)")
    p.add_argument("--methods", help="comma list of few-step methods")
    p.add_argument("--teacher-steps", type=int, help="teacher steps (default 25)")
    p.add_argument("--repeats", type=int, help="timed repeats per figure")
    p.add_argument("--big-batch", type=int, help="the second sampling batch size (default 16)")
    p.add_argument("--train-batch", type=int, help="training batch size (default 32)")
    p.add_argument("--stages", help="comma list of training stage types")
    p.add_argument("--batches", help="comma list of batch sizes for the scaling tables")
    p.add_argument("--update-readme", action="store_true",
                   help="publish: write the figures to assets/results/ (instead of --out) and "
                   "rebuild the docs' Performance section from them")
    p.add_argument("--gpu", action="store_true",
                   help="full-size SDXL/SD1.5 GPU check with random weights (bench_gpu)")
    p.add_argument("--gpu-speed", action="store_true",
                   help="fused vs stock load_lora_weights vs stock fuse_lora at SD1.5 and SDXL "
                   "sizes (fp16, random weights; bench/gpu_speed.py)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --gpu or --gpu-speed: the same code at tiny sizes on the CPU")
    p.add_argument("--data", action="store_true",
                   help="training loader samples/s (0 and 2 workers) against the trainer's step "
                   "rate, digits and an image folder (bench/data_speed.py)")
    p.add_argument("--vs-diffusers", action="store_true",
                   help="one LCM training step, ours against diffusers' LCM-LoRA example, same "
                   "model and batch; TSCD and DMD beside it (bench/vs_diffusers.py)")
    p.add_argument("--full", action="store_true",
                   help="with --gpu: also 2-process gloo runs (TSCD+adversarial, DMD), fp16 with "
                   "GradScaler, and a resume (bench/gpu_full.py)")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"],
                   help="with --gpu: weights and autocast dtype (--dry-run: bf16)")


def plan_from_args(args) -> BenchPlan:
    """The quick/full plan with command-line overrides."""
    plan = PLANS["quick" if args.quick else "full"]
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    words = lambda s: tuple(v.strip() for v in s.split(",") if v.strip())  # noqa: E731
    changes: dict = {}
    if args.steps:
        changes["steps"] = ints(args.steps)
    if args.methods:
        changes["methods"] = words(args.methods)
    if args.stages:
        changes["stages"] = words(args.stages)
    if args.batches:
        changes["sample_batches"] = changes["train_batches"] = ints(args.batches)
    for key in ("teacher_steps", "repeats", "big_batch", "train_batch"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.repeats is not None:
        changes["train_repeats"] = args.repeats
    if args.teacher_steps is not None:
        changes["overhead_cases"] = tuple((m, args.teacher_steps if m == "teacher" else s)
                                          for m, s in plan.overhead_cases)
    if "methods" in changes:
        changes["overhead_cases"] = tuple(
            (m, s) for m, s in changes.get("overhead_cases", plan.overhead_cases)
            if m == "teacher" or m in changes["methods"])
    if "steps" in changes:
        changes["overhead_cases"] = tuple(
            (m, s) for m, s in changes.get("overhead_cases", plan.overhead_cases)
            if m == "teacher" or s in changes["steps"]) or (("hypersd", changes["steps"][0]),)
    return dataclasses.replace(plan, **changes).validate()


def out_path(args, name: str) -> Path:
    """Where this run writes ``name``: assets/results/ when publishing, else --out or out/bench/."""
    if args.update_readme:
        if args.out:
            raise ValueError(f"--update-readme writes {PUBLISHED / name}; leave out --out")
        return PUBLISHED / name
    return Path(args.out) if args.out else DEFAULT_OUT / name


def publish_section() -> Path:
    """Rebuild the docs' Performance section from the published figures in assets/results."""
    from hypersd_core.bench.report import PERFORMANCE_DOC, readme_section, update_readme

    def load(name):
        path = PUBLISHED / name
        return json.loads(path.read_text()) if path.is_file() else None

    body = readme_section(load("bench.json"), load("bench_gpu.json"), load("bench_gpu_speed.json"),
                          full=load("bench_gpu_full.json"))
    return update_readme(PERFORMANCE_DOC, body)


def main_bench(args) -> int:
    """Entry point of the ``bench`` command."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.update_readme and args.dry_run:
        raise ValueError("--dry-run figures are not published; drop --update-readme")
    if args.full and not args.gpu:
        raise ValueError("--full goes with --gpu")
    if args.data:
        from hypersd_core.bench.data_speed import bench_data

        bench_data(args.model, batch_size=args.train_batch or 32, device=device,
                   repeats=args.repeats or 5, out=out_path(args, "bench_data.json"))
        return 0
    if args.vs_diffusers:
        from hypersd_core.bench.vs_diffusers import bench_vs_diffusers

        model = args.model if args.model != "digits" else (
            "random:sd15" if device == "cuda" else "random:sd15-tiny")
        bench_vs_diffusers(model, batch_size=args.train_batch or 4, repeats=args.repeats or 7,
                           device=device, out=out_path(args, "bench_vs_diffusers.json"))
        return 0
    if args.gpu_speed:
        from hypersd_core.bench.gpu_speed import run_gpu_speed

        run_gpu_speed(out=out_path(args, "bench_gpu_speed.json"),
                      dry_run=args.dry_run, device=None if args.dry_run else args.device)
        if args.update_readme:
            print(f"updated {publish_section()}")
        return 0
    if args.gpu:
        from hypersd_core.bench.gpu import run_gpu_check

        if args.full:
            from hypersd_core.bench.gpu_full import run_gpu_full

            result = run_gpu_full(out=out_path(args, "bench_gpu_full.json"),
                                  dry_run=args.dry_run, dtype=args.dtype,
                                  device=None if args.dry_run else args.device)
            for line in result["errors"]:
                print(f"error: {line}", file=sys.stderr)
            return 1 if result["errors"] else 0
        result = run_gpu_check(out=out_path(args, "bench_gpu.json"),
                               dry_run=args.dry_run, dtype=args.dtype,
                               device=None if args.dry_run else args.device)
        for line in result["errors"]:
            print(f"error: {line}", file=sys.stderr)
        if args.update_readme and not result["errors"]:
            print(f"updated {publish_section()}")
        return 1 if result["errors"] else 0
    if args.dry_run:
        raise ValueError("--dry-run goes with --gpu (the CPU bench has --quick)")
    from hypersd_core.models.sampling import RECIPES

    plan = plan_from_args(args)
    unknown = [m for m in plan.methods if m not in RECIPES or m == "teacher"]
    if unknown:
        raise ValueError(f"unknown few-step methods {unknown}; choose from "
                         f"{', '.join(m for m in RECIPES if m != 'teacher')}")
    run_bench(args.model, plan, device, out_path(args, "bench.json"))
    if args.update_readme:
        print(f"updated {publish_section()}")
    return 0
