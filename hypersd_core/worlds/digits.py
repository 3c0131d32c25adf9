"""The digits world's data: scikit-learn's bundled handwritten digits, upsampled to
32x32 and drawn in one of eight named colours, with captions, masks and labels.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships inside scikit-learn.
A fixed, seeded split keeps 20% of the digits held out; no model ever trains on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
COLOUR_NAMES = list(COLOURS)
RESOLUTION = 32
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
MASK_THRESHOLD = 0.25  # ink intensity above which a pixel belongs to the digit


def caption(colour: str, digit: int) -> str:
    """The canonical caption; every model of the digits world understands it."""
    return f"a {colour} handwritten digit {digit}"


ALL_PROMPTS: list[tuple[str, str, int]] = [
    (caption(c, d), c, d) for d in range(10) for c in COLOUR_NAMES
]


def parse_caption(prompt: str) -> tuple[str, int]:
    """Return (colour, digit) of a canonical caption; raise ValueError otherwise."""
    words = prompt.strip().lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    digits = [w for w in words if w.isdigit() and len(w) == 1]
    if colour is None or not digits:
        raise ValueError(
            f"not a digits-world prompt: {prompt!r} (expected e.g. {caption('red', 7)!r})"
        )
    return colour, int(digits[-1])


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


@lru_cache(maxsize=1)
def ink_32() -> torch.Tensor:
    """All 1797 digits as smooth 32x32 ink intensity in [0, 1], shape [N, 32, 32]."""
    images, _ = _raw()
    x = torch.from_numpy(images)[:, None]
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", align_corners=False)
    return x[:, 0].clamp(0.0, 1.0)


def labels() -> torch.Tensor:
    return torch.from_numpy(_raw()[1])


@lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) indices into the 1797 digits: fixed seed, disjoint, ~80/20."""
    n = len(_raw()[1])
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_held = int(round(n * HELDOUT_FRACTION))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def colourise(ink: torch.Tensor, colour: str) -> torch.Tensor:
    """Ink [..., H, W] in [0, 1] -> RGB [..., 3, H, W] in [0, 1] of the named colour."""
    rgb = torch.tensor(COLOURS[colour], dtype=ink.dtype) / 255.0
    return ink.unsqueeze(-3) * rgb.view(3, 1, 1)


def rgb_hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in degrees [0, 360) of RGB values along dim -3 ([..., 3, H, W] -> [..., H, W]);
    HSV's hexagonal hue, 0 for greys."""
    r, g, b = rgb.unbind(-3)
    mx, mn = rgb.amax(-3), rgb.amin(-3)
    d = (mx - mn).clamp(min=1e-8)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2,
                                                             (r - g) / d + 4))
    return torch.where(mx - mn > 1e-8, h * 60.0, torch.zeros_like(h)) % 360.0


def hue_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular distance in degrees between hues ``a`` and ``b`` (broadcast), in [0, 180]."""
    d = (a - b).abs() % 360.0
    return torch.minimum(d, 360.0 - d)


def hue_rgb(hue: torch.Tensor) -> torch.Tensor:
    """Fully saturated, full-value RGB of hues in degrees: [...] -> [..., 3] in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[..., None] / 60.0) % 6
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


# the named colours' hues in degrees; white has none (None)
COLOUR_HUES: dict[str, float | None] = {
    c: (None if len(set(v)) == 1 else float(rgb_hue(torch.tensor(v, dtype=torch.float32)
                                                     .view(3, 1, 1))[0, 0]))
    for c, v in COLOURS.items()}


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor  # [3, 32, 32] in [-1, 1]
    caption: str
    digit: int
    colour: str
    mask: torch.Tensor  # [32, 32] bool, the digit's ink
    index: int  # index into the 1797 digits


class DigitsDataset(torch.utils.data.Dataset):
    """Every digit of a split in every colour: item i is digit i // 8 in colour i % 8."""

    def __init__(self, split: str = "train", colours: list[str] | None = None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        train, held = split_indices()
        self.indices = train if split == "train" else held
        self.colours = colours or COLOUR_NAMES
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; choose from {COLOUR_NAMES}")

    def __len__(self) -> int:
        return len(self.indices) * len(self.colours)

    def __getitem__(self, i: int) -> Sample:
        idx = int(self.indices[i // len(self.colours)])
        colour = self.colours[i % len(self.colours)]
        ink = ink_32()[idx]
        digit = int(labels()[idx])
        return Sample(
            image=colourise(ink, colour) * 2 - 1,
            caption=caption(colour, digit),
            digit=digit,
            colour=colour,
            mask=ink > MASK_THRESHOLD,
            index=idx,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole split at once: images [M,3,32,32] in [-1,1], digits, colour ids, masks."""
        idx = torch.as_tensor(self.indices).repeat_interleave(len(self.colours))
        col = torch.arange(len(self.colours)).repeat(len(self.indices))
        ink = ink_32()[idx]
        rgb = torch.tensor([COLOURS[c] for c in self.colours], dtype=torch.float32) / 255.0
        images = ink[:, None] * rgb[col][:, :, None, None]
        colour_ids = torch.tensor([COLOUR_NAMES.index(c) for c in self.colours])[col]
        return {
            "images": images * 2 - 1,
            "digits": labels()[idx],
            "colours": colour_ids,
            "masks": ink > MASK_THRESHOLD,
        }


# ---------------------------------------------------------------- tokenizer

from hypersd_core.worlds.tokenizer import SPECIAL_BOS, SPECIAL_EOS  # noqa: E402,F401

MAX_TOKENS = 16
_WORDS = ["a", "an", "the", "of", "in", "handwritten", "digit", "number", "written", *COLOURS]


def write_tokenizer(folder: str | Path) -> None:
    """Write a CLIPTokenizer (vocab.json + merges.txt) for the digits vocabulary."""
    from hypersd_core.worlds.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(folder, _WORDS, MAX_TOKENS)
