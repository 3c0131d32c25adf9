"""The adversarial term of TSCD: a discriminator made of the frozen teacher UNet's
encoder features (read by forward hooks, not a copied forward) and small trainable
heads, in latent space at noisy timesteps (SDXL-Lightning / PCM style), hinge loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hypersd_core.distill import schedule as S
from hypersd_core.distill.optim import OwnStep


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss relu(1 - D(real)) + relu(1 + D(fake)). [B]"""
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss -D(fake). [B]"""
    return -fake_logits


def renoise_time(edge: torch.Tensor, k: int, num_train_timesteps: int,
                 generator: torch.Generator | None = None, span: int = 0) -> torch.Tensor:
    """t' uniform in [edge, edge + span) (clean edges start at 0), below T; span 0: T/k.

    A shorter span keeps the discriminator's inputs less noisy: with k=1 and span T, most
    real and fake inputs are near-pure noise and no head can tell them apart."""
    span = span or num_train_timesteps // k
    lo = edge.clamp(min=0)
    u = torch.rand(edge.shape, generator=generator).to(edge.device)
    return (lo + torch.floor(u * span).long()).clamp(max=num_train_timesteps - 1)


class _Stop(Exception):
    pass


class TeacherFeatureDiscriminator(torch.nn.Module):
    """Heads on the teacher UNet's down-block and mid-block features.

    The UNet's forward stops after the mid block (a hook raises), so the decoder is
    never run. Only the heads are trainable; gradients still reach the input latents.
    """

    def __init__(self, unet, hidden: int = 64):
        super().__init__()
        self.unet = [unet]  # not a submodule: its weights are the teacher's, frozen
        blocks = [*unet.down_blocks, unet.mid_block]
        channels = [blk.resnets[-1].out_channels for blk in blocks]
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Conv2d(c, hidden, 3, padding=1),
                torch.nn.GroupNorm(min(32, hidden // 4), hidden), torch.nn.SiLU(),
                torch.nn.Conv2d(hidden, 1, 1))
            for c in channels)
        self._features: list[torch.Tensor] = []
        self._blocks = blocks

    def _hook(self, last: bool):
        def hook(module, args, output):
            self._features.append(output[0] if isinstance(output, tuple) else output)
            if last:
                raise _Stop
        return hook

    def logits(self, x: torch.Tensor, t: torch.Tensor, embeds) -> torch.Tensor:
        """D(x_t, t, c): mean of the heads' spatially averaged outputs. [B]"""
        from hypersd_core.models.lora import adapters_disabled

        unet = self.unet[0]
        self._features = []
        handles = [blk.register_forward_hook(self._hook(i == len(self._blocks) - 1))
                   for i, blk in enumerate(self._blocks)]
        try:
            with adapters_disabled(unet):
                unet(x, t, **embeds.unet_kwargs())
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        feats = self._features
        self._features = []
        return torch.stack([head(f.float()).mean((1, 2, 3))
                            for head, f in zip(self.heads, feats)]).mean(0)


class AdversarialTerm:
    """Generator-side hinge loss and the discriminator's own update (its own optimiser)."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, num_train_timesteps: int,
                 lr: float = 1e-5, hidden: int = 64):
        self.disc = TeacherFeatureDiscriminator(unet, hidden).to(unet.device)
        self.optimizer = torch.optim.AdamW(self.disc.heads.parameters(), lr=lr,
                                           betas=(0.0, 0.999), weight_decay=0.0)
        # loss scaling under fp16, gradients averaged over processes
        self.own_step = OwnStep(self.optimizer, list(self.disc.heads.parameters()))
        self.ac = alphas_cumprod
        self.T = num_train_timesteps
        self._pending: tuple | None = None
        self.renoise_span = 0  # 0: the segment, T/k (the stage sets adv_renoise_span)

    def generator_loss(self, fake_edge, real_x0, edge, k, embeds, generator):
        """Re-noise the fake (the student's jump to the segment edge) from the edge to t',
        noise the real (clean training latents of the same prompts) straight to t', each
        with its own noise, and score the fake. ([B], logs)

        Real is data, not the consistency target: a "real" made from the student's own
        target with the fake's noise differs from the fake only by the consistency
        error, so the discriminator had nothing to learn (hinge loss stayed at 2).
        """
        t = renoise_time(edge, k, self.T, generator, self.renoise_span)
        device = fake_edge.device
        noise_fake = torch.randn(fake_edge.shape, generator=generator).to(device)
        noise_real = torch.randn(fake_edge.shape, generator=generator).to(device)
        a_edge, a_t = S.alpha_bar(self.ac, edge), S.alpha_bar(self.ac, t)
        fake_t = S.renoise(fake_edge, noise_fake, a_edge, a_t)
        real_t = S.add_noise(real_x0.detach().to(fake_t.dtype), noise_real, a_t)
        self._pending = (real_t.detach(), fake_t.detach(), t, embeds, edge)
        g = hinge_g_loss(self.disc.logits(fake_t, t, embeds))
        return g, {"loss_adv_g": g.mean().item()}

    def discriminator_step(self) -> dict[str, float]:
        """One hinge-loss step of the heads on the last batch's real and fake samples;
        logs the loss (chance: 2) and the share of real / fake it classifies right."""
        if self._pending is None:
            return {}
        real_t, fake_t, t, embeds, edge = self._pending
        self._pending = None
        real_logits = self.disc.logits(real_t, t, embeds)
        fake_logits = self.disc.logits(fake_t, t, embeds)
        per = hinge_d_loss(real_logits, fake_logits)
        self.own_step(per.mean())
        logs = {"loss_adv_d": per.mean().item(),
                "adv_acc_real": (real_logits > 0).float().mean().item(),
                "adv_acc_fake": (fake_logits < 0).float().mean().item()}
        edges = edge.clamp(min=0).detach().cpu()
        if len(edges.unique()) > 1:  # per segment edge: which segments it can tell apart
            for e in edges.unique().tolist():
                logs[f"adv_d_edge{e}"] = per.detach().cpu()[edges == e].mean().item()
        return logs

    def state_dict(self) -> dict:
        return {"heads": self.disc.heads.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
