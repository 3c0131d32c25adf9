"""Training the digits-world rewards (train split only) and the degradations they learn.

``train_digit_rewards()`` trains the quality, alignment and perception CNNs in a few
minutes on one CPU thread and writes ``assets/digits/rewards/`` (fp16 safetensors and
``rewards.json``). ``sanity_report()`` measures them on the held-out split.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hypersd_core.rewards.digits import (
    CLASSES,
    FILES,
    REWARDS_DIR,
    AlignmentNet,
    QualityNet,
    SegNet,
    load_digits_reward,
    segmentation_loss,
)
from hypersd_core.worlds import digits as world

# ---------------------------------------------------------------- degradations (x in [0,1])


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur, sigma ~ U[1.2, 3] per image."""
    sigma = _u(x.shape[0], 1.2, 3.0, g)
    r = torch.arange(-6, 7, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B,13]
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, 0)
    y = F.conv2d(F.pad(y, (6, 6, 0, 0), mode="reflect"), kk[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 6, 6), mode="reflect"), kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, std ~ U[0.2, 0.6]."""
    std = _u(x.shape[0], 0.2, 0.6, g).view(-1, 1, 1, 1)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def erase(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Zero a random rectangle of 12-22 pixels a side (removes a large part of the digit)."""
    b, _, h, w = x.shape
    size = torch.randint(12, 23, (b, 2), generator=g)
    top = (torch.rand(b, generator=g) * (h - size[:, 0] + 1)).long()
    left = (torch.rand(b, generator=g) * (w - size[:, 1] + 1)).long()
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    box = ((ys >= top[:, None, None]) & (ys < (top + size[:, 0])[:, None, None])
           & (xs >= left[:, None, None]) & (xs < (left + size[:, 1])[:, None, None]))
    return x * (~box)[:, None].to(x.dtype)


def colour_mix(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Ink painted with a random smooth colour field instead of one named colour."""
    ink = x.amax(1, keepdim=True)
    field = torch.rand(x.shape[0], 3, 4, 4, generator=g)
    field = F.interpolate(field, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return ink * field


def blank(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A flat image of a random colour and brightness (often black)."""
    v = torch.rand(x.shape[0], 3, 1, 1, generator=g) * (torch.rand(x.shape[0], 1, 1, 1, generator=g) < 0.5)
    return v.expand_as(x).clone()


DEGRADATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "blur": blur, "noise": noise, "erase": erase, "colour_mix": colour_mix, "blank": blank,
}


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image through one random degradation: [B,3,H,W] -> [B,3,H,W]."""
    kinds = list(DEGRADATIONS.values())
    pick = torch.randint(len(kinds), (x.shape[0],), generator=g)
    out = x.clone()
    for i, fn in enumerate(kinds):
        sel = pick == i
        if sel.any():
            out[sel] = fn(x[sel], g)
    return out


def jitter(x: torch.Tensor, g: torch.Generator, masks: torch.Tensor | None = None):
    """Small random shift/scale (applied to masks too) and mild noise, so nets don't key on pixels."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3)
    s = 1 + (torch.rand(b, generator=g) - 0.5) * 0.2
    theta[:, 0, 0], theta[:, 1, 1] = s, s
    theta[:, :, 2] = (torch.rand(b, 2, generator=g) - 0.5) * 0.2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, align_corners=False)
    y = (y + 0.03 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(y.shape, generator=g)).clamp(0, 1)
    if masks is None:
        return y
    m = F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0] > 0.5
    return y, m


# ---------------------------------------------------------------- training


def _train(net: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int,
           batch: int, g: torch.Generator, lr: float = 3e-3) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    net.train()
    ema = None
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=g)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        v = loss.item()
        ema = v if ema is None else 0.95 * ema + 0.05 * v
    net.eval()
    return ema or 0.0


def train_digit_rewards(out_dir: str | Path = REWARDS_DIR, steps: int = 600, batch: int = 64,
                        width: int = 16, generator: torch.Generator | None = None,
                        fp16: bool = True) -> dict[str, Any]:
    """Train the three digits rewards on the train split and save them.

    Args:
        out_dir: folder for ``quality/alignment/perception.safetensors`` + ``rewards.json``.
        steps: optimiser steps per model.
        generator: randomness for batches, augmentations and degradations (default seed 0).
    Returns:
        the metadata written to ``rewards.json`` (with final training losses).
    """
    g = generator or torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))  # weight init
    data = world.DigitsDataset("train").tensors()
    x_all = (data["images"] + 1) / 2
    digits, colours, masks = data["digits"], data["colours"], data["masks"]
    n = x_all.shape[0]
    t0 = time.time()

    quality = QualityNet(width)

    def q_loss(idx: torch.Tensor) -> torch.Tensor:
        real = jitter(x_all[idx], g)
        half = idx.shape[0] // 2
        fake = degrade(x_all[idx[:half]], g)
        logits = quality(torch.cat([real, fake]))
        target = torch.cat([torch.ones(real.shape[0]), torch.zeros(half)])
        return F.binary_cross_entropy_with_logits(logits, target)

    align = AlignmentNet(width)

    def a_loss(idx: torch.Tensor) -> torch.Tensor:
        d_logits, c_logits = align(jitter(x_all[idx], g))
        return F.cross_entropy(d_logits, digits[idx]) + F.cross_entropy(c_logits, colours[idx])

    seg = SegNet(width)

    def s_loss(idx: torch.Tensor) -> torch.Tensor:
        x, m = jitter(x_all[idx], g, masks[idx])
        mask_logits, d_logits = seg(x)
        return segmentation_loss(mask_logits, d_logits, m, digits[idx]).mean()

    losses = {}
    for name, net, fn in (("digits-quality", quality, q_loss), ("digits-alignment", align, a_loss),
                          ("digits-perception", seg, s_loss)):
        losses[name] = _train(net, fn, n, steps, batch, g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"trained_on": "digits train split", "steps": steps, "batch": batch,
                            "seconds": round(time.time() - t0, 1), "rewards": {}}
    for name, net in (("digits-quality", quality), ("digits-alignment", align), ("digits-perception", seg)):
        sd = {k: (v.half() if fp16 else v).contiguous() for k, v in net.state_dict().items()}
        save_file(sd, str(out / FILES[name]))
        cls = CLASSES[name][0]
        meta["rewards"][name] = {"file": FILES[name], "width": width, "range": cls.range,
                                 "higher_is_better": cls.higher_is_better,
                                 "final_train_loss": round(losses[name], 4)}
    (out / "rewards.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@torch.no_grad()
def sanity_report(path: str | Path | None = None, n: int = 512, seed: int = 1) -> dict[str, float]:
    """Held-out checks of the (shipped) digits rewards; returns named mean scores."""
    g = torch.Generator().manual_seed(seed)
    data = world.DigitsDataset("heldout").tensors()
    idx = torch.randperm(data["images"].shape[0], generator=g)[:n]
    x = (data["images"][idx] + 1) / 2
    d, c, m = data["digits"][idx], data["colours"][idx], data["masks"][idx]
    q = load_digits_reward("digits-quality", path)
    a = load_digits_reward("digits-alignment", path)
    p = load_digits_reward("digits-perception", path)
    prompts = [world.caption(world.COLOUR_NAMES[ci], int(di)) for ci, di in zip(c, d)]
    wrong_d = [world.caption(world.COLOUR_NAMES[ci], int((di + 1 + k) % 10))
               for ci, di, k in zip(c, d, torch.randint(9, (len(d),), generator=g))]
    wrong_c = [world.caption(world.COLOUR_NAMES[(ci + 1 + k) % 8], int(di))
               for ci, di, k in zip(c, d, torch.randint(7, (len(d),), generator=g))]
    r: dict[str, float] = {"quality/real": float(q.score(x, "").mean())}
    for name, fn in DEGRADATIONS.items():
        r[f"quality/{name}"] = float(q.score(fn(x, g), "").mean())
    r["alignment/correct"] = float(a.score(x, prompts).mean())
    r["alignment/wrong_digit"] = float(a.score(x, wrong_d).mean())
    r["alignment/wrong_colour"] = float(a.score(x, wrong_c).mean())
    d_logits, c_logits = a.net(x)
    r["alignment/digit_acc"] = float((d_logits.argmax(1) == d).float().mean())
    r["alignment/colour_acc"] = float((c_logits.argmax(1) == c).float().mean())
    r["perception/correct"] = float(p.loss_tensors(x, m, d).mean())
    r["perception/wrong_mask"] = float(p.loss_tensors(x, m.roll(8, dims=-1), d).mean())
    r["perception/wrong_digit"] = float(p.loss_tensors(x, m, (d + 1) % 10).mean())
    mask_logits, _ = p.net(x)
    inter = ((mask_logits > 0) & m).sum((1, 2)).float()
    union = ((mask_logits > 0) | m).sum((1, 2)).float()
    r["perception/mask_iou"] = float((inter / union.clamp(min=1)).mean())
    return r


if __name__ == "__main__":
    import sys

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    print(json.dumps(train_digit_rewards(steps=steps), indent=2))
    print(json.dumps(sanity_report(), indent=2))
