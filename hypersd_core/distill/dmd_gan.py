"""DMD2's GAN branch (Yin et al. 2024, "Improved Distribution Matching Distillation",
section 4.2; tianweiy/DMD2 main/sd_guidance.py): a classifier on the fake score's
bottleneck features, trained with real data as "real" and generator samples as "fake"
beside the fake score's own denoising loss; the generator takes the non-saturating loss
softplus(-D(G(z))).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hypersd_core.distill import schedule as S
from hypersd_core.distill.features import block_channels, block_outputs


def cls_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)) per sample (sd_guidance.py:391). [B]"""
    return F.softplus(fake_logits) + F.softplus(-real_logits)


def cls_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating loss softplus(-D(fake)) (sd_guidance.py:323). [B]"""
    return F.softplus(-fake_logits)


def bottleneck_size(unet) -> int:
    """Side of the bottleneck map at the UNet's sample size (one halving per
    downsampling encoder block)."""
    halvings = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
    return max(1, int(unet.config.sample_size) >> halvings)


class ClassifierHead(torch.nn.Module):
    """DMD2's ``cls_pred_branch``: stride-2 4x4 convs (GroupNorm, SiLU) down to 4x4, a 4x4
    conv to 1x1, a 1x1 conv to one logit (sd_guidance.py:107-133: 8 -> 4 -> 1 on SD1.5,
    32 -> 16 -> 8 -> 4 -> 1 on SDXL). [B,C,s,s] -> [B]; at another input size the
    remaining map is averaged."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        layers: list[torch.nn.Module] = []
        groups = math.gcd(32, channels)
        while size > 4:
            layers += [torch.nn.Conv2d(channels, channels, 4, 2, 1),
                       torch.nn.GroupNorm(groups, channels), torch.nn.SiLU()]
            size //= 2
        layers += [torch.nn.Conv2d(channels, channels, size, size, 0),
                   torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
                   torch.nn.Conv2d(channels, 1, 1)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature.float()).mean((1, 2, 3))


class BottleneckClassifier(torch.nn.Module):
    """D(x) = head(bottleneck of the fake score at (x_t, t, c)) with t = 0 on the clean
    sample (``cls_on_clean_image``) or, with ``t_max`` > 0, x noised to t ~ U[0, t_max)
    (DMD2's ``diffusion_gan``; sd_guidance.py:145-165). The fake score's adapter must be
    the active one."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, t_max: int = 0):
        super().__init__()
        self.unet = [unet]  # not a submodule: the fake score is trained by its own stage
        self.head = ClassifierHead(block_channels(unet.mid_block), bottleneck_size(unet))
        self.ac = alphas_cumprod
        self.t_max = t_max

    def forward(self, x0: torch.Tensor, embeds, generator: torch.Generator) -> torch.Tensor:
        b, device = x0.shape[0], x0.device
        if self.t_max > 0:
            t = torch.randint(0, self.t_max, (b,), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            x = S.add_noise(x0, noise, S.alpha_bar(self.ac, t))
        else:
            t, x = torch.zeros(b, dtype=torch.long, device=device), x0
        unet = self.unet[0]
        feature = block_outputs(unet, [unet.mid_block], x, t, embeds.unet_kwargs())[0]
        return self.head(feature)
