"""Networks of the scenes world trained only for measuring, on the ``evalnet`` split (disjoint
from the model's training scenes and from the rewards' scenes).

- ``GridDetector``: reads a 64x64 scene as its 2x2 grid of cells; for each cell it predicts
  what is there (one of the classes or empty), its colour and its size. Its penultimate
  features are one FD space. This is the miniature GenEval's detector.
- ``RandomFeatureNet``: fixed random conv features (never trained), a second FD space.
- Pixels: images box-filtered to 8x8 (no learned features at all), a third.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hypersd_core.worlds import scenes as world

N_CELLS = 4
EMPTY = len(world.CLASSES)  # class index of an empty cell


class GridDetector(torch.nn.Module):
    """64x64 RGB in [-1, 1] -> per-cell class (+empty), colour and size logits."""

    def __init__(self, width: int = 24, features: int = 128):
        super().__init__()
        w = width

        def block(i, o, s):
            return [torch.nn.Conv2d(i, o, 3, s, 1), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]

        self.body = torch.nn.Sequential(
            *block(3, w, 2), *block(w, 2 * w, 1), *block(2 * w, 2 * w, 2),
            *block(2 * w, 4 * w, 1), *block(4 * w, 4 * w, 2),  # 8x8
            torch.nn.AdaptiveAvgPool2d(2),  # one 2x2 map entry per cell
        )
        self.proj = torch.nn.Linear(4 * w * 4, features)
        self.cls = torch.nn.Conv2d(4 * w, EMPTY + 1, 1)
        self.colour = torch.nn.Conv2d(4 * w, len(world.COLOUR_NAMES), 1)
        self.size = torch.nn.Conv2d(4 * w, len(world.SIZE_NAMES), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)  # [B, C, 2, 2]
        flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731  [B, 4 cells, K]
        return {"cls": flat(self.cls(h)), "colour": flat(self.colour(h)),
                "size": flat(self.size(h)), "features": F.relu(self.proj(h.flatten(1)))}


class RandomFeatureNet(torch.nn.Module):
    """Fixed random conv features: 64x64 RGB in [-1, 1] -> 192-d (never trained)."""

    def __init__(self, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList()
        chans = [3, 32, 64, 96]
        for i, o in zip(chans[:-1], chans[1:]):
            conv = torch.nn.Conv2d(i, o, 4, 2, 1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (i * 16) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    """Images [-1, 1] box-filtered to 8x8: [B, 192]."""
    return F.adaptive_avg_pool2d(x, 8).flatten(1)


def targets(items: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Per-cell ground truth: class (EMPTY where no object), colour, size (-100: ignore)."""
    return world.cell_targets(items)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated images do to real ones: blur, noise, small colour and gain shifts,
    1-2 pixel shifts, so the detector reads samples as it reads renders."""
    b = len(x)
    shift = torch.randint(-2, 3, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    x = torch.where(blur, 0.5 * x + 0.5 * blurred, x)
    gain = 0.85 + 0.3 * torch.rand(b, 3, 1, 1, generator=g)
    x = (x + 1) * gain - 1
    x = x + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def train_eval_nets(out: str | Path, n_images: int, steps: int, seed: int = 0,
                    batch_size: int = 64) -> dict:
    """Train the detector on ``n_images`` renders of the ``evalnet`` split; save the nets
    and the detector's accuracy on held-out ``test`` renders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = world.scenes("evalnet", n_images)
    images = world.render_many(items)
    tgt = targets(items)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = GridDetector()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="scenes detector", mininterval=10)
    for _ in bar:
        idx = torch.randint(0, n_images, (batch_size,), generator=g)
        outp = net(augment(world.to_model(images[idx]), g))
        loss = sum(F.cross_entropy(outp[k].reshape(-1, outp[k].shape[-1]), tgt[k][idx].reshape(-1),
                                   ignore_index=-100) for k in ("cls", "colour", "size"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in net.state_dict().items()}, out / "detector.safetensors")
    save_file({k: v.half() for k, v in RandomFeatureNet().state_dict().items()},
              out / "random_features.safetensors")
    test = world.scenes("test", min(1000, n_images))
    with torch.no_grad():
        acc = detector_accuracy(net, world.to_model(world.render_many(test)), test)
    (out / "detector.json").write_text(json.dumps({
        "train_split": "evalnet", "train_images": n_images, "steps": steps,
        "test_split": "test", "test_images": len(test), "accuracy": acc}, indent=2))
    return acc


def detector_accuracy(net: GridDetector, images: torch.Tensor,
                      items: list[world.Scene]) -> dict[str, float]:
    tgt = targets(items)
    outp = net(images)
    res = {}
    for k in ("cls", "colour", "size"):
        pred = outp[k].argmax(-1)
        keep = tgt[k] != -100
        res[k] = float((pred[keep] == tgt[k][keep]).float().mean())
    return res


def _float(sd: dict) -> dict:
    """Weights ship fp16; the nets run fp32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


class EvalNets:
    """The loaded measuring nets and the features they give."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "detector.safetensors").is_file():
            raise FileNotFoundError(
                f"no scenes evaluation nets in {folder}; build them with "
                "`python -m hypersd_core build-scenes` (phase eval)")
        self.detector = GridDetector()
        self.detector.load_state_dict(_float(load_file(folder / "detector.safetensors")))
        self.detector.eval().requires_grad_(False)
        self.random = RandomFeatureNet()
        self.random.load_state_dict(_float(load_file(folder / "random_features.safetensors")))

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
        """Images [N, 3, 64, 64] in [-1, 1] -> per-cell predictions and the three feature
        spaces, as numpy arrays."""
        parts: dict[str, list] = {}
        for i in range(0, len(images), batch):
            x = images[i:i + batch].float()
            d = self.detector(x)
            probs = d["cls"].softmax(-1)
            row = {"cls": d["cls"].argmax(-1), "cls_conf": probs.max(-1).values,
                   "colour": d["colour"].argmax(-1), "size": d["size"].argmax(-1),
                   "f_detector": d["features"], "f_random": self.random(x),
                   "f_pixels": pixel_features(x)}
            for k, v in row.items():
                parts.setdefault(k, []).append(v.numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}
