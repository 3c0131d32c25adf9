"""LAION aesthetic predictor ("improved-aesthetic-predictor", sac+logos+ava1-l14-linearMSE).

Score = MLP(normalize(CLIP ViT-L/14 image embedding)); MLP 768-1024-128-64-16-1 with
dropouts between the linears and no activations, keys ``layers.0.weight`` ...
``layers.7.bias`` exactly as the public ``.pth`` so it loads unchanged. Scores are
roughly on a 1..10 scale (Hyper-SD reports 5.26-5.85); the range is unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hypersd_core.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    clip_preprocess,
    load_state_dict_file,
    resolve_file,
)
from hypersd_core.rewards.openclip import build_open_clip

MLP_REPO = "camenduru/improved-aesthetic-predictor"  # mirrors the GitHub file
MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HIDDEN = (1024, 128, 64, 16)
DROPOUT = (0.2, 0.2, 0.1, 0.0)


class AestheticMLP(nn.Module):
    """The predictor's head; ``layers`` indices match the public state dict."""

    def __init__(self, input_size: int = 768, hidden: Sequence[int] = HIDDEN):
        super().__init__()
        dims = [input_size, *hidden]
        mods: list[nn.Module] = []
        for i in range(len(hidden)):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if DROPOUT[i] if i < len(DROPOUT) else 0.0:
                mods.append(nn.Dropout(DROPOUT[i]))
        mods.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, input_size] -> [B, 1]."""
        return self.layers(x)


class AestheticScore(Reward):
    """LAION aesthetic score of images (prompts are ignored); differentiable."""

    name = "aesthetic"
    range = None
    higher_is_better = True
    differentiable = True

    def __init__(self, clip: nn.Module, mlp: AestheticMLP, image_size: int):
        super().__init__()
        self.clip = clip
        self.mlp = mlp
        self.image_size = image_size

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = clip_preprocess(images, self.image_size, CLIP_MEAN, CLIP_STD)
        emb = F.normalize(self.clip.encode_image(x).float(), dim=-1)
        return self.mlp(emb)[:, 0]


def load_aesthetic_mlp(path: str | Path, input_size: int = 768,
                       hidden: Sequence[int] = HIDDEN) -> AestheticMLP:
    """The head from a ``.pth`` (weights_only) or ``.safetensors`` file, strict key match."""
    mlp = AestheticMLP(input_size, hidden)
    sd = load_state_dict_file(path)
    try:
        mlp.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an aesthetic MLP {input_size}-{'-'.join(map(str, hidden))}-1: "
                         f"{str(e)[:300]}") from None
    return mlp


def make_aesthetic(path: str | Path | None = None, device: str | torch.device = "cpu",
                   clip_path: str | Path | None = None, model: str | dict[str, Any] = "ViT-L-14",
                   hidden: Sequence[int] = HIDDEN, repo_id: str = MLP_REPO,
                   **kw: Any) -> AestheticScore:
    """Registry factory.

    Args:
        path: the MLP weights (``sac+logos+ava1-l14-linearMSE.pth`` or .safetensors),
            a folder holding it, or None for the hub cache.
        clip_path: open_clip-format ViT-L/14 weights; None: the hub cache.
        model: open_clip name or config dict (tests pass a tiny config).
        hidden: MLP hidden sizes (the public head: 1024, 128, 64, 16).
        repo_id: hub repository holding ``MLP_FILE`` (a mirror; the canonical copy is on GitHub).
    """
    mlp_file = resolve_file("LAION aesthetic MLP", path, repo_id, MLP_FILE,
                            hint="It is also at github.com/christophschuhmann/improved-aesthetic-predictor.")
    net, _tok, size = build_open_clip(model, clip_path, **kw)
    mlp = load_aesthetic_mlp(mlp_file, net.visual.output_dim, hidden)
    return AestheticScore(net, mlp, size).to(device)
