"""Does the digits-quality reward rank what it claims to? Mean score per image set, with
bootstrap 95% intervals, on prompts and seeds the reward never trained on:

    python -m hypersd_core.rewards.digits_rank --num-images 256

Sets: the teacher at 1, 2, 4 and 25 steps (its own recipe) on the 16 held-out prompts
(``digits_train.HELDOUT_PROMPTS``) with seeds from 1000 (training used seeds from 30000);
held-out real digits; uniform pixel noise; off-hue (held-out digits redrawn at least 60
degrees of hue from their prompt's colour); blurred held-out digits. Each set is scored
with its own prompts; ``--weights`` scores another reward folder (e.g. the previous one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hypersd_core.rewards import rank
from hypersd_core.rewards.digits import load_digits_reward
from hypersd_core.rewards.digits_train import HELDOUT_PROMPTS, blur, off_hue, teacher_images
from hypersd_core.worlds import digits as world

EVAL_SEED = 1000
TEACHER_SETS = (1, 2, 4, 25)


def ranking_sets(num_images: int = 256, seed: int = EVAL_SEED,
                 sampler=None) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{set name: (images [N,3,32,32] in [0,1], prompts)}; every set has ``num_images``."""
    g = torch.Generator().manual_seed(seed)
    prompts = [HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)] for i in range(num_images)]
    seeds = [seed + i for i in range(num_images)]
    if sampler is None:
        from hypersd_core.models.backbone import load_backbone
        from hypersd_core.models.sampling import Sampler

        sampler = Sampler(load_backbone("digits"))
    sets = {f"teacher@{n}": (teacher_images(n, prompts, seeds, sampler), prompts)
            for n in TEACHER_SETS}
    held = world.DigitsDataset("heldout").tensors()
    idx = torch.randperm(len(held["images"]), generator=g)[:num_images]
    x = (held["images"][idx] + 1) / 2
    real_prompts = [world.caption(world.COLOUR_NAMES[int(c)], int(d))
                    for c, d in zip(held["colours"][idx], held["digits"][idx])]
    sets["real (held-out digits)"] = (x, real_prompts)
    sets["uniform noise"] = (torch.rand(num_images, 3, 32, 32, generator=g), prompts)
    sets["off-hue (held-out digits)"] = (off_hue(x, held["colours"][idx], g), real_prompts)
    sets["blurred (held-out digits)"] = (blur(x, g), real_prompts)
    return sets


DIGITS_REWARDS = ("digits-quality", "digits-alignment")


def ranking_table(sets: dict[str, tuple[torch.Tensor, list[str]]],
                  weights: str | Path | None = None, n_boot: int = 1000,
                  rewards: tuple[str, ...] = DIGITS_REWARDS) -> list[dict]:
    """One row per set: {"set", "n", <reward>: mean, <reward>_ci: [lo, hi]}."""
    return rank.ranking_table(sets, {name: load_digits_reward(name, weights) for name in rewards},
                              n_boot)


def markdown(rows: list[dict], rewards: tuple[str, ...] = DIGITS_REWARDS) -> str:
    return rank.markdown(rows, rewards)


def main(argv: list[str] | None = None) -> int:
    return rank.cli(argv, "python -m hypersd_core.rewards.digits_rank", __doc__.split("\n\n")[0],
                    lambda n, weights, n_boot: ranking_table(ranking_sets(n), weights, n_boot),
                    DIGITS_REWARDS)


if __name__ == "__main__":
    sys.exit(main())
