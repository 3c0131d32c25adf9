"""Smoke training of every stage type on a full-size random-weight model (the GPU check).

Each stage runs 2 steps at batch 1 with its preset's other settings (LoRA rank, CFG
range, adversarial weight, DMD critic/MSE/multistep settings) through the trainer's own
pieces: ``setup_student``, ``make_stage``, the stage's ``setup``, ``enable_checkpointing``,
the same autocast around the loss and the after-step hook. Peak memory is measured per
stage from a clean state (only the frozen model resident).

What differs from ``train``: the batch is random latents with a fixed prompt (no data
folder), init adapters are not loaded (there is none for random weights), and the
rewards (ImageReward, aesthetic: weights not shipped) are replaced by a stand-in with the
same interface: a differentiable score of the decoded image at 224^2, so the VAE decode
with gradients is real; the reward models' own memory is not counted.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from hypersd_core.bench.measure import PeakMemory

# name -> (preset stem, overrides): every stage type
SMOKE_STAGES: dict[str, tuple[str, dict]] = {
    "tscd": ("tscd-k8", {}),
    "tscd_adv": ("tscd-k1", {}),
    "lcm": ("tscd-k8", {"stage": "lcm"}),
    "tcd": ("tscd-k8", {"stage": "tcd"}),
    "feedback": ("feedback", {}),
    # critic_steps 2: step 1 is critic-only, step 2 updates the generator too
    "dmd": ("dmd", {"critic_steps": 2}),
}
STEPS = 2


class StandInReward:
    """Stands in for a CLIP/BLIP reward: mean of the image resized to 224^2. [B]"""

    def score(self, images01: torch.Tensor, prompts=None) -> torch.Tensor:
        x = F.interpolate(images01.float(), size=(224, 224), mode="bilinear", align_corners=False)
        return x.mean((1, 2, 3))


def use_stand_in_rewards(stage) -> None:
    """Swap a made stage's rewards (if it has any) for the stand-in."""
    losses = getattr(stage, "losses", None)
    if losses is not None and losses.rewards:
        losses.rewards = {n: StandInReward() for n in losses.rewards}


def smoke_config(kind: str, stage_name: str, mixed_precision: str, frozen: str,
                 model: str | None = None):
    """The preset's config with batch 1, 2 steps, checkpointing on, no init adapter."""
    from hypersd_core.training.config import load_preset

    preset, extra = SMOKE_STAGES[stage_name]
    overrides = {"model": model or f"random:{kind}", "batch_size": 1, "grad_accum": 1,
                 "steps": STEPS, "init_adapter": "", "mixed_precision": mixed_precision,
                 "frozen_dtype": frozen, "gradient_checkpointing": "on", **extra}
    cfg = load_preset(f"{kind}-{preset}", overrides)
    if cfg.rewards:  # a loadable reward; swapped for the stand-in after the stage is made
        cfg.rewards = {"digits-quality": 1e-3}
        cfg.reward_alphas = {}
    return cfg


def _teardown(backbone) -> None:
    unet = backbone.unet
    names = list(getattr(unet, "peft_config", {}) or {})
    if names:
        unet.delete_adapters(names)
    for module in (unet, backbone.vae):
        if getattr(module, "gradient_checkpointing", False):
            module.disable_gradient_checkpointing()
    unet.zero_grad(set_to_none=True)


def smoke_stage(backbone, stage_name: str, mixed_precision: str, res: int,
                prompt: str = "a photo of a red bicycle leaning against a brick wall") -> dict:
    """Two training steps of one stage type; peak memory and the second step's time."""
    from hypersd_core.training.data import Batch
    from hypersd_core.training.trainer import enable_checkpointing, make_stage, setup_student

    device = backbone.device
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(backbone.dtype, "fp32")
    cfg = smoke_config(backbone.kind, stage_name, mixed_precision, dtype_name)
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16,
                                                  "fp16": torch.float16}[mixed_precision])
    scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
    f = backbone.pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(1, 4, res // f, res // f, generator=g).to(device),
                  backbone.encode_prompt([prompt]), backbone.encode_prompt([prompt], negative=True),
                  [prompt], torch.zeros(1, 3, res, res, device=device))
    try:
        with PeakMemory(device) as mem:
            params = setup_student(backbone, cfg)
            stage = make_stage(cfg, backbone)
            if hasattr(stage, "setup"):
                params = stage.setup(params)
            use_stand_in_rewards(stage)
            enable_checkpointing(backbone, cfg, use_cuda=True)
            optimizer = torch.optim.AdamW(params, lr=cfg.lr)
            times, losses, generator_steps = [], [], 0
            for step in range(STEPS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                if hasattr(stage, "begin_step"):
                    stage.begin_step(step)
                with autocast:
                    loss, _ = stage.loss(batch, torch.Generator().manual_seed(step))
                if loss is not None:
                    loss = loss.float().mean()
                    (scaler.scale(loss) if scaler else loss).backward()
                    if scaler:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    losses.append(loss.detach())
                    generator_steps += 1
                if hasattr(stage, "after_step"):
                    with autocast:
                        stage.after_step(step)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        finite = bool(torch.isfinite(torch.stack(losses)).all()) if losses else None
        return {"preset": f"{backbone.kind}-{SMOKE_STAGES[stage_name][0]}",
                "overrides": {k: v for k, v in SMOKE_STAGES[stage_name][1].items()},
                "stage": cfg.stage, "lora_rank": cfg.lora_rank, "adv_weight": cfg.adv_weight,
                "steps": STEPS, "generator_steps": generator_steps, "loss_finite": finite,
                "step_ms": [round(1000 * t, 1) for t in times],
                "peak_mb": round(mem.peak_mb), "memory_kind": mem.as_dict()["kind"],
                "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
                "rewards": "stand-in (decoded image at 224^2)" if cfg.rewards else None}
    finally:
        _teardown(backbone)
        if device.type == "cuda":
            torch.cuda.empty_cache()
