"""``python -m hypersd_core bench``: speed, memory and scaling of sampling and training.

One process, one run, one JSON (+ Markdown + a scaling PNG):

* sampling latency per method x steps (1/2/4/8; teacher 25 steps with CFG), images/s at
  batch 1 and 16, speed-up over the teacher's 25 steps;
* ``generate`` against a stock diffusers pipeline call (same weights, scheduler, steps,
  seed; the two interleaved in one loop so machine load hits both alike);
* adapter switch latency and its share of a 1-step generation;
* training: one step of each stage type over one plain student forward+backward on the
  same batch (``bench_train``);
* scaling with batch size.

Every figure is the median of several repeats after a warm-up. Models without shipped
adapters get random LoRAs of the same rank (timing does not depend on their values).
``--gpu`` runs the full-size SD1.5/SDXL GPU check instead (``bench_gpu``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import ASSETS, ROOT

COCO_PROMPTS = ASSETS / "prompts" / "coco_style_100.txt"
TRAINING_MARKERS = ("hypersd_core.train", "hypersd_core chain", "hypersd_core build-digits")


@dataclass(frozen=True)
class BenchPlan:
    """What to measure and how often (``quick`` and ``full`` below; tests shrink it)."""

    methods: tuple[str, ...] = ("lcm", "tcd", "hypersd", "hypersd-unified")
    steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_steps: int = 25
    big_batch: int = 16
    repeats: int = 5
    warmup: int = 1
    overhead_cases: tuple[tuple[str, int], ...] = (("hypersd", 1), ("hypersd", 4), ("teacher", 25))
    overhead_pairs: int = 20
    switch_repeats: int = 60
    stages: tuple[str, ...] = ("tscd", "tscd+adv", "lcm", "tcd", "feedback", "dmd", "dmd-critic")
    train_batch: int = 32
    train_repeats: int = 5
    sample_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    train_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    lora_rank: int = 16  # rank of the random stand-in adapters

    def validate(self) -> BenchPlan:
        bad = [f"{k} must be >= 1" for k in ("repeats", "big_batch", "overhead_pairs",
                                             "switch_repeats", "train_batch", "train_repeats",
                                             "lora_rank", "teacher_steps")
               if getattr(self, k) < 1]
        if min(self.steps, default=0) < 1:
            bad.append(f"steps must be >= 1, got {self.steps}")
        if bad:
            raise ValueError("invalid bench plan: " + "; ".join(bad))
        return self


PLANS: dict[str, BenchPlan] = {
    "full": BenchPlan(),
    "quick": BenchPlan(repeats=3, overhead_cases=(("hypersd", 1), ("hypersd", 4)),
                       overhead_pairs=10, switch_repeats=30, train_repeats=3,
                       sample_batches=(1, 8, 64), train_batches=(1, 8, 32)),
}


# ------------------------------------------------------------------ measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronised on CUDA."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def summarise(times: list[float]) -> dict:
    """Median / min / max of repeat times in seconds (the median is the reported figure)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "n": len(times)}


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """``summarise`` of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return summarise([time_call(fn, device) for _ in range(repeats)])


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """Peak memory over a block: max allocated on CUDA, sampled RSS on the CPU (MB)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval = device, interval_s
        self.peak_mb = self.base_mb = 0.0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base_mb = self.peak_mb = rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, rss_mb())

    def as_dict(self) -> dict:
        kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        return {"kind": kind, "peak_mb": round(self.peak_mb, 1),
                "delta_mb": round(self.peak_mb - self.base_mb, 1)}


def training_processes() -> list[str]:
    """Command lines of other training/build processes (they make figures noisy)."""
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if any(m in cmd for m in TRAINING_MARKERS):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def machine_header(device: torch.device) -> dict:
    """Machine, CPU, threads, library versions, git commit, load and concurrent jobs."""
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
        "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "device": str(device), "git_commit": commit,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "concurrent_training": training_processes(),
    }
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    return header


# ------------------------------------------------------------------ adapters and prompts

def bench_prompts(kind: str, n: int) -> list[str]:
    """n prompts: digits captions for the digits world (and tiny test models sharing its
    tokenizer), the shipped COCO-style captions otherwise."""
    if kind == "digits" or not COCO_PROMPTS.is_file():
        from .digits import ALL_PROMPTS

        pool = [p for p, *_ in ALL_PROMPTS]
    else:
        pool = [line.strip() for line in COCO_PROMPTS.read_text().splitlines() if line.strip()]
    return [pool[i % len(pool)] for i in range(n)]


def random_adapter(backbone, name: str, rank: int, out_root: Path) -> Path:
    """Write a random LoRA of ``rank`` for the backbone's UNet (a timing stand-in)."""
    from .lora import add_lora, save_lora

    unet = backbone.unet
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with warnings.catch_warnings():  # PEFT warns that the UNet may already hold adapters
        warnings.simplefilter("ignore")
        add_lora(unet, rank, float(rank), adapter_name=name)
    for pname, p in unet.named_parameters():
        if f".{name}." in pname and "lora_B" in pname:
            p.data = 1e-3 * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
    try:
        save_lora(unet, out_root / name, adapter_name=name, dtype=torch.float16)
    finally:
        unet.delete_adapters(name)
    return out_root / name


def prepare_adapters(backbone, plan: BenchPlan, scratch: Path) -> dict[str, dict]:
    """The adapter each (method, steps) uses: shipped if the backbone has it, else random."""
    from .sampling import default_adapter

    needed = {default_adapter(m, s) for m in plan.methods for s in plan.steps} - {None}
    needed |= {default_adapter(m, s) for m, s in plan.overhead_cases} - {None}
    out = {}
    for name in sorted(needed):
        if name in backbone.adapter_dirs:
            out[name] = {"path": str(backbone.adapter_dirs[name]), "source": "shipped"}
        else:
            path = random_adapter(backbone, name, plan.lora_rank, scratch)
            out[name] = {"path": str(path), "source": f"random rank {plan.lora_rank}"}
    return out


def _adapter_arg(adapters: dict, method: str, steps: int) -> str | None:
    from .sampling import default_adapter

    name = default_adapter(method, steps)
    return None if name is None else adapters[name]["path"]


# ------------------------------------------------------------------ the run

def run_bench(model: str = "digits", plan: BenchPlan | None = None, device: str = "cpu",
              out: str | Path = "assets/results/bench.json", log=print) -> dict:
    """Run every CPU/GPU benchmark on ``model`` and write JSON, Markdown and a PNG.

    Args:
        model: "digits" or a diffusers pipeline folder.
        plan: what to measure (default: ``PLANS["full"]``).
        device: "cpu" or "cuda".
        out: the JSON path; .md and .png are written beside it.
    Returns:
        The result dict (as written to ``out``).
    """
    from .bench_report import write_outputs
    from .bench_sampling import (
        bench_overhead,
        bench_sampling,
        bench_sampling_scaling,
        bench_switch,
    )
    from .bench_train import bench_training, bench_training_scaling
    from .models import load_backbone
    from .sampling import Sampler

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
        log("generate vs stock diffusers")
        result["overhead"] = bench_overhead(backbone, sampler, plan, adapters, prompts[0], dev, log)
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
    over = result.get("overhead") or []
    if over:
        out["generate_vs_stock_ratio"] = max(r["ratio"] for r in over)
        out["generate_vs_stock_ok"] = out["generate_vs_stock_ratio"] <= 1.05
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
                   help="JSON path (default assets/results/bench.json; --gpu: assets/results/bench_gpu.json)")
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
                   help="replace README.md's '## Performance' section with the result")
    p.add_argument("--gpu", action="store_true",
                   help="full-size SDXL/SD1.5 GPU check with random weights (bench_gpu)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --gpu: the same code at tiny sizes on the CPU")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="with --gpu")


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
    if "steps" in changes:
        changes["overhead_cases"] = tuple(
            (m, s) for m, s in changes.get("overhead_cases", plan.overhead_cases)
            if m == "teacher" or s in changes["steps"]) or (("hypersd", changes["steps"][0]),)
    return dataclasses.replace(plan, **changes).validate()


def main_bench(args) -> int:
    """Entry point of the ``bench`` command."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu:
        from .bench_gpu import run_gpu_check

        run_gpu_check(out=args.out or "assets/results/bench_gpu.json", dry_run=args.dry_run,
                      dtype=args.dtype, device=None if args.dry_run else args.device)
        return 0
    if args.dry_run:
        raise ValueError("--dry-run goes with --gpu (the CPU bench has --quick)")
    from .sampling import RECIPES

    plan = plan_from_args(args)
    unknown = [m for m in plan.methods if m not in RECIPES or m == "teacher"]
    if unknown:
        raise ValueError(f"unknown few-step methods {unknown}; choose from "
                         f"{', '.join(m for m in RECIPES if m != 'teacher')}")
    result = run_bench(args.model, plan, device, args.out or "assets/results/bench.json")
    if args.update_readme:
        from .bench_report import readme_section, update_readme

        gpu_file = Path(args.out or "assets/results/bench.json").parent / "bench_gpu.json"
        gpu = json.loads(gpu_file.read_text()) if gpu_file.is_file() else None
        print(f"updated {update_readme(ROOT / 'README.md', readme_section(result, gpu))}")
    return 0
