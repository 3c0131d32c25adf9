"""Scoring image files with a named reward (the ``score`` command of the command line)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from hypersd_core.rewards.base import available_rewards, load_reward

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a folder (sorted, non-recursive) or an explicit list; clear errors."""
    if isinstance(images, (str, Path)):
        p = Path(images)
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {p}")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            if not files:
                raise ValueError(f"folder {p} is empty: expected {', '.join(IMAGE_SUFFIXES)} files")
            bad = [f.name for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
            if bad:
                raise ValueError(f"folder {p} holds non-image files {bad[:5]}; only "
                                 f"{', '.join(IMAGE_SUFFIXES)} are scored")
            return files
        return [p]
    files = [Path(f) for f in images]
    if not files:
        raise ValueError("no images given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no such image file: {f}")
    return files


def _open_rgb(f: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{f} is not a readable image ({type(e).__name__})") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


@torch.no_grad()
def score_images(reward_name: str, image_paths_or_dir: str | Path | Sequence[str | Path],
                 prompt: str, path: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 16) -> list[tuple[str, float]]:
    """Score image files with a reward; images of any size and mode (converted to RGB).

    Args:
        reward_name: one of :func:`available_rewards` (not the perception losses, which
            need ground-truth annotations).
        image_paths_or_dir: a folder (every file must be an image) or a list of files.
        prompt: the prompt every image is scored against.
        path: reward weights (see :func:`load_reward`).
    Returns:
        [(file path, score), ...] in input order.
    """
    if reward_name not in available_rewards():
        raise ValueError(f"unknown reward {reward_name!r}; known rewards: {', '.join(available_rewards())}")
    files = list_images(image_paths_or_dir)
    tensors = [_open_rgb(f) for f in files]  # read all first: a bad file fails before loading a model
    reward = load_reward(reward_name, path=path, device=device)
    if reward.name.endswith("perception"):
        raise ValueError(f"{reward_name} is a loss against ground-truth annotations; score it "
                         "with loss(images, targets) instead")
    out: list[tuple[str, float]] = []
    for i in range(0, len(files), batch_size):
        chunk = tensors[i:i + batch_size]
        sizes = {t.shape for t in chunk}
        if len(sizes) == 1:
            scores = reward.score(torch.stack(chunk), prompt).tolist()
        else:  # mixed sizes: one at a time, each through the reward's own resize
            scores = [float(reward.score(t[None], prompt)[0]) for t in chunk]
        out += [(str(f), float(s)) for f, s in zip(files[i:i + batch_size], scores)]
    return out
