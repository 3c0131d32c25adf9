"""Do the scenes rewards rank what they claim to? Mean score per image set, with bootstrap
95% intervals, on scenes neither the rewards nor the model trained on:

    python -m hypersd_core.rewards.scenes_rank --num-images 256 --out results/scenes_rank.json

Sets, all from the held-out ``test`` split (the rewards train on ``reward``, the model on
``train``): the teacher at 1, 2, 4 and 25 steps (its own recipe, CFG 3, trailing spacing
below 25 steps; seed = the scene's seed); the scenes' own renders; uniform pixel noise;
off-hue renders (hue rotated 72-180 degrees about the grey axis, so "red" reads magenta
or cyan); blurred renders; blotchy renders (low-frequency colour blobs mixed in, what
1-step samples look like). Each set is scored with its own prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from hypersd_core.rewards import rank
from hypersd_core.rewards.scenes import degrade, load_scenes_reward
from hypersd_core.worlds import scenes as world

TEACHER_SETS = (1, 2, 4, 25)
SCENES_REWARDS = ("scenes-quality", "scenes-alignment")
SPLIT = "test"


def teacher_images(steps: int, items: list[world.Scene], sampler, batch_size: int = 64) -> torch.Tensor:
    """The scenes teacher's images of ``items`` at ``steps`` as [B,3,64,64] in [0,1]."""
    gen = sampler.generate("teacher", steps, [s.prompt for s in items], [s.seed for s in items],
                           batch_size=batch_size)
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in gen.images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _degraded(x: torch.Tensor, kind: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    sev = lo + (hi - lo) * torch.rand(len(x), generator=g)
    return degrade(x, sev, torch.full((len(x),), kind), g)


def ranking_sets(num_images: int = 256, seed: int = 0, sampler=None,
                 teacher_steps: tuple[int, ...] = TEACHER_SETS
                 ) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{set name: (images [N,3,64,64] in [0,1], prompts)}; every set has ``num_images``
    (``teacher_steps=()`` leaves the teacher out: no model is loaded)."""
    g = torch.Generator().manual_seed(seed)
    items = world.scenes(SPLIT, num_images)
    prompts = [s.prompt for s in items]
    if sampler is None and teacher_steps:
        from hypersd_core.models.backbone import load_backbone
        from hypersd_core.models.sampling import Sampler

        sampler = Sampler(load_backbone("scenes"))
    sets = {f"teacher@{n}": (teacher_images(n, items, sampler), prompts) for n in teacher_steps}
    real = world.render_many(items).float() / 255.0
    sets["real renders"] = (real, prompts)
    sets["uniform noise"] = (torch.rand(real.shape, generator=g), prompts)
    sets["off-hue renders"] = (_degraded(real, 3, 0.4, 1.0, g), prompts)
    sets["blurred renders"] = (_degraded(real, 1, 0.5, 1.0, g), prompts)
    sets["blotchy renders"] = (_degraded(real, 2, 0.5, 1.0, g), prompts)
    return sets


def ranking_table(sets, weights: str | Path | None = None, n_boot: int = 1000,
                  rewards: tuple[str, ...] = SCENES_REWARDS) -> list[dict]:
    return rank.ranking_table(sets, {n: load_scenes_reward(n, weights) for n in rewards}, n_boot)


def main(argv: list[str] | None = None) -> int:
    return rank.cli(argv, "python -m hypersd_core.rewards.scenes_rank", __doc__.split("\n\n")[0],
                    lambda n, weights, n_boot: ranking_table(ranking_sets(n), weights, n_boot),
                    SCENES_REWARDS, where=f" ({SPLIT} split)")


if __name__ == "__main__":
    sys.exit(main())
