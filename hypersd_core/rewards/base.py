"""The reward protocol, input checks, weight resolution and the reward registry.

Every reward scores a batch of images against their prompts:

    score(images [B,3,H,W] float in [0,1], prompts list[str] of length B) -> tensor [B]

Differentiable rewards keep the whole tensor path in torch (resize, crop and
normalise with torch ops, no PIL round trip, no detach), so a ReFL-style loss can
back-propagate from the score into the generator's decoded images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ImagesLike = torch.Tensor | Sequence[Any]  # a tensor or a list of PIL images
PromptsLike = str | Sequence[str]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardWeightsMissing(FileNotFoundError):
    """Raised when a reward's weights are neither at the given path nor in the local hub cache."""


class Reward(torch.nn.Module):
    """A reward model behind one protocol.

    Attributes:
        name: registry name, e.g. ``"clip-score"``.
        range: ``(lo, hi)`` when the score is bounded, else ``None``.
        higher_is_better: False for losses exposed as rewards (perception).
        differentiable: True when gradients flow from ``score`` to the input images.
    """

    name: str = "reward"
    range: tuple[float, float] | None = None
    higher_is_better: bool = True
    differentiable: bool = True

    def score(self, images: ImagesLike, prompts: PromptsLike) -> torch.Tensor:
        """Score images against prompts.

        Args:
            images: float tensor [B,3,H,W] in [0,1], or a list of B RGB PIL images.
            prompts: B prompts, or one prompt for the whole batch.
        Returns:
            float tensor [B] (on the reward's device).
        """
        x = to_image_tensor(images, device=self.device)
        return self._score(x, broadcast_prompts(prompts, x.shape[0]))

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: ImagesLike, prompts: PromptsLike) -> torch.Tensor:
        return self.score(images, prompts)

    @property
    def device(self) -> torch.device:
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def freeze(self) -> Reward:
        """Eval mode, no parameter gradients; gradients still reach the inputs."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, range={self.range}, "
                f"higher_is_better={self.higher_is_better}, differentiable={self.differentiable})")


# ---------------------------------------------------------------- input checks

def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def to_image_tensor(images: ImagesLike, device: torch.device | str | None = None) -> torch.Tensor:
    """Validate and convert images to a float tensor [B,3,H,W] in [0,1].

    A tensor is checked, not corrected (no clamping, no channel guessing). A list of
    PIL images must all be RGB and the same size; they become a (non-differentiable)
    tensor.
    """
    want = "images must be RGB [B,3,H,W] in [0,1]"
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{want}, got {_describe(x)}")
        if x.shape[0] == 0:
            raise ValueError(f"{want}, got an empty batch {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{want} as a floating-point tensor, got {_describe(x)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{want}, got non-finite values")
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise ValueError(f"{want}, got values in [{lo:.3f}, {hi:.3f}] "
                             "(map [-1,1] images with (x + 1) / 2)")
        return x.to(device) if device is not None else x
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"{want} or a list of RGB PIL images, got {_describe(images)}")
    if len(images) == 0:
        raise ValueError(f"{want}, got an empty list")
    import numpy as np
    from PIL import Image

    arrays = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"{want} or a list of PIL images, item {i} is {_describe(im)}")
        if im.mode != "RGB":
            raise ValueError(f"{want}, got a PIL image in mode {im.mode!r} at item {i} "
                             "(convert it with image.convert('RGB'))")
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"all PIL images must have the same size, got {sorted(sizes)}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x.to(device) if device is not None else x


def broadcast_prompts(prompts: PromptsLike, batch: int) -> list[str]:
    """One prompt per image: a single str is repeated, a list must have length B."""
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be str or a list of str, got {[type(p).__name__ for p in prompts]}")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images; pass one prompt per "
                         "image or a single str for all")
    return prompts


def clip_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP-style preprocessing in torch ops (differentiable).

    Bicubic resize of the shortest side to ``size`` (antialiased when shrinking),
    centre crop to ``size x size``, then normalise.

    Args:
        images: [B,3,H,W] in [0,1].
    Returns:
        [B,3,size,size] normalised.
    """
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False,
                               antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    images = images[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


# ---------------------------------------------------------------- weights

def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or a .pt/.pth/.bin with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


def resolve_file(what: str, path: str | Path | None, repo_id: str | None, filename: str | None,
                 hint: str = "") -> Path:
    """Find a weights file: ``path`` (a file, or a folder holding ``filename``), else the hub.

    The hub is asked with ``local_files_only`` when ``HF_HUB_OFFLINE=1``. Any failure
    becomes one :class:`RewardWeightsMissing` naming what to download and where to put it.
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir() and filename is not None and (p / filename).is_file():
            return p / filename
        if p.is_file():
            return p
        raise RewardWeightsMissing(
            f"{what}: no weights at {p}"
            + (f" (expected the file itself or a folder holding {filename})" if filename else "")
            + (f"; download {filename} from https://huggingface.co/{repo_id}" if repo_id else "")
            + (f". {hint}" if hint else ""))
    if repo_id is None or filename is None:
        raise RewardWeightsMissing(f"{what}: pass path= to a local weights file. {hint}".strip())
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, local_files_only=hub_offline()))
    except Exception as e:  # any hub/network failure becomes the one clear error
        raise RewardWeightsMissing(
            f"{what}: weights not found locally and not downloadable ({type(e).__name__}). "
            f"Download {filename} from https://huggingface.co/{repo_id} and pass its path "
            f"(path=/some/folder/{filename}), or run once online to fill the hub cache. {hint}".strip()
        ) from None


# ---------------------------------------------------------------- registry

def _factory(module: str, function: str) -> Callable[..., Reward]:
    def make(path: str | Path | None = None, device: str | torch.device = "cpu", **kw: Any) -> Reward:
        import importlib

        fn = getattr(importlib.import_module(f"hypersd_core.rewards.{module}"), function)
        return fn(path=path, device=device, **kw)

    make.__name__ = f"{module}.{function}"
    return make


# name -> factory(path=None, device="cpu", **kw); modules import lazily (open_clip etc. are slow)
REWARDS: dict[str, Callable[..., Reward]] = {
    "imagereward": _factory("imagereward", "make_imagereward"),
    "aesthetic": _factory("aesthetic", "make_aesthetic"),
    "clip-score": _factory("clipscore", "make_clip_score"),
    "pickscore": _factory("pickscore", "make_pickscore"),
    "perception": _factory("perception", "make_perception"),
    "digits-quality": _factory("digits", "make_digits_quality"),
    "digits-alignment": _factory("digits", "make_digits_alignment"),
    "digits-perception": _factory("digits", "make_digits_perception"),
    "scenes-quality": _factory("scenes", "make_scenes_quality"),
    "scenes-alignment": _factory("scenes", "make_scenes_alignment"),
}


def available_rewards() -> list[str]:
    """Names accepted by :func:`load_reward`."""
    return sorted(REWARDS)


def load_reward(name: str, path: str | Path | None = None, device: str | torch.device = "cpu",
                **kw: Any) -> Reward:
    """Build a reward by name, frozen and in eval mode.

    Args:
        name: one of :func:`available_rewards`.
        path: local weights (file or folder); None uses the hub id (or, for the digits
            rewards, the shipped weights).
        device: where the model lives.
        **kw: passed to the reward's factory.
    Raises:
        ValueError: unknown name. RewardWeightsMissing: weights not found.
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(available_rewards())}")
    return REWARDS[name](path=path, device=device, **kw).freeze()
