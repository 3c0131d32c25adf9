"""Bench only: one training step of diffusers' LCM-LoRA distillation example, restated.

Source: huggingface/diffusers, ``examples/consistency_distillation/
train_lcm_distill_lora_sd_wds.py`` (commit 07e455f20242cf3763fb0365405c8b7e531a5f35,
Apache-2.0), the loop body of ``main`` ("16. Train!") with its helpers
``scalings_for_boundary_conditions``, ``get_predicted_original_sample``,
``get_predicted_noise``, ``DDIMSolver``, ``encode_prompt`` and its defaults
(``num_ddim_timesteps`` 50, ``w_min`` 5, ``w_max`` 15, l2 loss, ``timestep_scaling_factor``
10, ``max_grad_norm`` 1, AdamW lr 1e-4 / weight decay 1e-2, the PCM LoRA target list).
It is here to time what a user would run instead of our LCM stage, on the same model and
batch; nothing in training imports it.

What follows the example step for step: a separate student UNet copy with a PEFT LoRA
(``get_peft_model``) beside the frozen teacher UNet; per step the text encoder and the
VAE encode (``latent_dist.sample()``); the student forward with gradients; two teacher
forwards (conditional, then unconditional, each batch B) and the DDIM solver step; the
target forward of the online student under ``no_grad``; MSE; backward; clip over
``unet.parameters()``; AdamW step; LR scheduler step. Two deliberate differences, both
so the two sides run the same arithmetic: the LoRA rank and alpha are the compared
stage's (the example defaults to 64 / 64), and autocast follows ``mixed_precision``
(the example's bare ``torch.autocast(device)`` would run the CPU teacher in bf16).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from hypersd_core.models.lora import TARGET_MODULES


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    """LCM's c_skip, c_out (the example's helper)."""
    scaled = timestep_scaling * timestep
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _extract(a, t, shape):
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))


def _x0(out, t, x, alphas, sigmas):  # epsilon prediction
    return (x - _extract(sigmas, t, x.shape) * out) / _extract(alphas, t, x.shape)


class DDIMSolver:
    """The example's DDIM solver over ``ddim_timesteps`` of the training schedule."""

    def __init__(self, alpha_cumprods: np.ndarray, timesteps: int = 1000, ddim_timesteps: int = 50):
        step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        prev = np.asarray([alpha_cumprods[0]] + alpha_cumprods[self.ddim_timesteps[:-1]].tolist())
        self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods_prev = torch.from_numpy(prev)

    def to(self, device):
        self.ddim_timesteps = self.ddim_timesteps.to(device)
        self.ddim_alpha_cumprods_prev = self.ddim_alpha_cumprods_prev.to(device)
        return self

    def ddim_step(self, pred_x0, pred_noise, index):
        a_prev = _extract(self.ddim_alpha_cumprods_prev, index, pred_x0.shape)
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * pred_noise


class DiffusersLCMStep:
    """The example's training step on a loaded backbone's components (see module docstring)."""

    def __init__(self, backbone, lora_rank: int, lora_alpha: float, batch_size: int,
                 mixed_precision: str = "no", w_min: float = 5.0, w_max: float = 15.0,
                 num_ddim_timesteps: int = 50):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig, get_peft_model

        pipe = backbone.pipe
        self.device = backbone.device
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16,
                             "bf16": torch.bfloat16}[mixed_precision]
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        ac = self.noise_scheduler.alphas_cumprod
        self.alpha_schedule = torch.sqrt(ac).to(self.device)
        self.sigma_schedule = torch.sqrt(1 - ac).to(self.device)
        self.solver = DDIMSolver(ac.numpy(), self.noise_scheduler.config.num_train_timesteps,
                                 num_ddim_timesteps).to(self.device)
        self.num_ddim_timesteps, self.w_min, self.w_max = num_ddim_timesteps, w_min, w_max
        self.tokenizer, self.text_encoder, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.vae
        self.teacher_unet = pipe.unet  # frozen
        for m in (self.vae, self.text_encoder, self.teacher_unet):
            m.requires_grad_(False)
        student = copy.deepcopy(self.teacher_unet).float()  # the example loads a second UNet
        student.train()
        self.unet = get_peft_model(student, LoraConfig(r=lora_rank, target_modules=TARGET_MODULES,
                                                       lora_alpha=lora_alpha, lora_dropout=0.0))
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer, num_warmup_steps=500,
                                          num_training_steps=10**6)
        ids = self.tokenizer([""] * batch_size, return_tensors="pt", padding="max_length",
                             max_length=77).input_ids.to(self.device)
        with torch.no_grad():
            self.uncond_prompt_embeds = self.text_encoder(ids)[0]
        enabled = mixed_precision != "no"
        self.autocast_ctx = (torch.autocast(self.device.type, dtype=self.weight_dtype)
                             if enabled else nullcontext())

    def encode_prompt(self, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def step(self, image: torch.Tensor, text: list[str]) -> float:
        """One optimisation step on pixel images [B,3,H,W] in [-1,1] and their captions."""
        image = image.to(self.device, non_blocking=True)
        prompt_embeds = self.encode_prompt(text)
        pixel_values = image.to(dtype=self.weight_dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample()
        latents = (latents * self.vae.config.scaling_factor).to(self.weight_dtype)
        bsz = latents.shape[0]
        topk = self.noise_scheduler.config.num_train_timesteps // self.num_ddim_timesteps
        index = torch.randint(0, self.num_ddim_timesteps, (bsz,), device=latents.device).long()
        start_timesteps = self.solver.ddim_timesteps[index]
        timesteps = torch.clamp(start_timesteps - topk, min=0)
        c_skip_start, c_out_start = [x.reshape(bsz, 1, 1, 1) for x in
                                     scalings_for_boundary_conditions(start_timesteps)]
        c_skip, c_out = [x.reshape(bsz, 1, 1, 1) for x in scalings_for_boundary_conditions(timesteps)]
        noise = torch.randn_like(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, start_timesteps)
        w = ((self.w_max - self.w_min) * torch.rand((bsz,)) + self.w_min).reshape(bsz, 1, 1, 1)
        w = w.to(device=latents.device, dtype=latents.dtype)
        a, s = self.alpha_schedule, self.sigma_schedule
        noise_pred = self.unet(noisy, start_timesteps, timestep_cond=None,
                               encoder_hidden_states=prompt_embeds.float(), added_cond_kwargs={}).sample
        model_pred = c_skip_start * noisy + c_out_start * _x0(noise_pred, start_timesteps, noisy, a, s)
        with torch.no_grad(), self.autocast_ctx:
            x_in = noisy.to(self.weight_dtype)
            cond = self.teacher_unet(x_in, start_timesteps,
                                     encoder_hidden_states=prompt_embeds.to(self.weight_dtype)).sample
            uncond = self.teacher_unet(x_in, start_timesteps,
                                       encoder_hidden_states=self.uncond_prompt_embeds.to(self.weight_dtype)).sample
            cond_x0, uncond_x0 = _x0(cond, start_timesteps, noisy, a, s), _x0(uncond, start_timesteps, noisy, a, s)
            pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
            pred_noise = cond + w * (cond - uncond)
            x_prev = self.solver.ddim_step(pred_x0, pred_noise, index)
        with torch.no_grad():
            with self.autocast_ctx:
                target_noise_pred = self.unet(x_prev.float(), timesteps, timestep_cond=None,
                                              encoder_hidden_states=prompt_embeds.float()).sample
            target = c_skip * x_prev + c_out * _x0(target_noise_pred, timesteps, x_prev, a, s)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
