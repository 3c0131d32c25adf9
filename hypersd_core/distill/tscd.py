"""Trajectory-segmented consistency distillation (Hyper-SD section 3.1, Algorithm 1)
and the LCM / TCD baselines, which use the same machinery.

The top half is pure tensor functions; the bottom half (``ConsistencyStage``) wires
them to the UNet for the trainer. Every loss is per sample, [B].
"""

from __future__ import annotations

import torch

from hypersd_core.distill import schedule as S


def sample_t_end(t_prev: torch.Tensor, edge: torch.Tensor, mode: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """t_end of Algorithm 1: uniform integer in [edge, t_{n-1}] ("uniform", the paper's)
    or the segment's lower edge itself ("edge")."""
    if mode == "edge":
        return edge.clone()
    if mode != "uniform":
        raise ValueError(f"t_end mode must be 'uniform' or 'edge', got {mode!r}")
    u = S.draw(torch.rand, t_prev.shape, generator=generator, device=t_prev.device)
    return edge + torch.floor(u * (t_prev - edge + 1)).long()


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "mse",
             huber_c: float = 0.001) -> torch.Tensor:
    """Per-sample MSE, or pseudo-Huber sqrt(d^2 + c^2) - c averaged over elements. [B]"""
    d = (a.float() - b.float()).flatten(1)
    if kind == "mse":
        return d.square().mean(1)
    if kind == "huber":
        return ((d.square() + huber_c**2).sqrt() - huber_c).mean(1)
    raise ValueError(f"distance must be 'mse' or 'huber', got {kind!r}")


def teacher_ddim_step(x_t: torch.Tensor, out_cond: torch.Tensor, out_uncond: torch.Tensor,
                      w: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
                      prediction_type: str = "epsilon") -> torch.Tensor:
    """The teacher's one CFG step t_n -> t_{n-1} (LCM-form guidance, DDIM solver)."""
    x0_c, eps_c = S.predictions(out_cond, x_t, a_t, prediction_type)
    x0_u, eps_u = S.predictions(out_uncond, x_t, a_t, prediction_type)
    x0 = S.cfg_lcm_form(x0_c, x0_u, w)
    eps = S.cfg_lcm_form(eps_c, eps_u, w)
    return S.ddim_jump(x0, eps, a_prev)


def edge_weight(a_t: torch.Tensor, a_end: torch.Tensor) -> torch.Tensor:
    """d x_end / d x0 of a DDIM jump t -> end at fixed x_t (eps = (x_t - sqrt(a_t) x0) /
    sqrt(1 - a_t)): sqrt(a_e) - sqrt(1 - a_e) sqrt(a_t / (1 - a_t)). A student's x0 error
    reaches the edge-space loss multiplied by its square: about 0.005 in k=8's first
    segment against about 0.9 in the last. [B]"""
    return a_end.sqrt() - (1 - a_end).sqrt() * (a_t / (1 - a_t)).sqrt()


def tscd_loss(student_x0: torch.Tensor, student_eps: torch.Tensor, x_end_target: torch.Tensor,
              a_end: torch.Tensor, kind: str = "mse", huber_c: float = 0.001,
              a_t: torch.Tensor | None = None, scale_min: float = 0.0) -> torch.Tensor:
    """TSCD target, Hyper-SD Algorithm 1: d(student jump t_n -> t_end, target jump
    t_{n-1} -> t_end); the student jumps by DDIM with its own x0/eps predictions. [B]

    With ``a_t`` (alpha_bar at t_n) and ``scale_min`` > 0 the distance is divided by
    max(edge_weight^2, scale_min): the loss of x0 errors on one scale for every segment
    (as LCM's and TCD's losses are), instead of edge space.
    """
    x_end_student = S.ddim_jump(student_x0, student_eps, a_end)
    d = distance(x_end_student, x_end_target.detach(), kind, huber_c)
    if a_t is not None and scale_min > 0:
        d = d / edge_weight(a_t.float(), a_end.float()).square().clamp(min=scale_min)
    return d


def target_jump(x_prev: torch.Tensor, target_x0: torch.Tensor, target_eps: torch.Tensor,
                t_prev: torch.Tensor, a_end: torch.Tensor) -> torch.Tensor:
    """The target's jump t_{n-1} -> t_end; from t_{n-1} = clean it stays at x_{t_{n-1}}."""
    jumped = S.ddim_jump(target_x0, target_eps, a_end)
    clean = (t_prev < 0).view(-1, *[1] * (x_prev.dim() - 1))
    return torch.where(clean, x_prev, jumped)


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor,
                    last_layer: torch.nn.Parameter, max_ratio: float = 10.0) -> torch.Tensor:
    """Dynamic weighting of the adversarial term (VQGAN, Esser et al. 2021, eq. 7):
    ||grad_L rec|| / (||grad_L adv|| + 1e-4) at the last layer L, clamped to
    [0, max_ratio] and detached, so the adversarial gradient there is as large as the
    consistency gradient times adv_weight whatever the two losses' raw scales."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_ratio).detach()


def lcm_consistency(x_t, x0_pred, t) -> torch.Tensor:
    """LCM's consistency function f(x_t, t) = c_skip x_t + c_out x0_pred."""
    c_skip, c_out = S.lcm_boundary_scalings(t.clamp(min=0))
    view = (-1, *[1] * (x_t.dim() - 1))
    return c_skip.to(x_t.dtype).view(view) * x_t + c_out.to(x_t.dtype).view(view) * x0_pred


class ConsistencyStage:
    """One training step of TSCD (k segments), LCM, or TCD on a Backbone's UNet.

    The student is the UNet with its LoRA; the teacher is the same UNet with adapters
    disabled; the target is the student under no_grad ("online") or its EMA weights.
    """

    def __init__(self, cfg, backbone, target=None, discriminator=None):
        self.cfg = cfg
        self.backbone = backbone
        self.unet = backbone.unet
        self.ac = backbone.alphas_cumprod.to(backbone.device).float()
        self.T = backbone.num_train_timesteps
        self.grid = S.solver_grid(self.T, cfg.num_solver_steps).to(backbone.device)
        self.pred_type = backbone.prediction_type
        self.target = target  # callable(x, t, embeds) -> model output, or None for online
        self.discriminator = discriminator
        self.step = 0  # the trainer's optimizer step (begin_step): D and G turns alternate by it
        self.params: list[torch.nn.Parameter] = []
        self.ema: list[torch.Tensor] | None = None

    def unet_out(self, x, t, embeds):
        return self.unet(x, t, **embeds.unet_kwargs()).sample

    def setup(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Trainer hook: keep the student's parameters; start the EMA target if asked."""
        self.params = params
        self.ema = ([p.detach().clone() for p in params] if self.cfg.target == "ema" else None)
        if self.ema is not None:
            self.target = self._ema_out
        return params

    @torch.no_grad()
    def _ema_out(self, x, t, embeds):
        """The target model with the EMA weights swapped in for one forward pass."""
        live = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, self.ema):
            p.copy_(e)
        try:
            return self.unet_out(x, t, embeds)
        finally:
            for p, v in zip(self.params, live):
                p.copy_(v)

    @property
    def adversarial(self):
        """The adversarial term when it is on (TSCD and TCD; LCM's loss has none)."""
        return (self.discriminator if self.cfg.adv_weight > 0 and self.cfg.stage != "lcm"
                else None)

    def begin_step(self, step: int) -> None:
        """Trainer hook before the micro-batches of optimizer step ``step``."""
        self.step = step
        if self.adversarial is not None:
            self.adversarial.begin_step()

    def after_step(self, step: int) -> dict[str, float]:
        """After the student's update: EMA target update and the discriminator's own step
        (from every micro-batch of the step that trained it)."""
        logs: dict[str, float] = {}
        if self.ema is not None and not self._d_only(step):
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1 - self.cfg.ema_decay)
        if self.adversarial is not None:
            logs.update(self.adversarial.step())
        self.step = step + 1  # a caller without begin_step still alternates
        return logs

    def _d_only(self, step: int) -> bool:
        """A step that trains the discriminator only (PCM's even steps)."""
        return self.adversarial is not None and self.adversarial.d_turn(step)

    def state_dict(self) -> dict:
        state: dict = {}
        if getattr(self, "ema", None) is not None:
            state["ema"] = [e.cpu() for e in self.ema]
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "ema" in state and getattr(self, "ema", None) is not None:
            for e, v in zip(self.ema, state["ema"]):
                e.copy_(v)
        if "discriminator" in state and self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])

    def _forward(self, batch, generator: torch.Generator, student_grad: bool = True):
        """The teacher's CFG step t_n -> t_{n-1}, the target's and the student's predictions."""
        from types import SimpleNamespace

        from hypersd_core.models.lora import adapters_disabled

        cfg = self.cfg
        x0 = batch.latents
        b, device = x0.shape[0], x0.device
        n = torch.randint(0, len(self.grid), (b,), generator=generator).to(device)
        t_n = self.grid[n]
        t_prev = torch.where(n > 0, self.grid[(n - 1).clamp(min=0)], torch.full_like(t_n, S.CLEAN))
        noise = S.offset_noise(torch.randn(x0.shape, generator=generator).to(device),
                               cfg.offset_noise, generator)
        a_n, a_prev = S.alpha_bar(self.ac, t_n), S.alpha_bar(self.ac, t_prev)
        x_n = S.add_noise(x0, noise, a_n)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=generator)).to(device)

        with torch.no_grad(), adapters_disabled(self.unet):
            both = batch.embeds.cat(batch.uncond)
            out = self.unet(torch.cat([x_n, x_n]), torch.cat([t_n, t_n]), **both.unet_kwargs()).sample
            out_c, out_u = out.chunk(2)
            x_prev = teacher_ddim_step(x_n, out_c, out_u, w, a_n, a_prev, self.pred_type)

        with torch.no_grad():  # the target before the student: an EMA swap is in-place
            t_prev_in = t_prev.clamp(min=0)
            target_out = (self.target or self.unet_out)(x_prev, t_prev_in, batch.embeds)
            g_x0, g_eps = S.predictions(target_out, x_prev, S.alpha_bar(self.ac, t_prev_in),
                                        self.pred_type)
            clean = (t_prev < 0).view(-1, *[1] * (x0.dim() - 1))
        with torch.set_grad_enabled(student_grad and torch.is_grad_enabled()):
            student_out = self.unet_out(x_n, t_n, batch.embeds)
        s_x0, s_eps = S.predictions(student_out, x_n, a_n, self.pred_type)
        return SimpleNamespace(x0=x0, x_n=x_n, t_n=t_n, a_n=a_n, t_prev=t_prev, t_prev_in=t_prev_in,
                               x_prev=x_prev, g_x0=g_x0, g_eps=g_eps, clean=clean,
                               s_x0=s_x0, s_eps=s_eps)

    def _adversarial_pair(self, f, edge: torch.Tensor, x_end_target: torch.Tensor):
        """(fake, real) at the segment edge: the student's jump, and the target's jump from
        the teacher's step (PCM) or the training latents (adv_real=data)."""
        a_edge = S.alpha_bar(self.ac, edge)
        fake = S.ddim_jump(f.s_x0, f.s_eps, a_edge)
        if self.adversarial.real == "data":
            return fake, f.x0
        real = x_end_target if self.cfg.t_end == "edge" else target_jump(
            f.x_prev, f.g_x0, f.g_eps, f.t_prev, a_edge)
        return fake, real

    def loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor | None, dict]:
        """Per-sample generator loss [B] and logs for one batch of latents and prompts;
        None on a discriminator-only step (its loss is accumulated for ``after_step``)."""
        cfg = self.cfg
        d_only = self._d_only(self.step)
        f = self._forward(batch, generator, student_grad=not d_only)
        logs: dict[str, float] = {}
        if cfg.stage == "lcm":
            f_student = lcm_consistency(f.x_n, f.s_x0, f.t_n)
            f_target = torch.where(f.clean, f.x_prev, lcm_consistency(f.x_prev, f.g_x0, f.t_prev_in))
            loss = distance(f_student, f_target, cfg.distance, cfg.huber_c)
            logs["loss_consistency"] = loss.mean().item()
            return loss, logs

        k = 1 if cfg.stage == "tcd" else cfg.k
        edge = S.segment_lower_edge(f.t_n, k, self.T)
        t_end = sample_t_end(f.t_prev, edge, cfg.t_end, generator)
        a_end = S.alpha_bar(self.ac, t_end)
        x_end_target = target_jump(f.x_prev, f.g_x0, f.g_eps, f.t_prev, a_end)
        scale_min = cfg.loss_scale_min if cfg.loss_scale == "x0" else 0.0
        loss = tscd_loss(f.s_x0, f.s_eps, x_end_target, a_end, cfg.distance, cfg.huber_c,
                         a_t=f.a_n, scale_min=scale_min)
        logs["loss_consistency"] = loss.mean().item()
        adv = self.adversarial
        if adv is None:
            return loss, logs
        fake, real = self._adversarial_pair(f, edge, x_end_target)
        if not adv.g_turn(self.step) or adv.schedule == "joint":
            adv.accumulate_d(fake, real, edge, k, batch.embeds, generator)
        if d_only:
            return None, logs
        g, g_logs = adv.generator_loss(fake, edge, k, batch.embeds, generator)
        weight = cfg.adv_weight
        if cfg.adv_dynamic:
            ratio = adaptive_weight(loss.mean(), g.mean(), self.last_layer(), cfg.adv_dynamic_max)
            weight = weight * ratio
            g_logs["adv_dynamic_ratio"] = float(ratio)
        logs.update(g_logs)
        return loss + weight * g, logs

    @torch.no_grad()
    def discriminator_check(self, batch, generator: torch.Generator) -> dict[str, float]:
        """The discriminator's hinge loss and accuracies on a batch it does not train on."""
        cfg = self.cfg
        f = self._forward(batch, generator, student_grad=False)
        k = 1 if cfg.stage == "tcd" else cfg.k
        edge = S.segment_lower_edge(f.t_n, k, self.T)
        a_edge = S.alpha_bar(self.ac, edge)
        x_edge_target = target_jump(f.x_prev, f.g_x0, f.g_eps, f.t_prev, a_edge)
        fake, real = self._adversarial_pair(f, edge, x_edge_target)
        return self.adversarial.evaluate_d(fake, real, edge, k, batch.embeds, generator)

    def last_layer(self) -> torch.nn.Parameter:
        """The student's trainable tensor closest to the output (VQGAN's "last layer")."""
        if not self.params:
            raise RuntimeError("adv_dynamic needs the student's parameters (call setup first)")
        return self.params[-1]

    def score_samples(self, images, prompts: list[str]) -> dict[str, float]:
        """Reward scores of the fixed sample grid (digits world: quality and alignment)."""
        from hypersd_core.rewards.reward_log import SampleScorer, sample_reward_names

        if getattr(self, "_scorer", None) is None:
            self._scorer = SampleScorer(sample_reward_names(self.cfg, self.backbone.kind),
                                        self.backbone.device)
        return self._scorer(images, prompts)
