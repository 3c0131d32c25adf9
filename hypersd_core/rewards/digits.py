"""Rewards of the digits world: small CNNs on 32x32 RGB, trained by the project.

They are kept apart from the measuring networks in ``hypersd_core/evalnets.py`` (a
reward that is also the metric would be gamed, not measured). Three models:

* ``digits-quality``: aesthetic-style predictor, in [0,1], conditioned on the prompt's
  colour: real digits in the prompted colour high; the teacher's 1-, 2- and 4-step images
  graded below them in that order; noise, off-hue, blurred, erased, colour-scrambled and
  blank images low (``digits_train.train_quality``). A prompt that is not a digits-world
  caption scores without a colour (the net was trained with the colour dropped too).
* ``digits-alignment``: p(digit = prompted digit) * p(colour = prompted colour), in [0,1].
* ``digits-perception``: ink-mask segmentation + digit label loss against ground
  truth, per sample; lower is better (the digits world's instance-segmentation loss).

Weights: ``assets/digits/rewards/*.safetensors`` (see ``digits_train.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hypersd_core.paths import DIGITS_DIR
from hypersd_core.rewards.base import (
    ImagesLike,
    PromptsLike,
    Reward,
    RewardWeightsMissing,
    to_image_tensor,
)
from hypersd_core.worlds import digits as world

REWARDS_DIR = DIGITS_DIR / "rewards"
FILES = {"digits-quality": "quality.safetensors", "digits-alignment": "alignment.safetensors",
         "digits-perception": "perception.safetensors"}


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: a reward must score each sample independently of its batch
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU()]


class Encoder(nn.Module):
    """[B,C,32,32] (images in [0,1], then any condition planes) -> features [B,4w]."""

    def __init__(self, width: int = 16, in_channels: int = 3):
        super().__init__()
        w = width
        self.net = nn.Sequential(*_block(in_channels, w, 1), *_block(w, 2 * w, 2), *_block(2 * w, 2 * w, 1),
                                 *_block(2 * w, 4 * w, 2), *_block(4 * w, 4 * w, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


COND_DIM = 4  # the prompted colour's RGB and a flag "a colour was given"


class QualityNet(nn.Module):
    """Image (and, if ``conditioned``, the prompted colour [B,4]) -> quality logit [B]."""

    def __init__(self, width: int = 16, conditioned: bool = False):
        super().__init__()
        self.conditioned = conditioned
        self.encoder = Encoder(width, 3 + (COND_DIM if conditioned else 0))
        self.head = nn.Linear(self.encoder.dim, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioned:
            if cond is None:
                cond = x.new_zeros(x.shape[0], COND_DIM)
            planes = cond[:, :, None, None].to(x.dtype).expand(-1, -1, *x.shape[-2:])
            # the encoder maps its input from [0,1] to [-1,1]; the planes go through it too
            x = torch.cat([x, planes], 1)
        return self.head(self.encoder(x))[:, 0]


def colour_condition(prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> [B,4]: the named colour's RGB in [0,1] and 1, or zeros where a prompt is
    not a digits-world caption (quality without a colour)."""
    out = torch.zeros(len(prompts), COND_DIM)
    for i, p in enumerate(prompts):
        try:
            colour, _ = world.parse_caption(p)
        except ValueError:
            continue
        out[i, :3] = torch.tensor(world.COLOURS[colour], dtype=torch.float32) / 255.0
        out[i, 3] = 1.0
    return out


class AlignmentNet(nn.Module):
    """Image -> (digit logits [B,10], colour logits [B,8])."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.encoder = Encoder(width)
        self.digit = nn.Linear(self.encoder.dim, 10)
        self.colour = nn.Linear(self.encoder.dim, len(world.COLOUR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.digit(h), self.colour(h)


class SegNet(nn.Module):
    """Image -> (ink-mask logits [B,H,W], digit logits [B,10]); a tiny encoder-decoder."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.down1 = nn.Sequential(*_block(3, w, 1), *_block(w, w, 1))
        self.down2 = nn.Sequential(*_block(w, 2 * w, 2), *_block(2 * w, 2 * w, 1))
        self.down3 = nn.Sequential(*_block(2 * w, 4 * w, 2), *_block(4 * w, 4 * w, 1))
        self.up2 = nn.Sequential(*_block(4 * w + 2 * w, 2 * w, 1))
        self.up1 = nn.Sequential(*_block(2 * w + w, w, 1))
        self.mask = nn.Conv2d(w, 1, 1)
        self.digit = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = self.down1(x * 2 - 1)
        h2 = self.down2(h1)
        h3 = self.down3(h2)
        u2 = self.up2(torch.cat([F.interpolate(h3, scale_factor=2.0), h2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), h1], 1))
        return self.mask(u1)[:, 0], self.digit(h3.mean((2, 3)))


def at_resolution(x: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] of any size at the nets' 32x32: area-averaged (an image the app
    enlarged nearest-neighbour to 256 px comes back exactly), differentiable."""
    res = (world.RESOLUTION, world.RESOLUTION)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"digits rewards take [B,3,H,W] RGB images, got {list(x.shape)}")
    if x.shape[-2:] == res:
        return x
    return F.interpolate(x, size=res, mode="area")


def _check_size(x: torch.Tensor) -> None:
    if x.shape[-2:] != (world.RESOLUTION, world.RESOLUTION):
        raise ValueError(f"digits rewards take {world.RESOLUTION}x{world.RESOLUTION} images, "
                         f"got {list(x.shape)}")


class DigitsQuality(Reward):
    """Quality in [0,1] (sigmoid of the predictor), given the prompt's colour where the
    net is conditioned (the shipped one is); other prompts score without a colour."""

    name = "digits-quality"
    range = (0.0, 1.0)
    higher_is_better = True
    differentiable = True

    def __init__(self, net: QualityNet | None = None):
        super().__init__()
        self.net = net or QualityNet()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = at_resolution(images)
        if getattr(self.net, "conditioned", False):
            return torch.sigmoid(self.net(images, colour_condition(prompts).to(images.device)))
        return torch.sigmoid(self.net(images))


def parse_prompts(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits-world prompts -> (digits [B] int64, colour ids [B] int64); ValueError otherwise."""
    parsed = [world.parse_caption(p) for p in prompts]
    digits = torch.tensor([d for _, d in parsed], dtype=torch.long)
    colours = torch.tensor([world.COLOUR_NAMES.index(c) for c, _ in parsed], dtype=torch.long)
    return digits, colours


def alignment_probability(digit_logits: torch.Tensor, colour_logits: torch.Tensor,
                          digits: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """p(digit) * p(colour) of the prompted classes: logits [B,10], [B,8], ids [B] -> [B]."""
    p_d = digit_logits.softmax(-1).gather(1, digits[:, None])[:, 0]
    p_c = colour_logits.softmax(-1).gather(1, colours[:, None])[:, 0]
    return p_d * p_c


class DigitsAlignment(Reward):
    """Probability that the image shows the prompted digit in the prompted colour, in [0,1]."""

    name = "digits-alignment"
    range = (0.0, 1.0)
    higher_is_better = True
    differentiable = True

    def __init__(self, net: AlignmentNet | None = None):
        super().__init__()
        self.net = net or AlignmentNet()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        digits, colours = parse_prompts(prompts)
        d_logits, c_logits = self.net(at_resolution(images))
        return alignment_probability(d_logits, c_logits, digits.to(images.device),
                                     colours.to(images.device))


def segmentation_loss(mask_logits: torch.Tensor, digit_logits: torch.Tensor,
                      masks: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """Per-sample mask BCE (pixel mean) + digit cross-entropy.

    Args:
        mask_logits: [B,H,W]; digit_logits: [B,10]; masks: [B,H,W] bool/0-1; digits: [B].
    Returns:
        [B] loss.
    """
    bce = F.binary_cross_entropy_with_logits(mask_logits, masks.to(mask_logits.dtype),
                                             reduction="none").mean((1, 2))
    return bce + F.cross_entropy(digit_logits, digits, reduction="none")


class DigitsPerception(Reward):
    """Segmentation loss against ground-truth masks and digits; lower is better."""

    name = "digits-perception"
    range = None
    higher_is_better = False
    differentiable = True

    def __init__(self, net: SegNet | None = None):
        super().__init__()
        self.net = net or SegNet()

    def loss_tensors(self, images: torch.Tensor, masks: torch.Tensor,
                     digits: torch.Tensor) -> torch.Tensor:
        """images [B,3,32,32] in [0,1], masks [B,32,32], digits [B] -> loss [B]."""
        x = to_image_tensor(images, device=self.device)
        _check_size(x)
        if masks.shape != (x.shape[0], *x.shape[-2:]) or digits.shape != (x.shape[0],):
            raise ValueError(f"masks must be [B,H,W] and digits [B] for images {list(x.shape)}, "
                             f"got {list(masks.shape)} and {list(digits.shape)}")
        mask_logits, digit_logits = self.net(x)
        return segmentation_loss(mask_logits, digit_logits, masks.to(x.device), digits.to(x.device))

    def loss(self, images: ImagesLike, targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Same target dicts as the Mask R-CNN loss (one instance each, label = digit + 1)."""
        x = to_image_tensor(images, device=self.device)
        if len(targets) != x.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {x.shape[0]} images")
        masks = torch.stack([t["masks"].reshape(-1, *x.shape[-2:])[0] for t in targets])
        digits = torch.stack([t["labels"].reshape(-1)[0] - 1 for t in targets]).long()
        if (digits < 0).any() or (digits > 9).any():
            raise ValueError(f"labels must be digit + 1 in 1..10, got {(digits + 1).tolist()}")
        return self.loss_tensors(x, masks, digits)

    def score(self, images: ImagesLike, prompts: PromptsLike | None = None,
              targets: Sequence[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """The loss as a lower-is-better reward; ``targets`` are required."""
        if targets is None:
            raise ValueError("digits-perception needs ground-truth targets: "
                             "score(images, prompts, targets=...) or loss(images, targets)")
        return self.loss(images, targets)


CLASSES: dict[str, tuple[type[Reward], type[nn.Module]]] = {
    "digits-quality": (DigitsQuality, QualityNet),
    "digits-alignment": (DigitsAlignment, AlignmentNet),
    "digits-perception": (DigitsPerception, SegNet),
}


def load_digits_reward(name: str, path: str | Path | None = None,
                       device: str | torch.device = "cpu") -> Reward:
    """One of the digits rewards from ``path`` (file or folder; default: the shipped weights)."""
    from safetensors.torch import load_file

    if name not in CLASSES:
        raise ValueError(f"unknown digits reward {name!r}; known: {sorted(CLASSES)}")
    p = Path(path) if path is not None else REWARDS_DIR
    if p.is_dir() or path is None:
        p = p / FILES[name]
    if not p.is_file():
        raise RewardWeightsMissing(
            f"{name}: no weights at {p}. They ship in {REWARDS_DIR}; rebuild them with "
            "python -c 'from hypersd_core.rewards.digits_train import train_digit_rewards; "
            "train_digit_rewards()'")
    reward_cls, net_cls = CLASSES[name]
    meta = _meta(p.parent).get(name, {})
    kw = {"conditioned": True} if meta.get("conditioned") else {}
    net = net_cls(width=int(meta.get("width", 16)), **kw)
    sd = {k: v.float() for k, v in load_file(str(p)).items()}
    net.load_state_dict(sd, strict=True)
    return reward_cls(net).to(device).freeze()


def _meta(folder: Path) -> dict[str, Any]:
    f = folder / "rewards.json"
    return json.loads(f.read_text()).get("rewards", {}) if f.is_file() else {}


def make_digits_quality(path: str | Path | None = None, device: str | torch.device = "cpu",
                        **kw: Any) -> Reward:
    return load_digits_reward("digits-quality", path, device)


def make_digits_alignment(path: str | Path | None = None, device: str | torch.device = "cpu",
                          **kw: Any) -> Reward:
    return load_digits_reward("digits-alignment", path, device)


def make_digits_perception(path: str | Path | None = None, device: str | torch.device = "cpu",
                           **kw: Any) -> Reward:
    return load_digits_reward("digits-perception", path, device)
