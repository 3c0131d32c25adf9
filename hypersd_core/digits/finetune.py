"""Pieces shared by the digits world's full-weight trainings (the ControlNet, the style
backbone): the training set encoded once, and the warmup-then-cosine learning rate.
"""

from __future__ import annotations

import math

import torch

from hypersd_core.worlds import digits


@torch.no_grad()
def encode_training_set(backbone, data: dict) -> tuple[torch.Tensor, ...]:
    """(latents of ``data["images"]``, embeddings of every digits prompt, the empty
    prompt's embedding, each image's prompt index on the backbone's device)."""
    latents = torch.cat([backbone.encode_images(data["images"][i:i + 512]).float()
                         for i in range(0, len(data["images"]), 512)])
    prompts = [p for p, _, _ in digits.ALL_PROMPTS]
    embeds = backbone.encode_prompt(prompts).hidden.float()
    uncond = backbone.encode_prompt(prompts[:1], negative=True).hidden.float()
    prompt_of = (data["digits"] * len(digits.COLOUR_NAMES) + data["colours"]).to(backbone.device)
    return latents, embeds, uncond, prompt_of


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps times a cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
