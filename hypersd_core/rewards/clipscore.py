"""CLIP score (Hessel et al. 2021) with open_clip ViT-B/32, as in Hyper-SD's tables.

Convention: ``100 * max(cos(image_embed, text_embed), 0)``. The paper's CLIP column
(e.g. 31.88 for SD1.5 at 25 steps) is this number averaged over prompts; the
CLIPScore paper's ``w = 2.5`` rescaling is *not* applied. Range [0, 100].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hypersd_core.rewards.base import CLIP_MEAN, CLIP_STD, Reward, clip_preprocess
from hypersd_core.rewards.openclip import build_open_clip


class ClipScore(Reward):
    """100 * max(cos, 0) between open_clip image and text embeddings; differentiable."""

    name = "clip-score"
    range = (0.0, 100.0)
    higher_is_better = True
    differentiable = True

    def __init__(self, clip: torch.nn.Module, tokenizer: Any, image_size: int):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_size = image_size

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images [B,3,H,W] in [0,1], B prompts -> cosine similarity [B]."""
        x = clip_preprocess(images, self.image_size, CLIP_MEAN, CLIP_STD)
        img = F.normalize(self.clip.encode_image(x), dim=-1)
        tokens = self.tokenizer(prompts).to(images.device)
        txt = F.normalize(self.clip.encode_text(tokens), dim=-1)
        return (img * txt).sum(-1)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return 100.0 * self.cosine(images, prompts).clamp(min=0.0)


def make_clip_score(path: str | Path | None = None, device: str | torch.device = "cpu",
                    model: str | dict[str, Any] = "ViT-B-32", **kw: Any) -> ClipScore:
    """Registry factory. ``path``: open_clip-format ViT-B/32 weights (file or folder);
    None: OpenAI's weights from the hub cache. ``model``: a name or a config dict."""
    net, tok, size = build_open_clip(model, path, **kw)
    return ClipScore(net, tok, size).to(device)
