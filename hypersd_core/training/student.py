"""What a run trains and how: the stage object, the student LoRA on a frozen base, the
frozen weights' dtype, gradient checkpointing, and the sample grid of the fixed prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from hypersd_core.training.config import StageConfig

STUDENT = "student"  # the adapter name of the LoRA being trained



def make_stage(cfg: StageConfig, backbone):
    """The stage object: ``loss(batch, generator) -> ([B], logs)`` plus optional hooks."""
    if cfg.stage in ("tscd", "lcm", "tcd"):
        from hypersd_core.distill.adversarial import AdversarialTerm
        from hypersd_core.distill.tscd import ConsistencyStage

        disc = None
        if cfg.adv_weight > 0:
            disc = AdversarialTerm(backbone.unet, backbone.alphas_cumprod.to(backbone.device).float(),
                                   backbone.num_train_timesteps, cfg.adv_lr, cfg.adv_hidden,
                                   cfg.adv_heads, cfg.adv_real, cfg.adv_schedule, cfg.grad_accum,
                                   cfg.adv_renoise_span)
        return ConsistencyStage(cfg, backbone, discriminator=disc)
    if cfg.stage == "feedback":
        from hypersd_core.distill.feedback import FeedbackStage

        return FeedbackStage(cfg, backbone)
    if cfg.stage == "dmd":
        from hypersd_core.distill.dmd import DMDStage

        return DMDStage(cfg, backbone)
    raise ValueError(f"unknown stage {cfg.stage!r}")


def schedule_period(cfg: StageConfig) -> int:
    """Trainer steps in one period of a stage's schedule: DMD2's ``critic_steps`` (critic-only
    steps, then a generator step), 2 for PCM's alternating adversarial term (a discriminator
    step, then a student step), else 1. Stages count by the step given to ``begin_step``."""
    if cfg.stage == "dmd":
        return cfg.critic_steps
    if cfg.stage in ("tscd", "tcd") and cfg.adv_weight > 0 and cfg.adv_schedule == "alternate":
        return 2
    return 1


def sample_method(cfg: StageConfig) -> str:
    return {"tscd": "hypersd", "lcm": "lcm", "tcd": "tcd", "feedback": "hypersd",
            "dmd": "hypersd-unified"}[cfg.stage]


@torch.no_grad()
def sample_grid(backbone, cfg: StageConfig, out_path: Path):
    """The fixed prompts/seeds with the current weights, saved as one PNG row; returns images."""
    from PIL import Image

    from hypersd_core.models.sampling import get_recipe, make_scheduler, recipe_eta

    method = sample_method(cfg)
    recipe = get_recipe(method)
    pipe = backbone.pipe
    old = pipe.scheduler
    pipe.scheduler = make_scheduler(backbone, method, cfg.default_sample_steps)
    try:
        eta = recipe_eta(recipe, cfg.default_sample_steps)
        kwargs = {"eta": eta} if eta is not None else {}
        images = pipe(prompt=cfg.sample_prompts, num_inference_steps=cfg.default_sample_steps,
                      guidance_scale=0.0, **kwargs,
                      generator=[torch.Generator().manual_seed(i)
                                 for i in range(len(cfg.sample_prompts))]).images
    finally:
        pipe.scheduler = old
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return images



def frozen_dtype(cfg: StageConfig, use_cuda: bool) -> torch.dtype:
    """The dtype of the frozen weights (UNet, VAE, text encoders); LoRAs stay fp32.

    ``auto``: on CUDA the half type of ``mixed_precision`` (fp32 with "no"), fp32 on
    the CPU. Setting it (e.g. bf16 with mixed_precision=bf16) runs the GPU's dtype path
    on the CPU.
    """
    name = cfg.frozen_dtype
    if name == "auto":
        name = cfg.mixed_precision if use_cuda and cfg.mixed_precision != "no" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def checkpointing_on(cfg: StageConfig, use_cuda: bool) -> bool:
    """Gradient checkpointing: ``auto`` is on with CUDA, off on the CPU."""
    return cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and use_cuda)


# stages that decode latents with gradients through the VAE
VAE_GRAD_STAGES = ("feedback", "dmd")


def enable_checkpointing(backbone, cfg: StageConfig, use_cuda: bool) -> bool:
    """UNet gradient checkpointing, and the VAE's for stages that decode with gradients
    (an SDXL 1024^2 decode with gradients alone holds ~19 GiB of activations)."""
    from hypersd_core.models.checkpointing import adapter_aware_checkpoint

    if not checkpointing_on(cfg, use_cuda):
        return False
    # recomputation under the forward's LoRA state (the discriminator runs adapters off)
    backbone.unet.enable_gradient_checkpointing(adapter_aware_checkpoint)
    if cfg.stage in VAE_GRAD_STAGES:
        backbone.vae.enable_gradient_checkpointing()
    return True


# stages that keep init_adapter as a separate frozen adapter under a new student LoRA
SEPARATE_INIT_STAGES = ("feedback",)


def setup_student(backbone, cfg: StageConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, add the student LoRA (fp32), start it from init_adapter if given."""
    from hypersd_core.models.lora import add_lora, load_lora_into

    for module in (backbone.unet, backbone.vae, backbone.pipe.text_encoder):
        module.requires_grad_(False)
    params = add_lora(backbone.unet, cfg.lora_rank, cfg.lora_alpha, adapter_name=STUDENT)
    if cfg.init_adapter and cfg.stage not in SEPARATE_INIT_STAGES:
        load_lora_into(backbone.unet, cfg.init_adapter, STUDENT)
    backbone.unet.set_adapter(STUDENT)
    return params
