"""Reward models behind one protocol: ``score(images [B,3,H,W] in [0,1], prompts) -> [B]``.

Heavy backends (open_clip, transformers, image-reward, torchvision detection) import
lazily through :func:`load_reward`.
"""

from hypersd_core.rewards.base import (
    REWARDS,
    Reward,
    RewardWeightsMissing,
    available_rewards,
    broadcast_prompts,
    clip_preprocess,
    load_reward,
    to_image_tensor,
)
from hypersd_core.rewards.scoring import score_images

__all__ = [
    "REWARDS",
    "Reward",
    "RewardWeightsMissing",
    "available_rewards",
    "broadcast_prompts",
    "clip_preprocess",
    "load_reward",
    "score_images",
    "to_image_tensor",
]
