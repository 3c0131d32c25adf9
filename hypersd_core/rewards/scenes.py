"""Rewards of the scenes world: small CNNs on 64x64 RGB, trained by the project on the
``reward`` split of scenes (disjoint from the model's training scenes and from the
evaluation nets' scenes), so the feedback stage never optimises what evaluation measures.

- ``scenes-quality`` in [0, 1]: how clean an image looks. A regression on graded
  degradations of real renders (Gaussian noise, blur, blotchy low-resolution colour, hue
  rotation, washed-out contrast, each at a random severity): the target is 1 - severity, so
  the score falls as a sample gets noisier, blurrier or off-hue, and pure noise scores low.
- ``scenes-alignment`` in [0, 1]: how well the image matches its prompt. A per-cell reader
  (what is in each cell of the 2x2 grid: class or empty, colour, size) gives, for each
  prompted object, the best probability over the cells its relation allows that the right
  class and colour (and size, where named) are there; a count prompt also wants exactly n
  such objects and nothing else. Differentiable, for ReFL-style feedback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hypersd_core.paths import SCENES_DIR
from hypersd_core.rewards.base import Reward, RewardWeightsMissing
from hypersd_core.worlds import scenes as world

REWARDS_DIR = SCENES_DIR / "rewards"
FILES = {"scenes-quality": "quality.safetensors", "scenes-alignment": "alignment.safetensors"}
EMPTY = len(world.CLASSES)


def _block(i, o, s):
    return [nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(min(8, o), o), nn.SiLU()]


class Encoder(nn.Module):
    """64x64 RGB in [0, 1] -> [B, 4w, 8, 8]."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.net = nn.Sequential(*_block(3, w, 2), *_block(w, 2 * w, 1), *_block(2 * w, 2 * w, 2),
                                 *_block(2 * w, 4 * w, 1), *_block(4 * w, 4 * w, 2))
        self.dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (world.RESOLUTION, world.RESOLUTION):
            x = F.interpolate(x, size=(world.RESOLUTION, world.RESOLUTION), mode="bilinear",
                              antialias=True, align_corners=False)
        return self.net(x * 2 - 1)


class QualityNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.encoder = Encoder(width)
        self.head = nn.Linear(2 * self.encoder.dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


class CellNet(nn.Module):
    """Per-cell logits: class (+empty) [B,4,7], colour [B,4,5], size [B,4,2]."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.encoder = Encoder(width)
        d = self.encoder.dim
        self.cls, self.colour = nn.Conv2d(d, EMPTY + 1, 1), nn.Conv2d(d, len(world.COLOURS), 1)
        self.size = nn.Conv2d(d, len(world.SIZES), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.adaptive_avg_pool2d(self.encoder(x), 2)

        def flat(t):
            return t.flatten(2).transpose(1, 2)

        return {"cls": flat(self.cls(h)), "colour": flat(self.colour(h)), "size": flat(self.size(h))}


# ---------------------------------------------------------------- degradations

def degrade(x: torch.Tensor, severity: torch.Tensor, kind: torch.Tensor,
            g: torch.Generator) -> torch.Tensor:
    """Images [B,3,H,W] in [0,1] degraded by ``kind`` (0-4) at ``severity`` in [0, 1]."""
    b, _, h, w = x.shape
    s = severity.view(b, 1, 1, 1)
    out = x.clone()
    noise = torch.randn(x.shape, generator=g)
    k = kind.view(b, 1, 1, 1)
    noisy = x + s * 0.8 * noise  # 0: Gaussian noise
    small = F.interpolate(x, scale_factor=0.25, mode="area")
    blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    blur = x * (1 - s) + blurred * s  # 1: blur
    blobs = F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=(h, w), mode="bicubic",
                          align_corners=False)
    blotchy = x * (1 - s) + blobs * s  # 2: blotchy colour (what 1-step samples look like)
    angle = s * math.pi  # 3: hue rotation about the grey axis (red -> magenta / orange)
    axis = torch.full((3,), 1 / math.sqrt(3))
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = cos * x + sin * torch.cross(axis.view(1, 3, 1, 1).expand_as(x), x, dim=1) \
        + (1 - cos) * (axis.view(1, 3, 1, 1) * x).sum(1, keepdim=True) * axis.view(1, 3, 1, 1)
    washed = x * (1 - 0.8 * s) + 0.5 * 0.8 * s  # 4: washed-out contrast
    for i, img in enumerate((noisy, blur, blotchy, rot, washed)):
        out = torch.where(k == i, img, out)
    return out.clamp(0, 1)


# ---------------------------------------------------------------- the rewards

class ScenesQuality(Reward):
    """Quality in [0, 1] (sigmoid of the regression); prompts are ignored."""

    name = "scenes-quality"
    range = (0.0, 1.0)
    higher_is_better = True
    differentiable = True

    def __init__(self, net: QualityNet | None = None):
        super().__init__()
        self.net = net or QualityNet()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.net(images))


def _allowed(scene: world.Scene) -> list[list[int]]:
    """Cells each prompted object may occupy (its relation's side; anywhere for counts)."""
    sides = {"left of": ([0, 2], [1, 3]), "right of": ([1, 3], [0, 2]),
             "above": ([0, 1], [2, 3]), "below": ([2, 3], [0, 1])}
    if scene.template == "relation":
        return [list(c) for c in sides[scene.relation]]
    return [[0, 1, 2, 3]]


def alignment_from_logits(out: dict[str, torch.Tensor], scenes: Sequence[world.Scene]) -> torch.Tensor:
    """Alignment scores [B] in [0, 1] from CellNet logits and the prompts' ground truth."""
    p_cls, p_col, p_size = (out[k].softmax(-1) for k in ("cls", "colour", "size"))
    scores = []
    for i, sc in enumerate(scenes):
        wants = sc.objects[:1] if sc.template == "count" else sc.objects
        given = sc.size_given
        parts = []
        for want, cells, g in zip(wants, _allowed(sc), given):
            p = p_cls[i, :, world.CLASSES.index(want.cls)] * \
                p_col[i, :, world.COLOUR_NAMES.index(want.colour)]
            if g:
                p = p * p_size[i, :, world.SIZE_NAMES.index(want.size)]
            if sc.template == "count":  # exactly n matching objects, the rest empty
                expected = p.sum()
                n = float(sc.count)
                parts.append((1 - (expected - n).abs() / n).clamp(min=0))
            else:
                parts.append(p[cells].max())
        n_objects = sc.count if sc.template == "count" else len(wants)
        occupied = (1 - p_cls[i, :, EMPTY]).sum()
        parts.append((1 - (occupied - n_objects).abs() / 4).clamp(min=0))
        scores.append(torch.stack(parts).prod() ** (1 / len(parts)))
    return torch.stack(scores)


class ScenesAlignment(Reward):
    """Prompt-image agreement in [0, 1] from the per-cell reader and the prompt's grammar."""

    name = "scenes-alignment"
    range = (0.0, 1.0)
    higher_is_better = True
    differentiable = True

    def __init__(self, net: CellNet | None = None):
        super().__init__()
        self.net = net or CellNet()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = [world.parse_caption(p) for p in prompts]
        return alignment_from_logits(self.net(images), parsed)


NETS = {"scenes-quality": (ScenesQuality, QualityNet),
        "scenes-alignment": (ScenesAlignment, CellNet)}


def load_scenes_reward(name: str, path: str | Path | None = None,
                       device: str | torch.device = "cpu") -> Reward:
    from safetensors.torch import load_file

    if name not in NETS:
        raise ValueError(f"unknown scenes reward {name!r}; known: {sorted(NETS)}")
    p = Path(path) if path is not None else REWARDS_DIR
    if p.is_dir():
        p = p / FILES[name]
    if not p.is_file():
        raise RewardWeightsMissing(
            f"{name}: no weights at {p.name}. Train them with `python -m "
            "hypersd_core.rewards.scenes_train` (they ship in assets/scenes/rewards)")
    meta_file = p.parent / "rewards.json"
    meta = json.loads(meta_file.read_text()).get(name, {}) if meta_file.is_file() else {}
    reward_cls, net_cls = NETS[name]
    net = net_cls(width=int(meta.get("width", 16)))
    net.load_state_dict({k: v.float() for k, v in load_file(str(p)).items()})
    return reward_cls(net).to(device).freeze()


def make_scenes_quality(path=None, device="cpu", **kw: Any) -> Reward:
    return load_scenes_reward("scenes-quality", path, device)


def make_scenes_alignment(path=None, device="cpu", **kw: Any) -> Reward:
    return load_scenes_reward("scenes-alignment", path, device)
