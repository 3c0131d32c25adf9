"""Networks of the digits world trained only for measuring: a digit classifier and a
feature extractor for the Frechet distance. They are never used as rewards nor to
train anything else (the rewards have their own networks in ``rewards/digits.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hypersd_core.worlds import digits


class SmallCNN(torch.nn.Module):
    """32x32 RGB -> `features`-d embedding -> `classes` logits."""

    def __init__(self, classes: int, features: int = 64, width: int = 32):
        super().__init__()
        w = width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, 1, 1), torch.nn.BatchNorm2d(w), torch.nn.ReLU(),
            torch.nn.Conv2d(w, w, 3, 2, 1), torch.nn.BatchNorm2d(w), torch.nn.ReLU(),
            torch.nn.Conv2d(w, 2 * w, 3, 1, 1), torch.nn.BatchNorm2d(2 * w), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, 2, 1), torch.nn.BatchNorm2d(2 * w), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * w, 4 * w, 3, 2, 1), torch.nn.BatchNorm2d(4 * w), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(4 * w, features), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts and intensity jitter, so the nets don't key on exact pixels."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3)
    scale = 1 + (torch.rand(b, generator=generator) - 0.5) * 0.2
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = (torch.rand(b, 2, generator=generator) - 0.5) * 0.2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x01 = (x + 1) / 2
    x01 = F.grid_sample(x01, grid, align_corners=False, padding_mode="zeros")
    x01 = x01 * (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator))
    return x01.clamp(0, 1) * 2 - 1


def train_classifier(images, targets, classes: int, steps: int, generator, desc: str):
    net = SmallCNN(classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        idx = torch.randint(0, len(images), (128,), generator=generator)
        loss = F.cross_entropy(net(_augment(images[idx], generator)), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return net.eval().requires_grad_(False)


def train_eval_nets(out: str | Path, data: dict, steps: int, generator) -> None:
    """Digit classifier (10 classes) and feature net (digit x colour, 80 classes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clf = train_classifier(data["images"], data["digits"], 10, steps, generator, "eval classifier")
    joint = data["digits"] * len(digits.COLOUR_NAMES) + data["colours"]
    feat = train_classifier(data["images"], joint, 80, steps, generator, "eval features")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, out / "classifier.safetensors")
    save_file({k: v.contiguous() for k, v in feat.state_dict().items()}, out / "features.safetensors")


def load_eval_nets(folder: str | Path) -> tuple[SmallCNN, SmallCNN]:
    """(classifier, feature net) from the shipped safetensors files."""
    folder = Path(folder)
    nets = []
    for name, classes in (("classifier", 10), ("features", 80)):
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluation network {path} is missing; rebuild it with "
                "`python -m hypersd_core build-digits --parts eval`")
        net = SmallCNN(classes)
        net.load_state_dict(load_file(path))
        nets.append(net.eval().requires_grad_(False))
    return nets[0], nets[1]


# ---------------------------------------------------------------- the disjoint view

DISJOINT_SEED = 7
DISJOINT_FILE = "disjoint.safetensors"
DISJOINT_WIDTH = 16


def disjoint_split() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits' shapes in two halves (indices into the 1797 digits): the
    first trains the disjoint feature net, the second is its FD reference. No reward, no
    training stage and no other evaluation net ever trains on either (they use the train
    split); the halves share no shape."""
    held = digits.split_indices()[1]
    perm = np.random.default_rng(DISJOINT_SEED).permutation(len(held))
    half = len(held) // 2
    return np.sort(held[perm[:half]]), np.sort(held[perm[half:]])


def shape_images(indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Every shape of ``indices`` in every colour: images [M,3,32,32] in [-1,1], digit x
    colour class [M], shape index [M]."""
    idx = torch.as_tensor(indices).repeat_interleave(len(digits.COLOUR_NAMES))
    col = torch.arange(len(digits.COLOUR_NAMES)).repeat(len(indices))
    rgb = torch.tensor([digits.COLOURS[c] for c in digits.COLOUR_NAMES], dtype=torch.float32) / 255
    images = digits.ink_32()[idx][:, None] * rgb[col][:, :, None, None]
    return {"images": images * 2 - 1, "classes": digits.labels()[idx] * len(rgb) + col,
            "shape": idx}


def train_disjoint_net(out: str | Path, steps: int = 300, seed: int = 0, batch: int = 64) -> Path:
    """The digit x colour feature net on the first half of the held-out shapes only."""
    data = shape_images(disjoint_split()[0])
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(80, width=DISJOINT_WIDTH)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in tqdm(range(steps), desc="disjoint eval features"):
        idx = torch.randint(0, len(data["images"]), (batch,), generator=g)
        loss = F.cross_entropy(net(_augment(data["images"][idx], g)), data["classes"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    path = Path(out) / DISJOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in net.state_dict().items()}, path)
    return path


def load_disjoint_net(folder: str | Path) -> SmallCNN:
    path = Path(folder) / DISJOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluation network {path} is missing; rebuild it with "
            "`python -m hypersd_core.digits.measures --train-disjoint`")
    net = SmallCNN(80, width=DISJOINT_WIDTH)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in load_file(path).items()})
    return net.eval().requires_grad_(False)
