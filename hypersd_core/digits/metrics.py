"""Digits metrics with uncertainty, in two feature spaces.

- ``project``: the evaluation feature net (``evalnets.py``, trained on the digits
  training split for digit x colour classes).
- ``random``: a convolutional net with fixed random weights (seed 1234, never trained)
  whose pooled activations describe colour, strokes and layout. No training stage and
  no reward sees it, and it was not fitted to any data, so a model cannot learn to
  please it by optimising the project's rewards (which share the training split with
  the project's feature net).

``row_arrays`` turns images into per-image arrays (features in both spaces, digit and
colour correctness); ``summarize`` gives FD vs real, FD vs the teacher's reference set
and the accuracies, each with a bootstrap 95% interval.
"""

from __future__ import annotations

import numpy as np
import torch

from hypersd_core.digits.frechet import fd, fd_from_stats, gaussian_stats  # noqa: F401

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
        held = (digits.DigitsDataset("heldout").tensors()["images"] + 1) / 2
        self.real = {"project": self._features(self.featnet, held, True),
                     "random": self._features(self.random, held)}

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
                "colour_ok": (ink_colour(x) == want_colour).numpy()}


def point_metrics(arrays: dict, real: dict, teacher: dict | None = None) -> dict:
    """The summary without intervals (fast: one FD per space and reference)."""
    out = {"digit_acc": 100 * float(arrays["digit_ok"].mean()),
           "colour_acc": 100 * float(arrays["colour_ok"].mean()), "n": len(arrays["digit_ok"])}
    refs = {"real": real, **({"teacher": teacher} if teacher is not None else {})}
    for space in ("project", "random"):
        for ref_name, ref in refs.items():
            key = f"fd_{ref_name}" + ("" if space == "project" else "_random")
            out[key] = fd(arrays[space], ref[space])
    return out


def _interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def summarize(arrays: dict, real: dict, teacher: dict | None = None, n_boot: int = 200,
              seed: int = 0) -> dict:
    """fd_real / fd_teacher in both spaces, digit_acc / colour_acc (%), each with a
    bootstrap 95% interval (``*_ci``: images resampled with replacement, the reference
    sets too)."""
    rng = np.random.default_rng(seed)
    n = len(arrays["digit_ok"])
    out: dict = {}
    for key in ("digit_ok", "colour_ok"):
        v = arrays[key].astype(np.float64)
        name = key.replace("_ok", "_acc")
        out[name] = 100 * float(v.mean())
        out[name + "_ci"] = _interval([100 * v[rng.integers(0, n, n)].mean() for _ in range(n_boot)])
    refs = {"real": real, **({"teacher": teacher} if teacher is not None else {})}
    for space in ("project", "random"):
        f = arrays[space]
        for ref_name, ref in refs.items():
            r = ref[space]
            key = f"fd_{ref_name}" + ("" if space == "project" else "_random")
            out[key] = fd(f, r)
            boots = []
            for _ in range(n_boot // 4):  # sqrtm of every resample: a quarter as many draws
                boots.append(fd(f[rng.integers(0, n, n)], r[rng.integers(0, len(r), len(r))]))
            # a resample holds duplicates, which raises its FD (by far more than the spread
            # at a few hundred images): the percentiles are shifted back by that bias, so the
            # interval keeps the bootstrap's width around the estimate
            q_lo, q_hi = _interval(boots)
            bias = float(np.mean(boots)) - out[key]
            out[key + "_ci"] = [max(0.0, q_lo - bias), q_hi - bias]
    out["n"] = n
    return out


FD_FIELDS = {"fd_real": ("project", "real"), "fd_teacher": ("project", "teacher"),
             "fd_real_random": ("random", "real"), "fd_teacher_random": ("random", "teacher")}


def paired_difference(a: dict, b: dict, refs: dict, key: str = "fd_real", n_boot: int = 100,
                      seed: int = 0) -> dict:
    """FD(a) - FD(b) (``key`` of FD_FIELDS; ``refs``: {"real": ..., "teacher": ...}) with a
    paired bootstrap 95% interval: every replicate draws one set of image indices for both
    rows (image i of each row has the same prompt and seed) and one of the reference set,
    so what the rows share (the prompts drawn, the reference sample, FD's small-sample
    bias) cancels in the difference. Negative: ``a`` is closer. ``a_better`` is the share
    of replicates with a negative difference."""
    space, ref_name = FD_FIELDS[key]
    fa, fb, r = a[space], b[space], refs[ref_name][space]
    if len(fa) != len(fb):
        raise ValueError(f"paired rows need the same images: {len(fa)} vs {len(fb)}")
    rng = np.random.default_rng(seed)
    point = fd(fa, r) - fd(fb, r)
    boots = []
    for _ in range(n_boot):
        i, j = rng.integers(0, len(fa), len(fa)), rng.integers(0, len(r), len(r))
        rj = gaussian_stats(r[j])
        boots.append(fd_from_stats(*gaussian_stats(fa[i]), *rj)
                     - fd_from_stats(*gaussian_stats(fb[i]), *rj))
    bias = float(np.mean(boots)) - point
    lo, hi = _interval(boots)
    return {"diff": point, "ci": [lo - bias, hi - bias],
            "a_better": float(np.mean(np.array(boots) < 0))}
