"""GPU check: full-size SDXL and SD1.5 architectures with random weights.

``python -m hypersd_core bench --gpu [--dtype fp16|bf16] [--out out/bench/bench_gpu.json]``

Builds UNet, VAE and text encoder(s) from the public diffusers configs shipped in
``assets/configs/`` (nothing is downloaded; the tokenizer is the small local one,
padded to 77 tokens) and measures, per model at its native resolution:

* 1-step and 4-step Hyper-SD latency (DDIM trailing, a rank-64 LoRA, no CFG) and the
  teacher's 25 steps with CFG, end to end to PIL images;
* the VAE decode share of the 1-step time;
* LoRA fused vs unfused (1 and 4 steps) and 1-step latency against resolution;
* a smoke run of every stage type (TSCD, TSCD + adversarial, LCM, TCD, feedback, DMD):
  2 training steps at batch 1 with the preset's settings through the trainer's pieces,
  gradient checkpointing on, peak allocated memory per stage (``bench/gpu_train.py``);
* one TSCD LoRA training step (rank 64, gradient checkpointing) at batch 1 and 2: time
  and peak allocated memory.

Sized to finish in under 7 minutes on one H100 (a time budget skips what is left if it
runs long) and writes one JSON file; ``errors`` lists every part that failed and the
command exits non-zero then. ``--dry-run`` runs the same code (same dtype) on the CPU
with every architecture shrunk to a few channels and 64x64 images (the tests run it).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hypersd_core.bench.gpu_train import SMOKE_STAGES, smoke_stage
from hypersd_core.bench.measure import PeakMemory, machine_header, measure
from hypersd_core.models.random_model import build_pipeline, load_configs, shrink

__all__ = ["GpuPlan", "load_configs", "run_gpu_check", "gpu_errors"]


@dataclass(frozen=True)
class GpuPlan:
    """Sizes and repeats of the GPU check (``dry_run`` shrinks everything)."""

    models: tuple[str, ...] = ("sdxl", "sd15")
    resolution: tuple[tuple[str, int], ...] = (("sdxl", 1024), ("sd15", 512))
    scaling: tuple[tuple[str, tuple[int, ...]], ...] = (("sdxl", (512, 768, 1024)),
                                                        ("sd15", (256, 512, 768)))
    lora_rank: int = 64
    teacher_steps: int = 25
    repeats: int = 5
    teacher_repeats: int = 2
    train_batches: tuple[int, ...] = (1, 2)
    train_repeats: int = 3
    smoke_stages: tuple[str, ...] = tuple(SMOKE_STAGES)
    parts: tuple[str, ...] = ("latency", "smoke", "training", "vae", "lora_fused",
                              "resolution_scaling")
    budget_s: float = 330.0  # stop starting new parts after this (the run stays under 7 min)
    warmup: int = 1
    dry_run: bool = False


DRY_PLAN = GpuPlan(resolution=(("sdxl", 64), ("sd15", 64)),
                   scaling=(("sdxl", (32, 64)), ("sd15", (32, 64))), lora_rank=4,
                   teacher_steps=3, repeats=1, teacher_repeats=1, train_repeats=1, warmup=0,
                   dry_run=True)


def _params(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def _ms(stats: dict) -> float:
    return round(1000 * stats["median_s"], 2)


class GpuCheck:
    """One model kind: build it, then run each part in order within the time budget."""

    def __init__(self, kind: str, plan: GpuPlan, device: str, dtype: torch.dtype, t0: float,
                 log=print):
        from hypersd_core.models.backbone import Backbone

        self.kind, self.plan, self.dtype, self.t0, self.log = kind, plan, dtype, t0, log
        self.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        self.device = torch.device(device)
        self.res = dict(plan.resolution)[kind]
        cfgs = load_configs(kind)
        if plan.dry_run:
            cfgs = shrink(kind, cfgs)
        t = time.perf_counter()
        pipe = build_pipeline(kind, cfgs, device, dtype)
        self.out: dict = {"resolution": self.res, "build_s": round(time.perf_counter() - t, 1),
                          "params_m": {n: _params(getattr(pipe, n)) for n in
                                       ("unet", "vae", "text_encoder", "text_encoder_2")
                                       if getattr(pipe, n, None) is not None}}
        self.backbone = Backbone(kind, f"random {kind} ({'dry run' if plan.dry_run else 'full size'})",
                                 pipe, 7.5)
        self.prompt = "a photo of a red bicycle leaning against a brick wall"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.plan.budget_s

    def part(self, name: str, fn) -> None:
        """Run one part; record its result, the budget skip, or the error (e.g. OOM)."""
        if name.split("_")[0] not in self.plan.parts and name not in self.plan.parts:
            return
        if self.over_budget():
            self.out[name] = {"skipped": f"time budget of {self.plan.budget_s:.0f} s used up"}
            self.log(f"  {self.kind} {name}: skipped (time budget)")
            return
        try:
            self.out[name] = fn()
        except torch.cuda.OutOfMemoryError as err:
            self.out[name] = {"error": f"out of memory: {str(err)[:200]}"}
        except Exception as err:  # one failed part must not lose the others' figures
            self.out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log(f"  {self.kind} {name}: {json.dumps(self.out[name])[:300]}")

    # ------------------------------------------------------------ inference
    def call(self, method: str, steps: int, res: int | None = None, output_type: str = "pil"):
        from hypersd_core.models.sampling import get_recipe, make_scheduler, recipe_eta

        pipe, recipe = self.backbone.pipe, get_recipe(method)
        pipe.scheduler = make_scheduler(self.backbone, method, steps)
        res = res or self.res
        eta = recipe_eta(recipe, steps)
        kw = {"eta": eta} if eta is not None else {}
        return lambda: pipe(prompt=[self.prompt], height=res, width=res,
                            num_inference_steps=steps, output_type=output_type,
                            guidance_scale=self.backbone.guidance_scale if recipe.cfg else 0.0,
                            generator=torch.Generator().manual_seed(0), **kw)

    def add_inference_lora(self) -> None:
        from hypersd_core.models.lora import add_lora

        unet = self.backbone.unet
        if "hyper" in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters("hyper")
        add_lora(unet, self.plan.lora_rank, float(self.plan.lora_rank), adapter_name="hyper")
        g = torch.Generator().manual_seed(0)
        for name, p in unet.named_parameters():
            if ".hyper." in name:
                if "lora_B" in name:
                    p.data = 1e-3 * torch.randn(p.shape, generator=g).to(p.device)
                p.data = p.data.to(self.dtype)
                p.requires_grad_(False)
        unet.set_adapter("hyper")

    def latency(self) -> dict:
        """1-step and 4-step Hyper-SD (LoRA, unfused) and the teacher's steps with CFG."""
        p, unet = self.plan, self.backbone.unet
        out = {"hypersd_1step": measure(self.call("hypersd", 1), self.device, p.repeats, p.warmup),
               "hypersd_4step": measure(self.call("hypersd", 4), self.device, p.repeats, p.warmup)}
        unet.disable_adapters()
        try:
            out[f"teacher_{p.teacher_steps}step_cfg"] = measure(
                self.call("teacher", p.teacher_steps), self.device, p.teacher_repeats, p.warmup)
        finally:
            unet.enable_adapters()
        one = out["hypersd_1step"]["median_s"]
        out["speedup_1step_vs_teacher"] = out[f"teacher_{p.teacher_steps}step_cfg"]["median_s"] / one
        out["ms"] = {k: _ms(v) for k, v in out.items() if isinstance(v, dict)}
        return out

    def vae_share(self) -> dict:
        """Decode share of the 1-step time: (PIL call - latent-only call) / PIL call, and
        the VAE decode alone."""
        p = self.plan
        full = measure(self.call("hypersd", 1), self.device, p.repeats, p.warmup)
        latent_only = measure(self.call("hypersd", 1, output_type="latent"), self.device, p.repeats, p.warmup)
        latents = self.call("hypersd", 1, output_type="latent")().images
        vae = self.backbone.vae
        with torch.no_grad():
            decode = measure(lambda: vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor),
                             self.device, p.repeats, p.warmup)
        return {"one_step_ms": _ms(full), "latent_only_ms": _ms(latent_only),
                "vae_decode_ms": _ms(decode),
                "decode_and_postprocess_share": 1 - latent_only["median_s"] / full["median_s"],
                "vae_decode_share": decode["median_s"] / full["median_s"],
                "force_upcast": bool(getattr(vae.config, "force_upcast", False))}

    def fused(self) -> dict:
        """LoRA unfused vs fused into the base weights, 1 and 4 steps."""
        p, pipe = self.plan, self.backbone.pipe
        out = {}
        for steps in (1, 4):
            out[f"unfused_{steps}step_ms"] = _ms(measure(self.call("hypersd", steps), self.device,
                                                         p.repeats, p.warmup))
        pipe.fuse_lora(adapter_names=["hyper"], lora_scale=1.0)
        try:
            for steps in (1, 4):
                out[f"fused_{steps}step_ms"] = _ms(measure(self.call("hypersd", steps), self.device,
                                                           p.repeats, p.warmup))
        finally:
            pipe.unfuse_lora()
        for steps in (1, 4):
            out[f"fused_speedup_{steps}step"] = out[f"unfused_{steps}step_ms"] / out[f"fused_{steps}step_ms"]
        return out

    def resolution_scaling(self) -> list[dict]:
        rows = []
        for res in dict(self.plan.scaling)[self.kind]:
            stats = measure(self.call("hypersd", 1, res=res), self.device, self.plan.repeats, self.plan.warmup)
            rows.append({"resolution": res, "one_step_ms": _ms(stats)})
        return rows

    # ------------------------------------------------------------ training
    def training(self) -> list[dict]:
        """One TSCD LoRA step (rank 64, gradient checkpointing) at each batch size."""
        from hypersd_core.bench.gpu_train import _teardown
        from hypersd_core.training.config import make_config
        from hypersd_core.training.data import Batch
        from hypersd_core.training.trainer import enable_checkpointing, make_stage, setup_student

        bb, p = self.backbone, self.plan
        cfg = make_config({"stage": "tscd", "model": f"random:{self.kind}", "k": 8,
                           "lora_rank": p.lora_rank, "lora_alpha": float(p.lora_rank),
                           "batch_size": max(p.train_batches), "mixed_precision": self.precision,
                           "frozen_dtype": self.precision, "gradient_checkpointing": "on"})
        params = setup_student(bb, cfg)
        stage = make_stage(cfg, bb)
        enable_checkpointing(bb, cfg, use_cuda=True)
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        autocast = torch.autocast(self.device.type, dtype=self.dtype)
        f = bb.pipe.vae_scale_factor
        rows = []
        for b in p.train_batches:
            g = torch.Generator().manual_seed(b)
            prompts = [self.prompt] * b
            batch = Batch(torch.randn(b, 4, self.res // f, self.res // f, generator=g).to(self.device),
                          bb.encode_prompt(prompts), bb.encode_prompt(prompts, negative=True),
                          prompts, torch.zeros(b, 3, 1, 1, device=self.device))

            def step():
                with autocast:
                    loss, _ = stage.loss(batch, torch.Generator().manual_seed(0))  # noqa: B023
                loss.float().mean().backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            try:
                step()  # warm-up
                with PeakMemory(self.device) as mem:
                    stats = measure(step, self.device, p.train_repeats, warmup=0)
                rows.append({"batch": b, "step_ms": _ms(stats), "samples_per_s": b / stats["median_s"],
                             "peak_mb": round(mem.peak_mb), "memory_kind": mem.as_dict()["kind"],
                             "lora_params_m": round(sum(x.numel() for x in params) / 1e6, 2)})
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                rows.append({"batch": b, "error": "out of memory"})
        _teardown(bb)
        return rows

    def smoke(self, name: str) -> dict:
        """Two steps of one stage type at full size (``bench/gpu_train.py``)."""
        return smoke_stage(self.backbone, name, self.precision, self.res, self.prompt)

    def run(self) -> dict:
        self.add_inference_lora()
        with torch.no_grad():
            self.part("latency", self.latency)
        self.backbone.unet.delete_adapters("hyper")
        for name in self.plan.smoke_stages:  # first: the check that train works
            self.part(f"smoke_{name}", lambda n=name: self.smoke(n))
        if "smoke" in self.plan.parts:
            self.out["smoke_peak_mb"] = {n: self.out[f"smoke_{n}"].get("peak_mb")
                                         for n in self.plan.smoke_stages}
        self.part("training", self.training)
        self.add_inference_lora()
        with torch.no_grad():
            self.part("vae", self.vae_share)
            self.part("lora_fused", self.fused)
            self.part("resolution_scaling", self.resolution_scaling)
        return self.out


def gpu_errors(result: dict) -> list[str]:
    """``model/part: error`` for every part (or training row) of the check that failed."""
    errors = []
    for kind, parts in result.get("models", {}).items():
        for name, value in parts.items():
            rows = value if isinstance(value, list) else [value]
            for row in rows:
                if isinstance(row, dict) and "error" in row:
                    errors.append(f"{kind}/{name}: {row['error']}")
    return errors


def run_gpu_check(out: str | Path = "out/bench/bench_gpu.json", dry_run: bool = False,
                  dtype: str = "bf16", device: str | None = None, plan: GpuPlan | None = None,
                  log=print) -> dict:
    """Run the GPU check (or its CPU dry run) and write one JSON file; ``result["errors"]``
    lists the parts that failed (the CLI exits non-zero then).

    Args:
        out: the JSON path.
        dry_run: tiny architectures on the CPU in bf16 (the code path, not the figures).
        dtype: "bf16" (default, what the presets train in) or "fp16" for the CUDA run.
        device: default "cuda" (required unless dry_run).
    """
    if dtype not in ("fp16", "bf16"):
        raise ValueError(f"dtype must be 'fp16' or 'bf16', got {dtype!r}")
    if dry_run and dtype != "bf16":
        raise ValueError("--dry-run runs bf16 on the CPU (fp16 loss scaling is CUDA's)")
    plan = plan or (DRY_PLAN if dry_run else GpuPlan())
    device = device or ("cpu" if dry_run else "cuda")
    if not dry_run and (device != "cuda" and not device.startswith("cuda:")):
        raise ValueError(f"the GPU check runs on CUDA (got device {device!r}); use --dry-run on a CPU")
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run `bench --gpu --dry-run` to check the code path "
                           "on the CPU, or run on a machine with a GPU")
    from hypersd_core.models.backbone import _quiet_libraries

    _quiet_libraries()
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    result: dict = {"header": machine_header(torch.device(device)), "dry_run": dry_run,
                    "dtype": str(torch_dtype).removeprefix("torch."), "plan": asdict(plan),
                    "models": {}}
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    warnings.filterwarnings("ignore", message=".*invalid value encountered.*")  # random weights
    for kind in plan.models:
        log(f"{kind}: building random full-size weights" if not dry_run else f"{kind}: dry run")
        check = GpuCheck(kind, plan, device, torch_dtype, t0, log)
        result["models"][kind] = check.run()
        del check
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["errors"] = gpu_errors(result)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {out} in {result['seconds']:.0f} s; "
        + (f"{len(result['errors'])} parts failed" if result["errors"] else "no part failed"))
    return result
