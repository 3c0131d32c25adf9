"""Digits metrics with uncertainty, in four feature spaces and per-image measures.

- ``project``: the evaluation feature net (``evalnets.py``, trained on the digits
  training split for digit x colour classes; the rewards train on that split too).
- ``random``: a convolutional net with fixed random weights (seed 1234, never trained)
  whose pooled activations describe colour, strokes and layout.
- ``pixel``: no features at all: images pooled to 8x8 RGB (``measures.py``); FD and KID.
- ``disjoint``: a feature net trained on half of the held-out shapes, measured against
  the other half (``measures.py``): data disjoint from every reward and training split.
- per image: digit and colour accuracy, hue error (degrees from the prompted colour),
  stray ink, and the stroke's edge width (judged by its gap to real digits' width).

``row_arrays`` turns images into per-image arrays; ``summarize`` gives every FD / KID to
real digits (reference resampled by shape: the 8 colourings of one handwritten digit are
one cluster) and to the teacher's reference set, and the per-image means, each with a
bootstrap 95% interval (1,000 replicates by default; ``protocol/summary.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from hypersd_core.digits.frechet import fd, fd_from_stats, gaussian_stats  # noqa: F401
from hypersd_core.protocol.summary import Measures, References, paired_differences, summarize_row

MEASURES = Measures(
    spaces={"project": "", "random": "_random", "pixel": "_pixel", "disjoint": "_disjoint"},
    kid_spaces=("pixel",), clusters={"disjoint": "disjoint_cluster"},
    rates={"digit_ok": "digit_acc", "colour_ok": "colour_acc"},
    means=("hue_err", "stray_ink"), gaps=("edge_width",))
N_BOOT = 1000

RANDOM_SEED = 1234


class RandomFeatureNet(torch.nn.Module):
    """Fixed random conv features: 32x32 RGB in [0,1] -> 160-d (never trained)."""

    def __init__(self, seed: int = RANDOM_SEED):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList([
            torch.nn.Conv2d(3, 32, 3, 1, 1), torch.nn.Conv2d(32, 32, 3, 2, 1),
            torch.nn.Conv2d(32, 32, 3, 2, 1)])
        for conv in self.convs:
            fan_in = conv.in_channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / fan_in) ** 0.5
            conv.bias.data.zero_()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        h1 = torch.relu(self.convs[0](images01 * 2 - 1))
        h3 = torch.relu(self.convs[2](torch.relu(self.convs[1](h1))))  # [B,32,8,8]
        return torch.cat([h1.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(h3, 2)
                          .flatten(1)], 1)


class DigitsMetrics:
    """Per-image arrays and bootstrap summaries (the project nets plus random features)."""

    def __init__(self, device: str = "cpu"):
        from hypersd_core.digits.evaluate import default_evaluator
        from hypersd_core.worlds import digits

        self.ev = default_evaluator()
        self.device = device
        self.random = RandomFeatureNet().to(device)
        self.featnet = self.ev.featnet.to(device)
        self.classifier = self.ev.classifier.to(device)
        from hypersd_core.digits.measures import IndependentViews

        self.views = IndependentViews(device=device)
        data = digits.DigitsDataset("heldout")
        held = (data.tensors()["images"] + 1) / 2
        colours = list(data.colours) * len(data.indices)
        views = self.views.arrays(held, [digits.caption(c, 0) for c in colours])
        self.real = {"project": self._features(self.featnet, held, True),
                     "random": self._features(self.random, held),
                     "cluster": np.repeat(data.indices, len(data.colours)).astype(np.int32),
                     **{k: views[k] for k in ("pixel", "edge_width", "stray_ink", "hue_err")},
                     **self.views.real_arrays()}

    @torch.no_grad()
    def _features(self, net, x01: torch.Tensor, signed: bool = False) -> np.ndarray:
        out = []
        for i in range(0, len(x01), 512):
            x = x01[i:i + 512].to(self.device)
            out.append((net.features(x * 2 - 1) if signed else net(x)).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)

    def row_arrays(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        from hypersd_core.digits.evaluate import ink_colour, to_tensor
        from hypersd_core.worlds import digits

        x = to_tensor(images)
        parsed = [digits.parse_caption(p) for p in prompts]
        want_digit = torch.tensor([d for _, d in parsed])
        want_colour = torch.tensor([digits.COLOUR_NAMES.index(c) for c, _ in parsed])
        with torch.no_grad():
            pred = torch.cat([self.classifier(x[i:i + 512].to(self.device) * 2 - 1).argmax(1).cpu()
                              for i in range(0, len(x), 512)])
        return {"project": self._features(self.featnet, x, True),
                "random": self._features(self.random, x),
                "digit_ok": (pred == want_digit).numpy(),
                "colour_ok": (ink_colour(x) == want_colour).numpy(),
                **self.views.arrays(x, prompts)}


_POINT_REFS: dict = {}


def point_metrics(arrays: dict, real: dict, teacher: dict | None = None) -> dict:
    """The summary without intervals (fast: one FD per space and reference)."""
    key = (id(real), id(teacher))
    if _POINT_REFS.get("key") != key:  # one evaluation measures many rows on one reference
        _POINT_REFS.update(key=key, refs=References(
            {"real": real, **({"teacher": teacher} if teacher is not None else {})},
            MEASURES, n_boot=0))
    out = summarize_row(arrays, _POINT_REFS["refs"])
    return {k: v for k, v in out.items() if not k.endswith("_ci") and k != "n_boot"}


def _interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def summarize(arrays: dict, real: dict, teacher: dict | None = None, n_boot: int = N_BOOT,
              seed: int = 0, refs: References | None = None) -> dict:
    """Every FD / KID (vs real and vs the teacher's set), the accuracies (%) and the
    per-image measures, each with a bootstrap 95% interval (``*_ci``). ``refs``: reference
    replicates built once for many rows (``References(..., MEASURES, n_boot)``)."""
    if refs is None:
        refs = References({"real": real, **({"teacher": teacher} if teacher is not None
                                            else {})}, MEASURES, n_boot, seed)
    return summarize_row(arrays, refs, seed)


FD_FIELDS = {"fd_real": ("project", "real"), "fd_teacher": ("project", "teacher"),
             "fd_real_random": ("random", "real"), "fd_teacher_random": ("random", "teacher")}


def paired_difference(a: dict, b: dict, refs: dict | References, key: str = "fd_real",
                      n_boot: int = 100, seed: int = 0) -> dict:
    """``key`` of row a minus row b with a paired bootstrap 95% interval (negative: ``a``
    is better; see ``protocol.summary.paired_differences``): {"diff", "ci", "a_better",
    "p"}. ``refs``: {"real": ..., "teacher": ...} arrays or prebuilt ``References``."""
    if not isinstance(refs, References):
        refs = References({k: v for k, v in refs.items() if v is not None}, MEASURES, n_boot,
                          seed)
    return paired_differences(a, b, refs, seed)[key]
