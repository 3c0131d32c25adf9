"""Train the digits one-step UNet (``hypersd-unet``): every UNet weight, the unified
stage's losses, one step from t=800 (LCMScheduler timesteps=[800]).

The student starts from the base UNet with the shipped unified LoRA fused into it (the
full-UNet variant of the same stage); the settings are the ``digits-dmd`` preset's with
``one_step_t=800`` and no multi-step starts (the recipe samples one step only).
Saved in diffusers' UNet format, fp16, in ``assets/digits/hypersd-unet``;
``python -m hypersd_core build-onestep-unet`` rebuilds it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hypersd_core.models.unet import DIGITS_ONESTEP_UNET, save_unet
from hypersd_core.paths import DIGITS_ADAPTERS, DIGITS_PIPELINE

INIT_ADAPTER = DIGITS_ADAPTERS / "hypersd-unified"


@dataclass
class OneStepConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-5  # full weights: a fifth of the LoRA stage's rate
    warmup: int = 20
    one_step_t: int = 800
    seed: int = 0
    max_seconds: float = 0.0  # > 0: stop after this long (steps_done is recorded)


def fused_student(init_adapter: str | Path | None = INIT_ADAPTER, device="cpu"):
    """The base UNet (fp32) with a LoRA folder fused into its weights (None: the base)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DIGITS_PIPELINE, safety_checker=None,
                                                   requires_safety_checker=False)
    if init_adapter:
        pipe.load_lora_weights(str(init_adapter))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe.unet.to(device=device, dtype=torch.float32)


def train_onestep_unet(cfg: OneStepConfig, device: str = "cpu", init_adapter=INIT_ADAPTER,
                       log=print):
    """Returns (student UNet, seconds, last logs with steps_done); the UNet is None on the
    processes that do not hold the gathered weights (ZeRO-3: all but rank 0).

    Under ``accelerate launch`` the student goes through ``accelerator.prepare``: data
    parallel, FSDP (assets/accelerate/fsdp-onestep-unet*.yaml, also on the CPU) or
    DeepSpeed ZeRO-2/3 (CUDA). Each process draws its own batches; the returned UNet
    holds the whole weights (gathered from the shards).
    """
    from hypersd_core.distill.onestep_unet import OneStepUNetStage
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.training import collective
    from hypersd_core.training.config import load_preset
    from hypersd_core.training.data import DigitsData
    from hypersd_core.training.engines import full_state_dict, make_accelerator

    accelerator = make_accelerator(use_cuda=device.startswith("cuda"))
    device = str(accelerator.device) if accelerator.num_processes > 1 else device
    rank = accelerator.process_index
    torch.manual_seed(cfg.seed)
    # its recipe as measured: the unified stage's settings before DMD2's (MSE to the k=1
    # target on, the fake score at twice the rate); one critic update per step
    stage_cfg = load_preset("digits-dmd", {"one_step_t": cfg.one_step_t, "multistep_prob": 0.0,
                                           "batch_size": cfg.batch_size, "steps": cfg.steps,
                                           "mse_weight": 1.0, "fake_lr": 2.0e-4})
    backbone = load_backbone("digits", device=device)
    student = fused_student(init_adapter, device)
    stage = OneStepUNetStage(stage_cfg, backbone, student)
    data = DigitsData(backbone)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    student, opt = accelerator.prepare(student, opt)  # one process: unchanged
    stage.student = student
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    # each process its own stream (a CPU generator uses a seed's low 32 bits); rank 0 the
    # one-process one
    gen = torch.Generator().manual_seed((cfg.seed + rank * 1_000_003) % 2**32)
    logs: dict = {}
    t0 = time.perf_counter()
    step = -1
    for step in range(cfg.steps):
        if cfg.max_seconds and collective.agree(time.perf_counter() - t0 > cfg.max_seconds):
            step -= 1
            break
        batch = data.sample(cfg.batch_size, gen)
        with accelerator.autocast():  # the launcher's mixed precision (none by default)
            loss, logs = stage.loss(batch, gen)
        loss = loss.float().mean()
        if collective.agree(not torch.isfinite(loss)):  # every process raises, or none
            raise FloatingPointError(f"non-finite loss at step {step}: {logs}")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)  # gradients averaged (and sharded) by the engine
        accelerator.clip_grad_norm_(student.parameters(), stage_cfg.grad_clip)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            log(f"onestep step {step} loss {loss.item():.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                + f" {time.perf_counter() - t0:.0f} s")
    logs["steps_done"] = step + 1
    seconds = time.perf_counter() - t0
    if accelerator.num_processes > 1:  # whole weights in a plain UNet (ZeRO-3: on rank 0 only)
        from diffusers import UNet2DConditionModel

        config = accelerator.unwrap_model(student).config
        state = full_state_dict(accelerator, student)
        if not state:
            return None, seconds, logs
        # the whole weights into a plain UNet of the same config (no second pipeline load)
        student = UNet2DConditionModel.from_config(config)
        student.load_state_dict(state)
    return student.eval().requires_grad_(False), seconds, logs


def build_onestep_unet(out: str | Path = DIGITS_ONESTEP_UNET, cfg: OneStepConfig | None = None,
                       device: str = "cpu", log=print) -> dict:
    from hypersd_core.training import collective
    from hypersd_core.training.engines import launcher_engine

    cfg = cfg or OneStepConfig()
    student, seconds, logs = train_onestep_unet(cfg, device, log=log)
    out = Path(out)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"cpu, {torch.get_num_threads()} thread(s)"
    info = {"config": asdict(cfg), "preset": "digits-dmd", "init": str(INIT_ADAPTER.name),
            "seconds": round(seconds, 1), "device": where,
            "last_logs": {k: round(v, 5) for k, v in logs.items()}}
    if collective.world() > 1:
        info.update(processes=collective.world(), engine=launcher_engine())
    if collective.rank() == 0:  # one writer; every process holds the same weights
        save_unet(student, out, torch.float16)
        (out / "training.json").write_text(json.dumps(info, indent=1))
        log(f"wrote {out}: {json.dumps(info)}")
    return info
