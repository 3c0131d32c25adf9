"""Reward scores of a stage's fixed sample grid, logged as ``reward/<name>`` so the
Train & Monitor tab can plot them live while the stage trains."""

from __future__ import annotations

import torch

DIGITS_REWARDS = ("digits-quality", "digits-alignment")
SCENES_REWARDS = ("scenes-quality", "scenes-alignment")


def sample_reward_names(cfg, backbone_kind: str) -> list[str]:
    """Rewards to score the sample grid with: a miniature world's own rewards on that world,
    else the stage's own (non-perception) training rewards."""
    if backbone_kind == "digits":
        return list(DIGITS_REWARDS)
    if backbone_kind == "scenes":
        from hypersd_core.rewards.availability import availability

        return [n for n in SCENES_REWARDS if availability(n).ok]
    return [n for n in cfg.rewards if not n.endswith("perception")]


class SampleScorer:
    """Lazily loaded rewards; ``__call__(images: list[PIL], prompts) -> {name: mean}``."""

    def __init__(self, names: list[str], device: str | torch.device = "cpu",
                 loaded: dict | None = None):
        self.names = list(names)
        self.device = device
        self.rewards: dict = dict(loaded or {})  # share models a stage already loaded

    def _reward(self, name: str):
        if name not in self.rewards:
            from hypersd_core.rewards import load_reward

            self.rewards[name] = load_reward(name, device=self.device)
        return self.rewards[name]

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> dict[str, float]:
        scores: dict[str, float] = {}
        for name in self.names:
            reward = self._reward(name)
            scores[name] = float(reward.score(images, prompts).mean())
        return scores
