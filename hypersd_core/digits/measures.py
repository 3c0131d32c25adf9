"""Views of digits quality that share no net with the rewards (issue: "more than one
view of quality"):

- ``pixel``: no learned features at all. Images average-pooled to 8x8 RGB (192 numbers);
  FD and KID to the reference set are computed on them.
- ``disjoint``: the feature net of ``evalnets.train_disjoint_net``, trained on one half
  of the held-out shapes; its FD reference is the other half. No reward, no stage and no
  other evaluation net trains on held-out shapes.
- per image, what a 1-step image gets wrong: ``hue_err``, the circular hue distance in
  degrees between the ink's mean hue and the prompted colour's (NaN for white prompts
  and inkless images); ``edge_width``, the width in pixels of the stroke's soft edge
  (mid-tone area near the stroke over its contour length: blur widens it); ``stray_ink``,
  the mean intensity away from the stroke (speckle and blotches).

    python -m hypersd_core.digits.measures --train-disjoint   # rebuild the disjoint net
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from hypersd_core.worlds import digits

PIXEL_SIZE = 8
INK_THRESHOLD = 0.25  # as the colour accuracy's ink (evaluate.ink_colour)


def pixel_features(images01: torch.Tensor, size: int = PIXEL_SIZE) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> [B, 3*size*size] average-pooled pixels (no learned weights)."""
    return F.adaptive_avg_pool2d(images01.float(), size).flatten(1).numpy().astype(np.float32)


def hue_error(images01: torch.Tensor, colours: list[str]) -> np.ndarray:
    """Circular distance (degrees) between each image's ink hue and its named colour's hue.

    The ink hue is the circular mean of the ink pixels' hues (pixels whose brightest
    channel exceeds ``INK_THRESHOLD``), weighted by each pixel's chroma (max - min), so
    grey speckle counts little. NaN where the colour has no hue (white) or there is no
    chromatic ink.
    """
    x = images01.float()
    hue = torch.deg2rad(digits.rgb_hue(x))
    chroma = x.amax(1) - x.amin(1)
    w = chroma * (x.amax(1) > INK_THRESHOLD)
    c, s = (w * torch.cos(hue)).sum((1, 2)), (w * torch.sin(hue)).sum((1, 2))
    mean = torch.rad2deg(torch.atan2(s, c)) % 360
    want = torch.tensor([np.nan if digits.COLOUR_HUES[n] is None else digits.COLOUR_HUES[n]
                         for n in colours], dtype=torch.float32)
    err = digits.hue_distance(mean, want)
    err[w.sum((1, 2)) < 1e-3] = float("nan")
    return err.numpy()


def _ink(images01: torch.Tensor, core: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intensity relative to the peak [B,H,W], stroke core mask, the core dilated by 2 px)."""
    v = images01.float().amax(1)
    v = v / v.amax((1, 2), keepdim=True).clamp(min=1e-6)
    m = (v >= core).float()
    near = F.max_pool2d(m[:, None], 5, 1, 2)[:, 0] > 0
    return v, m, near


def edge_width(images01: torch.Tensor, lo: float = 0.1, hi: float = 0.5) -> np.ndarray:
    """Soft-edge width in pixels of each image's stroke: the pixels near the stroke (within
    2 px of its core, intensity >= ``hi`` relative to the peak) whose intensity lies in
    [lo, hi), over the core's contour length (core/background neighbour pairs). A crisp
    stroke has a narrow band; blur widens it."""
    v, m, near = _ink(images01, hi)
    band = ((v >= lo) & (v < hi) & near).sum((1, 2)).float()
    contour = ((m[:, 1:] - m[:, :-1]).abs().sum((1, 2))
               + (m[:, :, 1:] - m[:, :, :-1]).abs().sum((1, 2)))
    return (band / contour.clamp(min=1.0)).numpy()


def stray_ink(images01: torch.Tensor, core: float = 0.5) -> np.ndarray:
    """Mean intensity (relative to the peak) of the pixels more than 2 px away from the
    stroke's core: speckle and blotches off the stroke (0 for a clean digit)."""
    v, _, near = _ink(images01, core)
    far = (~near).float()
    return ((v * far).sum((1, 2)) / far.sum((1, 2)).clamp(min=1.0)).numpy()


class IndependentViews:
    """The pixel and disjoint spaces and the per-image measures for one image set."""

    def __init__(self, folder=None, device: str = "cpu"):
        from hypersd_core.digits.evalnets import disjoint_split, load_disjoint_net, shape_images
        from hypersd_core.paths import DIGITS_EVAL

        self.device = device
        self.net = load_disjoint_net(folder or DIGITS_EVAL).to(device)
        self.reference = shape_images(disjoint_split()[1])  # the disjoint net's FD reference

    @torch.no_grad()
    def disjoint_features(self, images01: torch.Tensor) -> np.ndarray:
        return torch.cat([self.net.features(images01[i:i + 512].to(self.device) * 2 - 1).cpu()
                          for i in range(0, len(images01), 512)]).numpy().astype(np.float32)

    def real_arrays(self) -> dict[str, np.ndarray]:
        """The disjoint space's reference: the second half of the held-out shapes."""
        x = (self.reference["images"] + 1) / 2
        return {"disjoint": self.disjoint_features(x),
                "disjoint_cluster": self.reference["shape"].numpy().astype(np.int32)}

    def arrays(self, images01: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        colours = [digits.parse_caption(p)[0] for p in prompts]
        return {"pixel": pixel_features(images01), "disjoint": self.disjoint_features(images01),
                "hue_err": hue_error(images01, colours).astype(np.float32),
                "edge_width": edge_width(images01).astype(np.float32),
                "stray_ink": stray_ink(images01).astype(np.float32)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-disjoint", action="store_true",
                   help="train the disjoint feature net into --out")
    p.add_argument("--out", help="folder (default: assets/digits/eval)")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    if not args.train_disjoint:
        p.error("nothing to do: pass --train-disjoint")
    from hypersd_core.digits.evalnets import train_disjoint_net
    from hypersd_core.paths import DIGITS_EVAL

    print(f"wrote {train_disjoint_net(args.out or DIGITS_EVAL, args.steps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
