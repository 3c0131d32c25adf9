"""One-step distillation by distribution matching (Hyper-SD section 3.3, after DMD /
DMD2: Yin et al. 2024, "Improved Distribution Matching Distillation"; code
tianweiy/DMD2 main/sd_guidance.py and main/train_sd.py).

The generator (the student LoRA) maps noise at t = ``one_step_t`` to x0 in one step.
Its distribution is pulled to the teacher's by the DM gradient: the difference of two
denoisers on the re-noised sample, the *real score* (teacher with CFG) and the *fake
score* (a second LoRA on the same base UNet, trained online on detached generator
samples with the eps-MSE of ordinary diffusion training). DMD2's two time scales
(train_sd.py:330, ``dfake_gen_update_ratio``): every optimizer step updates the fake
score once, from all of the step's micro-batches; every ``critic_steps``-th step also
updates the generator. DMD2's GAN branch (``dmd_cls_weight``, ``dmd_gan_weight``;
distill/dmd_gan.py): a classifier on the fake score's bottleneck, trained with the fake
score on data ("real") against generator samples, and the generator's non-saturating
loss. Optional beside them: regression to the TSCD k=1 consistency target
(``mse_weight``; DMD2 drops it once TTUR and the GAN are on) and the feedback losses
(``rewards``, ``perceptual_weight``).

Result: the unified Hyper-SD LoRA, sampled with TCDScheduler at 1-8 steps; with
``multistep_prob`` > 0 part of each batch starts at a later TCD timestep from a
re-noised one-step sample (DMD2's backward simulation), as multi-step TCD sees it.
"""

from __future__ import annotations

import dataclasses

import torch

from hypersd_core.distill import schedule as S
from hypersd_core.distill.dmd_gan import BottleneckClassifier, cls_d_loss, cls_g_loss
from hypersd_core.distill.features import no_grad_for
from hypersd_core.distill.optim import OwnStep

FAKE = "fake"  # adapter name of the fake score
DM_T_RANGE = (20, 980)  # DMD2: min_step = 0.02 T, max_step = 0.98 T


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching gradient, in float64 (DMD eq. 7, DMD2 eq. 2):

        grad = (x0_fake - x0_real) / mean|x - x0_real|   (mean per sample)

    ``x`` is the generator's clean output, x0_real / x0_fake the two denoisers' estimates
    from its re-noised version. [B,...] -> [B,...] float64, non-finite entries zeroed.
    """
    x, x0_real, x0_fake = x.double(), x0_real.double(), x0_fake.double()
    weight = (x - x0_real).abs().flatten(1).mean(1).view(-1, *[1] * (x.dim() - 1))
    return torch.nan_to_num((x0_fake - x0_real) / weight, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """DMD2's surrogate 0.5 * MSE(x, (x - grad).detach()), per sample; its gradient with
    respect to x is grad / numel. [B]"""
    target = (x.double() - grad).detach()
    return 0.5 * (x.double() - target).square().flatten(1).mean(1).float()


def fake_score_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score on generator samples: eps-MSE per sample. [B]"""
    return (eps_pred.float() - noise.float()).square().flatten(1).mean(1)


def cfg_standard(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance out_u + s (out_c - out_u) (the real score, DMD2 CFG scale s)."""
    return out_uncond + scale * (out_cond - out_uncond)


def multistep_start_timesteps(scheduler_config, max_steps: int) -> torch.Tensor:
    """The later timesteps TCD visits at 2..max_steps steps (999 excluded), sorted. [M] long"""
    from diffusers import TCDScheduler

    sched = TCDScheduler.from_config(scheduler_config)
    ts: set[int] = set()
    for n in range(2, max_steps + 1):
        sched.set_timesteps(n)
        ts.update(int(t) for t in sched.timesteps[1:])
    return torch.tensor(sorted(ts), dtype=torch.long)


def dmd_and_reward_loss(stage, x0: torch.Tensor, batch, generator: torch.Generator,
                        logs: dict) -> torch.Tensor:
    """The one-step generator's DMD term plus its reward terms [B], shared by the LoRA stage
    and the full-UNet stage (``stage`` has ``cfg``, ``scores`` and ``losses``); logs in place."""
    cfg = stage.cfg
    loss = torch.zeros(x0.shape[0], device=x0.device)
    if cfg.dmd_weight > 0:
        x0_real, x0_fake = stage.scores(x0.detach(), batch, generator)
        dm = dmd_loss(x0, dm_gradient(x0.detach(), x0_real, x0_fake))
        loss = loss + cfg.dmd_weight * dm
        logs["loss_dmd"] = dm.mean().item()
    if stage.losses.rewards:
        r_loss, r_logs = stage.losses.reward_loss(stage.losses.decode(x0), batch.prompts)
        loss = loss + r_loss
        logs.update(r_logs)
    return loss


class DMDStage:
    """DMD2 training of the student LoRA with a fake-score LoRA on the same UNet (and,
    with ``dmd_cls_weight`` > 0, DMD2's classifier head on its bottleneck).

    Counted in optimizer steps, as DMD2 counts them: each step updates the fake score
    (and classifier) once, from every micro-batch of the step; the generator is updated
    on every ``critic_steps``-th step (the others return None: no student update), so
    the fake score takes ``critic_steps`` updates per generator update whatever
    ``grad_accum`` is.
    """

    def __init__(self, cfg, backbone):
        from hypersd_core.distill.feedback import FeedbackLosses
        from hypersd_core.distill.tscd import ConsistencyStage
        from hypersd_core.rewards.reward_log import SampleScorer, sample_reward_names

        self.cfg = cfg
        self.backbone = backbone
        self.unet = backbone.unet
        self.ac = backbone.alphas_cumprod.to(backbone.device).float()
        self.T = backbone.num_train_timesteps
        self.pred_type = backbone.prediction_type
        self.consistency = None
        if cfg.mse_weight > 0:  # the TSCD k=1 target: one segment, jump to clean
            self.consistency = ConsistencyStage(
                dataclasses.replace(cfg, stage="tscd", k=1, adv_weight=0.0), backbone)
        self.losses = FeedbackLosses(cfg, backbone)
        self.scorer = SampleScorer(sample_reward_names(cfg, backbone.kind), backbone.device,
                                   self.losses.rewards)
        self.starts = multistep_start_timesteps(backbone.pipe.scheduler.config,
                                                cfg.multistep_max).to(backbone.device)
        self.step = 0
        self.fake_params: list[torch.nn.Parameter] = []
        self.guidance_params: list[torch.nn.Parameter] = []  # fake score + classifier head
        self.classifier: BottleneckClassifier | None = None
        self.fake_optimizer: torch.optim.Optimizer | None = None
        self.fake_step: OwnStep | None = None
        self.critic_updates = 0  # fake-score optimizer steps so far (this process)
        self._logs: list[dict[str, float]] = []

    # ---------------------------------------------------------------- setup and state
    def setup(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Add the fake score: a LoRA on the base UNet (zero delta: it starts as the
        teacher), and DMD2's classifier head on its bottleneck."""
        from hypersd_core.models.lora import add_lora

        self.fake_params = add_lora(self.unet, self.cfg.fake_rank, float(self.cfg.fake_rank),
                                    adapter_name=FAKE)
        self.guidance_params = list(self.fake_params)
        groups = [{"params": self.fake_params, "lr": self.cfg.fake_lr}]
        if self.cfg.dmd_cls_weight > 0:
            self.classifier = BottleneckClassifier(self.unet, self.ac, self.cfg.dmd_cls_t_max)
            self.classifier.to(self.backbone.device)
            head = list(self.classifier.head.parameters())
            self.guidance_params += head
            # DMD2 trains the head at the guidance rate; dmd_cls_lr lets a short run train
            # a freshly initialised head faster
            groups.append({"params": head, "lr": self.cfg.dmd_cls_lr or self.cfg.fake_lr})
        self.fake_optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.fake_step = OwnStep(self.fake_optimizer, self.guidance_params, self.cfg.grad_clip)
        self.unet.set_adapter("student")
        return params

    def state_dict(self) -> dict:
        from hypersd_core.models.lora import lora_state_dict

        state = {"fake": {k: v.detach().cpu() for k, v in lora_state_dict(self.unet, FAKE).items()},
                 "fake_optimizer": self.fake_optimizer.state_dict(), "step": self.step,
                 "critic_updates": self.critic_updates}
        if self.classifier is not None:
            state["classifier"] = self.classifier.head.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, state["fake"], adapter_name=FAKE)
        if self.classifier is not None:
            if "classifier" not in state:
                raise ValueError("the checkpoint has no DMD2 classifier head (trained with "
                                 "dmd_cls_weight=0); resume it with dmd_cls_weight=0")
            self.classifier.head.load_state_dict(state["classifier"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
        self.step = int(state["step"])
        self.critic_updates = int(state.get("critic_updates", self.step))
        self.unet.set_adapter("student")

    def generator_turn(self, step: int) -> bool:
        """DMD2's two time scales: the generator is updated after every ``critic_steps``
        fake-score updates (steps critic_steps - 1, 2 critic_steps - 1, ...)."""
        return (step + 1) % self.cfg.critic_steps == 0

    def begin_step(self, step: int) -> None:
        """Trainer hook before the micro-batches of optimizer step ``step``."""
        self.step = step
        self.fake_step.zero_grad()
        self._logs = []

    def after_step(self, step: int) -> dict:
        """The fake score's (and classifier's) one update from this step's micro-batches."""
        logs: dict[str, float] = {}
        if self.fake_step.pending:
            self.fake_step.step()
            self.critic_updates += 1
            keys = {k for d in self._logs for k in d}
            logs = {k: sum(d[k] for d in self._logs if k in d)
                    / sum(1 for d in self._logs if k in d) for k in keys}
            logs["critic_updates"] = self.critic_updates
        self._logs = []
        self.step = step + 1
        return logs

    # ---------------------------------------------------------------- models
    def _out(self, x_t, t, embeds):
        return self.unet(x_t, t, **embeds.unet_kwargs()).sample

    def _x0(self, out, x_t, t):
        return S.predictions(out, x_t, S.alpha_bar(self.ac, t), self.pred_type)[0]

    def generate(self, batch, generator: torch.Generator) -> torch.Tensor:
        """The generator's x0 [B,4,h,w]: one step from noise at one_step_t, or (with
        multistep_prob) from a re-noised one-step sample at a later TCD timestep."""
        shape, device = batch.latents.shape, batch.latents.device
        b = shape[0]
        x_t = torch.randn(shape, generator=generator).to(device)
        t = torch.full((b,), self.cfg.one_step_t, dtype=torch.long, device=device)
        if self.cfg.multistep_prob > 0:
            later = torch.rand(b, generator=generator).to(device) < self.cfg.multistep_prob
            idx = torch.randint(0, len(self.starts), (b,), generator=generator).to(device)
            noise = torch.randn(shape, generator=generator).to(device)
            if later.any():
                with torch.no_grad():
                    x0_first = self._x0(self._out(x_t, t, batch.embeds), x_t, t)
                t_later = self.starts[idx]
                x_later = S.add_noise(x0_first, noise, S.alpha_bar(self.ac, t_later))
                view = later.view(-1, *[1] * (len(shape) - 1))
                x_t = torch.where(view, x_later, x_t)
                t = torch.where(later, t_later, t)
        return self._x0(self._out(x_t, t, batch.embeds), x_t, t)

    def _fake_active(self):
        """The fake score's adapter on for a block (the student's back on after it)."""
        import contextlib

        @contextlib.contextmanager
        def active():
            self.unet.set_adapter(FAKE)
            try:
                yield
            finally:
                self.unet.set_adapter("student")
        return active()

    def guidance_accumulate(self, x0: torch.Tensor, batch, generator: torch.Generator) -> dict:
        """The fake score's eps-MSE on detached generator samples (t ~ U[0, T)) plus, with
        the classifier, dmd_cls_weight times its loss on data ("real") against those
        samples ("fake"); the gradient is accumulated for this step's one update
        (sd_guidance.py:257-310, 369-427)."""
        x0 = x0.detach()
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        a_t = S.alpha_bar(self.ac, t)
        x_t = S.add_noise(x0, noise, a_t)
        logs: dict[str, float] = {}
        with self._fake_active():
            eps = S.predictions(self._out(x_t, t, batch.embeds), x_t, a_t, self.pred_type)[1]
            loss = fake_score_loss(eps, noise).mean()
            logs["loss_fake"] = loss.item()
            if self.classifier is not None:
                real_logits = self.classifier(batch.latents.to(x0.dtype), batch.embeds, generator)
                fake_logits = self.classifier(x0, batch.embeds, generator)
                cls = cls_d_loss(real_logits, fake_logits).mean()
                loss = loss + self.cfg.dmd_cls_weight * cls
                logs.update(loss_cls=cls.item(),
                            cls_acc_real=(real_logits > 0).float().mean().item(),
                            cls_acc_fake=(fake_logits < 0).float().mean().item())
            self.fake_step.accumulate(loss / self.cfg.grad_accum)
        self._logs.append(logs)
        return logs

    @torch.no_grad()
    def classifier_check(self, batch, generator: torch.Generator) -> dict[str, float]:
        """The classifier's loss and accuracies on data against fresh generator samples it
        does not train on (held-out checks)."""
        x0 = self.generate(batch, generator)
        with self._fake_active():
            real_logits = self.classifier(batch.latents.to(x0.dtype), batch.embeds, generator)
            fake_logits = self.classifier(x0, batch.embeds, generator)
        return {"loss_cls": cls_d_loss(real_logits, fake_logits).mean().item(),
                "cls_acc_real": (real_logits > 0).float().mean().item(),
                "cls_acc_fake": (fake_logits < 0).float().mean().item()}

    def gan_generator_loss(self, x0: torch.Tensor, batch, generator: torch.Generator):
        """softplus(-D(x0)) through the fake score and head, whose weights get no gradient
        from it (DMD2 zeroes the guidance gradients after the generator step). [B]"""
        with self._fake_active(), no_grad_for(self.guidance_params):
            return cls_g_loss(self.classifier(x0, batch.embeds, generator))

    @torch.no_grad()
    def scores(self, x0: torch.Tensor, batch, generator: torch.Generator):
        """(x0_real, x0_fake) of x0 re-noised to t ~ U[20, 980]."""
        from hypersd_core.models.lora import adapters_disabled

        b = x0.shape[0]
        t = torch.randint(DM_T_RANGE[0], DM_T_RANGE[1] + 1, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = S.add_noise(x0, noise, S.alpha_bar(self.ac, t))
        with adapters_disabled(self.unet):
            both = batch.embeds.cat(batch.uncond)
            out_c, out_u = self._out(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        x0_real = self._x0(cfg_standard(out_c, out_u, self.cfg.dmd_real_guidance), x_t, t)
        self.unet.set_adapter(FAKE)
        try:
            x0_fake = self._x0(self._out(x_t, t, batch.embeds), x_t, t)
        finally:
            self.unet.set_adapter("student")
        return x0_real, x0_fake

    # ---------------------------------------------------------------- the step
    def loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor | None, dict]:
        """This micro-batch's share of the fake score's update; on a generator turn also
        the generator loss [B] (DM + GAN + optional MSE and feedback terms), else None."""
        cfg = self.cfg
        turn = self.generator_turn(self.step)
        with torch.set_grad_enabled(turn):
            x0 = self.generate(batch, generator)
        logs = dict(self.guidance_accumulate(x0, batch, generator))  # samples before the update
        if not turn:
            return None, logs
        loss = dmd_and_reward_loss(self, x0, batch, generator, logs)
        if self.classifier is not None and cfg.dmd_gan_weight > 0:
            gan = self.gan_generator_loss(x0, batch, generator)
            loss = loss + cfg.dmd_gan_weight * gan
            logs["loss_gan_g"] = gan.mean().item()
        if self.losses.perception is not None:
            from hypersd_core.distill.feedback import perceptual_x0

            x0_p = perceptual_x0(lambda x, t, e: self._x0(self._out(x, t, e), x, t), batch,
                                 cfg.perceptual_t_range, self.ac, generator)
            p_loss, p_logs = self.losses.perceptual_loss(self.losses.decode(x0_p), batch)
            loss = loss + cfg.perceptual_weight * p_loss
            logs.update(p_logs)
        if self.consistency is not None:
            c_loss, c_logs = self.consistency.loss(batch, generator)
            loss = loss + cfg.mse_weight * c_loss
            logs["loss_mse"] = c_logs["loss_consistency"]
        return loss, logs

    def score_samples(self, images, prompts: list[str]) -> dict[str, float]:
        return self.scorer(images, prompts)
