"""The adversarial term of TSCD as PCM does it (Wang et al. 2024, "Phased Consistency
Model"; code/text_to_image_sd15/discriminator_sd15.py and train_pcm_lora_sd15_adv.py):

* the discriminator is the frozen teacher UNet's feature maps after every encoder,
  middle and decoder block, each read by several small conv heads (4 in PCM);
* the hinge is applied per pixel of every head's logit map (no pooling before it);
  the generator's loss is relu(1 - D(fake));
* "fake" is the student's jump to the segment edge, "real" the target's jump from the
  teacher's step to the same edge (``adv_real: target``) or the training latents
  (``data``), each carried from the edge to t' in [edge, edge + T/k) with its own noise;
* D and G steps alternate (``adv_schedule: alternate``): even optimizer steps train the
  heads only, odd steps the student with consistency + adversarial loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hypersd_core.distill import schedule as S
from hypersd_core.distill.features import all_blocks, block_channels, block_outputs, no_grad_for
from hypersd_core.distill.optim import OwnStep

ADV_REALS = ("target", "data")
ADV_SCHEDULES = ("alternate", "joint")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge relu(1 - D(real)) + relu(1 + D(fake)), element by element
    (PCM discriminator_sd15.py:421-423). Same shape as the logits."""
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge relu(1 - D(fake)), element by element (PCM discriminator_sd15.py:431)."""
    return F.relu(1 - fake_logits)


def mean_over_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: the mean over heads of each head's mean over its pixels. [B]
    (PCM sums the heads' means and divides by their count)."""
    return torch.stack([m.float().flatten(1).mean(1) for m in maps]).mean(0)


def renoise_time(edge: torch.Tensor, k: int, num_train_timesteps: int,
                 generator: torch.Generator | None = None, span: int = 0) -> torch.Tensor:
    """t' uniform in [edge, edge + span) (clean edges start at 0), below T; span 0: T/k
    (PCM train_pcm_lora_sd15_adv.py:1290-1297)."""
    span = span or num_train_timesteps // k
    lo = edge.clamp(min=0)
    u = torch.rand(edge.shape, generator=generator).to(edge.device)
    return (lo + torch.floor(u * span).long()).clamp(max=num_train_timesteps - 1)


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class DiscriminatorHead(torch.nn.Module):
    """PCM's head: conv3x3-GN-LeakyReLU, a residual conv3x3-GN-LeakyReLU, conv1x1 -> one
    logit per pixel. ``hidden`` 0 keeps the map's channels (PCM); [B,C,h,w] -> [B,1,h,w]."""

    def __init__(self, channels: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or channels
        self.conv1 = torch.nn.Sequential(torch.nn.Conv2d(channels, hidden, 3, 1, 1),
                                         torch.nn.GroupNorm(_groups(hidden), hidden),
                                         torch.nn.LeakyReLU())
        self.conv2 = torch.nn.Sequential(torch.nn.Conv2d(hidden, hidden, 3, 1, 1),
                                         torch.nn.GroupNorm(_groups(hidden), hidden),
                                         torch.nn.LeakyReLU())
        self.conv_out = torch.nn.Conv2d(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv_out(self.conv2(x) + x)


class TeacherFeatureDiscriminator(torch.nn.Module):
    """``heads_per_map`` heads on each encoder, middle and decoder block output of the
    frozen teacher UNet (its LoRA adapters off). Only the heads are trainable; gradients
    still reach the input latents."""

    def __init__(self, unet, hidden: int = 0, heads_per_map: int = 4):
        super().__init__()
        self.unet = [unet]  # not a submodule: its weights are the teacher's, frozen
        self.blocks = all_blocks(unet)
        self.heads = torch.nn.ModuleList(
            torch.nn.ModuleList(DiscriminatorHead(block_channels(b), hidden)
                                for _ in range(heads_per_map))
            for b in self.blocks)

    def maps(self, x: torch.Tensor, t: torch.Tensor, embeds) -> list[torch.Tensor]:
        """Every head's logit map D(x_t, t, c), [B,1,h,w] each (maps x heads of them)."""
        from hypersd_core.models.lora import adapters_disabled

        unet = self.unet[0]
        with adapters_disabled(unet):
            feats = block_outputs(unet, self.blocks, x, t, embeds.unet_kwargs())
        return [h(f.float()) for f, heads in zip(feats, self.heads) for h in heads]


class AdversarialTerm:
    """The generator's hinge loss and the heads' own update (their own optimiser, betas
    (0, 0.999) as PCM), accumulated over the micro-batches of a step."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, num_train_timesteps: int,
                 lr: float = 1e-5, hidden: int = 0, heads_per_map: int = 4,
                 real: str = "target", schedule: str = "alternate", grad_accum: int = 1,
                 renoise_span: int = 0):
        if real not in ADV_REALS or schedule not in ADV_SCHEDULES:
            raise ValueError(f"adv_real must be one of {ADV_REALS} and adv_schedule one of "
                             f"{ADV_SCHEDULES}, got {real!r}, {schedule!r}")
        self.disc = TeacherFeatureDiscriminator(unet, hidden, heads_per_map).to(unet.device)
        self.params = list(self.disc.heads.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.0, 0.999),
                                           weight_decay=0.0)
        self.own_step = OwnStep(self.optimizer, self.params)  # fp16 scaling, all-reduce
        self.ac = alphas_cumprod
        self.T = num_train_timesteps
        self.real, self.schedule = real, schedule
        self.grad_accum = grad_accum
        self.renoise_span = renoise_span
        self.d_logs: list[dict[str, float]] = []

    def d_turn(self, step: int) -> bool:
        """PCM: even optimizer steps train the discriminator only (global_step % 2 == 0)."""
        return self.schedule == "alternate" and step % 2 == 0

    def g_turn(self, step: int) -> bool:
        return self.schedule == "joint" or step % 2 == 1

    def _noised(self, x_edge, edge, t, generator, clean_data: bool = False):
        """x carried from the edge to t' with its own noise draw (PCM's ``noise_travel``);
        clean data goes to t' directly."""
        noise = torch.randn(x_edge.shape, generator=generator).to(x_edge.device)
        a_t = S.alpha_bar(self.ac, t)
        if clean_data:
            return S.add_noise(x_edge, noise, a_t)
        return S.renoise(x_edge, noise, S.alpha_bar(self.ac, edge), a_t)

    def _d_loss(self, fake_edge, real, edge, k, embeds, generator):
        """(per-sample hinge [B], logs) of the heads on one batch."""
        t = renoise_time(edge, k, self.T, generator, self.renoise_span)
        fake_t = self._noised(fake_edge.detach().float(), edge, t, generator)
        real_t = self._noised(real.detach().float(), edge, t, generator,
                              clean_data=self.real == "data")
        real_maps = self.disc.maps(real_t, t, embeds)
        fake_maps = self.disc.maps(fake_t, t, embeds)
        per = mean_over_maps([hinge_d_loss(r, f) for r, f in zip(real_maps, fake_maps)])
        with torch.no_grad():
            logs = {"loss_adv_d": per.mean().item(),
                    "adv_acc_real": torch.cat([(m > 0).flatten() for m in real_maps]).float().mean().item(),
                    "adv_acc_fake": torch.cat([(m < 0).flatten() for m in fake_maps]).float().mean().item()}
            edges = edge.clamp(min=0).cpu()
            if len(edges.unique()) > 1:  # per segment edge: which segments it can tell apart
                for e in edges.unique().tolist():
                    logs[f"adv_d_edge{e}"] = per.detach().cpu()[edges == e].mean().item()
        return per, logs

    def accumulate_d(self, fake_edge, real, edge, k, embeds, generator) -> torch.Tensor:
        """The heads' hinge loss on this micro-batch [B]; its gradient is accumulated for
        ``step``. ``real`` is the target's edge jump, or clean latents with adv_real=data."""
        per, logs = self._d_loss(fake_edge, real, edge, k, embeds, generator)
        self.own_step.accumulate(per.mean() / self.grad_accum)
        self.d_logs.append(logs)
        return per.detach()

    @torch.no_grad()
    def evaluate_d(self, fake_edge, real, edge, k, embeds, generator) -> dict[str, float]:
        """The heads' hinge loss and per-pixel accuracies on a batch, no update (held-out
        checks)."""
        return self._d_loss(fake_edge, real, edge, k, embeds, generator)[1]

    def generator_loss(self, fake_edge, edge, k, embeds, generator):
        """relu(1 - D(fake)) per pixel, averaged per sample ([B], logs); the heads get no
        gradient from it."""
        t = renoise_time(edge, k, self.T, generator, self.renoise_span)
        fake_t = self._noised(fake_edge, edge, t, generator)
        with no_grad_for(self.params):
            g = mean_over_maps([hinge_g_loss(m) for m in self.disc.maps(fake_t, t, embeds)])
        return g, {"loss_adv_g": g.mean().item()}

    def begin_step(self) -> None:
        self.own_step.zero_grad()
        self.d_logs = []

    def step(self) -> dict[str, float]:
        """The heads' update from this step's micro-batches (none if they had no D turn);
        logs the hinge loss (chance: 2) and the share of real / fake pixels it gets right."""
        if not self.own_step.pending:
            return {}
        self.own_step.step()
        logs = {key: sum(d[key] for d in self.d_logs if key in d)
                / sum(1 for d in self.d_logs if key in d)
                for key in {k for d in self.d_logs for k in d}}
        self.d_logs = []
        return logs

    def state_dict(self) -> dict:
        return {"heads": self.disc.heads.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
