"""The one-step full UNet: the unified stage's losses with every UNet weight trained.

Hyper-SD releases a one-step UNet beside its LoRAs, sampled with LCMScheduler at
timesteps=[800]. The generator here is a full copy of the UNet (not a LoRA) mapping
noise at ``one_step_t`` (800) to x0 in one step. Its losses are those of the unified
stage (``distill/dmd.py``): the DMD2 distribution-matching gradient (real score = the
frozen teacher with CFG, fake score = a LoRA on the frozen teacher trained online on
detached generator samples), MSE to the TSCD k=1 consistency target, and the feedback
rewards. The teacher UNet stays frozen; only the fake-score LoRA lives on it.
"""

from __future__ import annotations

import torch

from hypersd_core.distill import schedule as S
from hypersd_core.distill.dmd import (
    DM_T_RANGE,
    FAKE,
    cfg_standard,
    dmd_and_reward_loss,
    fake_score_loss,
)
from hypersd_core.distill.optim import OwnStep
from hypersd_core.distill.tscd import sample_t_end, target_jump, teacher_ddim_step, tscd_loss


class OneStepUNetStage:
    """DMD2 + consistency MSE + rewards on a full student UNet.

    Args:
        cfg: a StageConfig (dmd fields: one_step_t, dmd_weight, dmd_real_guidance,
            fake_rank, fake_lr, mse_weight, w_min/w_max, num_solver_steps, rewards, ...).
        backbone: the base model; its UNet becomes the frozen teacher (plus fake LoRA).
        student: the trainable full UNet (e.g. the base UNet with the unified LoRA fused).
    """

    def __init__(self, cfg, backbone, student):
        from hypersd_core.distill.feedback import FeedbackLosses
        from hypersd_core.models.lora import add_lora

        self.cfg = cfg
        self.backbone = backbone
        self.teacher = backbone.unet.requires_grad_(False)
        self.student = student.float().train().requires_grad_(True)
        self.ac = backbone.alphas_cumprod.to(backbone.device).float()
        self.T = backbone.num_train_timesteps
        self.pred_type = backbone.prediction_type
        self.grid = S.solver_grid(self.T, cfg.num_solver_steps).to(backbone.device)
        self.losses = FeedbackLosses(cfg, backbone)
        self.fake_params = add_lora(self.teacher, cfg.fake_rank, float(cfg.fake_rank),
                                    adapter_name=FAKE)
        self.fake_optimizer = torch.optim.AdamW(self.fake_params, lr=cfg.fake_lr, weight_decay=0.0)
        self.fake_step = OwnStep(self.fake_optimizer, self.fake_params, cfg.grad_clip)

    # ---------------------------------------------------------------- models
    def _x0(self, out, x_t, t):
        return S.predictions(out, x_t, S.alpha_bar(self.ac, t), self.pred_type)[0]

    def _teacher(self, x_t, t, embeds, fake: bool):
        """The frozen teacher (fake=False: LoRA off) or the fake score (LoRA on)."""
        if fake:
            self.teacher.enable_adapters()
            self.teacher.set_adapter(FAKE)
        else:
            self.teacher.disable_adapters()
        try:
            return self.teacher(x_t, t, **embeds.unet_kwargs()).sample
        finally:
            self.teacher.enable_adapters()

    def generate(self, batch, generator: torch.Generator) -> torch.Tensor:
        """The student's one-step x0 from pure noise at one_step_t. [B,4,h,w]"""
        shape, device = batch.latents.shape, batch.latents.device
        x_t = torch.randn(shape, generator=generator).to(device)
        t = torch.full((shape[0],), self.cfg.one_step_t, dtype=torch.long, device=device)
        return self._x0(self.student(x_t, t, **batch.embeds.unet_kwargs()).sample, x_t, t)

    # ---------------------------------------------------------------- losses
    def fake_update(self, batch, generator: torch.Generator) -> dict:
        """One eps-MSE step of the fake score on detached student samples."""
        with torch.no_grad():
            x0 = self.generate(batch, generator)
        t = torch.randint(0, self.T, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        a_t = S.alpha_bar(self.ac, t)
        x_t = S.add_noise(x0, noise, a_t)
        eps = S.predictions(self._teacher(x_t, t, batch.embeds, fake=True), x_t, a_t,
                            self.pred_type)[1]
        loss = fake_score_loss(eps, noise).mean()
        self.fake_step(loss)  # clip, step; averaged over the processes of a distributed run
        return {"loss_fake": loss.item()}

    @torch.no_grad()
    def scores(self, x0, batch, generator: torch.Generator):
        """(x0_real, x0_fake) of x0 re-noised to t ~ U[20, 980]."""
        b = x0.shape[0]
        t = torch.randint(DM_T_RANGE[0], DM_T_RANGE[1] + 1, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = S.add_noise(x0, noise, S.alpha_bar(self.ac, t))
        both = batch.embeds.cat(batch.uncond)
        out_c, out_u = self._teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), both,
                                     fake=False).chunk(2)
        x0_real = self._x0(cfg_standard(out_c, out_u, self.cfg.dmd_real_guidance), x_t, t)
        x0_fake = self._x0(self._teacher(x_t, t, batch.embeds, fake=True), x_t, t)
        return x0_real, x0_fake

    def consistency_loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        """TSCD k=1 (as the unified stage's mse term): the student's jump from t_n to t_end
        against its own (no-grad) jump from the teacher's DDIM step t_{n-1}. [B]"""
        cfg, x0 = self.cfg, batch.latents
        b, device = x0.shape[0], x0.device
        n = torch.randint(0, len(self.grid), (b,), generator=generator).to(device)
        t_n = self.grid[n]
        t_prev = torch.where(n > 0, self.grid[(n - 1).clamp(min=0)], torch.full_like(t_n, S.CLEAN))
        noise = torch.randn(x0.shape, generator=generator).to(device)
        a_n, a_prev = S.alpha_bar(self.ac, t_n), S.alpha_bar(self.ac, t_prev)
        x_n = S.add_noise(x0, noise, a_n)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=generator)).to(device)
        with torch.no_grad():
            both = batch.embeds.cat(batch.uncond)
            out_c, out_u = self._teacher(torch.cat([x_n, x_n]), torch.cat([t_n, t_n]), both,
                                         fake=False).chunk(2)
            x_prev = teacher_ddim_step(x_n, out_c, out_u, w, a_n, a_prev, self.pred_type)
            t_in = t_prev.clamp(min=0)
            g_x0, g_eps = S.predictions(self.student(x_prev, t_in, **batch.embeds.unet_kwargs())
                                        .sample, x_prev, S.alpha_bar(self.ac, t_in), self.pred_type)
        s_x0, s_eps = S.predictions(self.student(x_n, t_n, **batch.embeds.unet_kwargs()).sample,
                                    x_n, a_n, self.pred_type)
        edge = S.segment_lower_edge(t_n, 1, self.T)
        t_end = sample_t_end(t_prev, edge, cfg.t_end, generator)
        a_end = S.alpha_bar(self.ac, t_end)
        target = target_jump(x_prev, g_x0, g_eps, t_prev, a_end)
        return tscd_loss(s_x0, s_eps, target, a_end, cfg.distance, cfg.huber_c)

    def loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Fake-score update, then the student's loss [B] (DMD + rewards + mse)."""
        cfg = self.cfg
        logs = self.fake_update(batch, generator)
        x0 = self.generate(batch, generator)
        loss = dmd_and_reward_loss(self, x0, batch, generator, logs)
        if cfg.mse_weight > 0:
            c_loss = self.consistency_loss(batch, generator)
            loss = loss + cfg.mse_weight * c_loss
            logs["loss_mse"] = c_loss.mean().item()
        return loss, logs
