"""Measuring helpers shared by the benchmarks: timing, peak memory, machine header, bench
adapters and prompts. Imports nothing else from ``bench``."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hypersd_core.paths import ASSETS, ROOT

COCO_PROMPTS = ASSETS / "prompts" / "coco_style_100.txt"
TRAINING_MARKERS = ("hypersd_core.training.trainer", "hypersd_core chain", "hypersd_core build-digits")


@dataclass(frozen=True)
class BenchPlan:
    """What to measure and how often (``quick`` and ``full`` below; tests shrink it)."""

    methods: tuple[str, ...] = ("lcm", "tcd", "hypersd", "hypersd-unified")
    steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_steps: int = 25
    big_batch: int = 16
    repeats: int = 5
    warmup: int = 1
    # (method, steps) compared with stock diffusers (unfused and fused), interleaved
    overhead_cases: tuple[tuple[str, int], ...] = (
        ("teacher", 25), *((m, s) for m in ("lcm", "tcd", "hypersd", "hypersd-unified")
                           for s in (1, 2, 4, 8)))
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
    "quick": BenchPlan(repeats=3, overhead_cases=(("teacher", 25), ("lcm", 1), ("tcd", 1),
                                                  ("hypersd", 1), ("hypersd-unified", 1),
                                                  ("hypersd", 4)),
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
        from hypersd_core.worlds.digits import ALL_PROMPTS

        pool = [p for p, *_ in ALL_PROMPTS]
    else:
        pool = [line.strip() for line in COCO_PROMPTS.read_text().splitlines() if line.strip()]
    return [pool[i % len(pool)] for i in range(n)]


def random_adapter(backbone, name: str, rank: int, out_root: Path) -> Path:
    """Write a random LoRA of ``rank`` for the backbone's UNet (a timing stand-in)."""
    from hypersd_core.models.lora import add_lora, save_lora

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
        if not getattr(unet, "peft_config", None):
            unet.unload_lora()  # no empty PEFT wrappers left to slow every call
    return out_root / name


def prepare_adapters(backbone, plan: BenchPlan, scratch: Path) -> dict[str, dict]:
    """The adapter each (method, steps) uses: shipped if the backbone has it, else random."""
    from hypersd_core.models.sampling import default_adapter

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
    from hypersd_core.models.sampling import default_adapter

    name = default_adapter(method, steps)
    return None if name is None else adapters[name]["path"]


