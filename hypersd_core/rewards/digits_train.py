"""Training the digits-world rewards (train split only) and the degradations they learn.

``train_digit_rewards()`` trains the quality, alignment and perception CNNs in a few
minutes on one CPU thread and writes ``assets/digits/rewards/`` (fp16 safetensors and
``rewards.json``). ``sanity_report()`` measures them on the held-out split;
``digits_rank.py`` prints the ranking table of the quality reward.

The quality net learns graded levels (``QUALITY_LEVELS``): real digits of the train
split in the prompted colour at the top, the teacher's 4-, 2- and 1-step images below in
that order, degraded and off-hue images at the bottom. The teacher's images come from
the training prompts (``TRAIN_PROMPTS``; the 16 of ``HELDOUT_PROMPTS`` are never used)
and seeds from ``TRAIN_SEED`` on, disjoint from every evaluation seed (1000-9800).

    python -m hypersd_core.rewards.digits_train --only digits-quality
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
OFF_HUE_MIN_DEG = 60.0


def off_hue(x: torch.Tensor, colours: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The ink redrawn in a saturated hue at least ``OFF_HUE_MIN_DEG`` degrees from the
    named colour's (``colours``: palette ids [B]; white: any hue), so the image no longer
    shows its prompt's colour."""
    ink = x.amax(1)
    base = torch.tensor([world.COLOUR_HUES[world.COLOUR_NAMES[int(c)]] or 0.0 for c in colours])
    white = torch.tensor([world.COLOUR_HUES[world.COLOUR_NAMES[int(c)]] is None for c in colours])
    offset = OFF_HUE_MIN_DEG + torch.rand(len(colours), generator=g) * (360 - 2 * OFF_HUE_MIN_DEG)
    hue = torch.where(white, torch.rand(len(colours), generator=g) * 360, base + offset) % 360
    return ink[:, None] * world.hue_rgb(hue)[:, :, None, None].to(x.dtype)


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


# ---------------------------------------------------------------- the quality net's levels

# 16 of the 80 prompts (every digit and every colour twice) whose teacher images the
# quality net never sees: the ranking table is measured on them
HELDOUT_PROMPTS = [p for p, c, d in world.ALL_PROMPTS if (d + world.COLOUR_NAMES.index(c)) % 5 == 0]
TRAIN_PROMPTS = [p for p, _, _ in world.ALL_PROMPTS if p not in HELDOUT_PROMPTS]
TRAIN_SEED = 30000
TEACHER_STEPS = (1, 2, 4)
QUALITY_LEVELS = {"real": 1.0, "teacher@4": 0.75, "teacher@2": 0.5, "teacher@1": 0.25,
                  "degraded": 0.0}


def teacher_images(steps: int, prompts: list[str], seeds: list[int], sampler=None,
                   batch_size: int = 256) -> torch.Tensor:
    """The digits teacher's images at ``steps`` (its own recipe: CFG, trailing spacing below
    25 steps) as [B,3,32,32] in [0,1]."""
    import numpy as np

    if sampler is None:
        from hypersd_core.models.backbone import load_backbone
        from hypersd_core.models.sampling import Sampler

        sampler = Sampler(load_backbone("digits"))
    gen = sampler.generate("teacher", steps, prompts, seeds, batch_size=batch_size)
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in gen.images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def teacher_levels(per_level: int, seed: int = TRAIN_SEED) -> dict[int, dict[str, torch.Tensor]]:
    """{steps: {"images": [N,3,32,32], "colours": [N]}} on the training prompts and seeds."""
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    sampler = Sampler(load_backbone("digits"))
    prompts = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(per_level)]
    colours = torch.tensor([world.COLOUR_NAMES.index(world.parse_caption(p)[0]) for p in prompts])
    seeds = [seed + i for i in range(per_level)]
    return {n: {"images": teacher_images(n, prompts, seeds, sampler), "colours": colours}
            for n in TEACHER_STEPS}


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


def quality_batch(idx: torch.Tensor, x_all: torch.Tensor, colours: torch.Tensor,
                  levels: dict[int, dict[str, torch.Tensor]], g: torch.Generator,
                  drop_colour: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of the quality net's graded levels: (images [B,3,32,32], colour condition
    [B,4], target in [0,1] [B]). A quarter real (jittered), a quarter degraded, an eighth
    off-hue, the rest the teacher's few-step images (real and degraded where there are none);
    the colour is dropped from ``drop_colour`` of the rows, except off-hue ones (off-hue only
    means something against a named colour)."""
    b = idx.shape[0]
    n_real, n_deg, n_hue = b // 4, b // 4, b // 8
    parts = [jitter(x_all[idx[:n_real]], g),
             degrade(x_all[idx[n_real:n_real + n_deg]], g),
             off_hue(x_all[idx[n_real + n_deg:n_real + n_deg + n_hue]],
                     colours[idx[n_real + n_deg:n_real + n_deg + n_hue]], g)]
    cols = [colours[idx[:n_real + n_deg + n_hue]]]
    target = [torch.full((n_real,), QUALITY_LEVELS["real"]),
              torch.full((n_deg + n_hue,), QUALITY_LEVELS["degraded"])]
    rest = idx[n_real + n_deg + n_hue:]
    if levels:
        steps = sorted(levels)
        for j, n in enumerate(steps):
            k = len(rest) // len(steps) + (j < len(rest) % len(steps))
            pick = torch.randint(len(levels[n]["images"]), (k,), generator=g)
            parts.append(jitter(levels[n]["images"][pick], g))
            cols.append(levels[n]["colours"][pick])
            target.append(torch.full((k,), QUALITY_LEVELS[f"teacher@{n}"]))
    else:
        h = len(rest) // 2
        parts += [jitter(x_all[rest[:h]], g), degrade(x_all[rest[h:]], g)]
        cols.append(colours[rest])
        target += [torch.ones(h), torch.zeros(len(rest) - h)]
    col = torch.cat(cols)
    palette = torch.tensor([world.COLOURS[c] for c in world.COLOUR_NAMES], dtype=torch.float32) / 255
    cond = torch.cat([palette[col], torch.ones(len(col), 1)], 1)
    drop = torch.rand(len(col), generator=g) < drop_colour
    drop[n_real + n_deg:n_real + n_deg + n_hue] = False
    cond[drop] = 0.0
    return torch.cat(parts), cond, torch.cat(target)


def train_digit_rewards(out_dir: str | Path = REWARDS_DIR, steps: int = 600, batch: int = 64,
                        width: int = 16, generator: torch.Generator | None = None,
                        fp16: bool = True, only: tuple[str, ...] | None = None,
                        teacher_per_level: int = 1024) -> dict[str, Any]:
    """Train the digits rewards on the train split and save them.

    Args:
        out_dir: folder for ``quality/alignment/perception.safetensors`` + ``rewards.json``.
        steps: optimiser steps per model.
        generator: randomness for batches, augmentations and degradations (default seed 0).
        only: the rewards to train (default all); the others' files and entries are kept.
        teacher_per_level: the teacher's images per step count (1, 2, 4) that the quality
            net learns to grade (training prompts and seeds only); 0: real vs degraded only.
    Returns:
        the metadata written to ``rewards.json`` (with final training losses).
    """
    names = tuple(only or CLASSES)
    unknown = sorted(set(names) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown digits rewards {unknown}; known: {sorted(CLASSES)}")
    g = generator or torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))  # weight init
    data = world.DigitsDataset("train").tensors()
    x_all = (data["images"] + 1) / 2
    digits, colours, masks = data["digits"], data["colours"], data["masks"]
    n = x_all.shape[0]
    t0 = time.time()
    levels = (teacher_levels(teacher_per_level)
              if teacher_per_level > 0 and "digits-quality" in names else {})
    t_teacher = time.time() - t0

    quality = QualityNet(width, conditioned=True)

    def q_loss(idx: torch.Tensor) -> torch.Tensor:
        x, cond, target = quality_batch(idx, x_all, colours, levels, g)
        return F.binary_cross_entropy_with_logits(quality(x, cond), target)

    align = AlignmentNet(width)

    def a_loss(idx: torch.Tensor) -> torch.Tensor:
        d_logits, c_logits = align(jitter(x_all[idx], g))
        return F.cross_entropy(d_logits, digits[idx]) + F.cross_entropy(c_logits, colours[idx])

    seg = SegNet(width)

    def s_loss(idx: torch.Tensor) -> torch.Tensor:
        x, m = jitter(x_all[idx], g, masks[idx])
        mask_logits, d_logits = seg(x)
        return segmentation_loss(mask_logits, d_logits, m, digits[idx]).mean()

    nets = {"digits-quality": (quality, q_loss), "digits-alignment": (align, a_loss),
            "digits-perception": (seg, s_loss)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "rewards.json").read_text()) if (out / "rewards.json").is_file() else {}
    meta: dict[str, Any] = {"trained_on": "digits train split", "steps": steps, "batch": batch,
                            "rewards": old.get("rewards", {})}
    for name in names:
        net, fn = nets[name]
        t1 = time.time()
        loss = _train(net, fn, n, steps, batch, g)
        sd = {k: (v.half() if fp16 else v).contiguous() for k, v in net.state_dict().items()}
        save_file(sd, str(out / FILES[name]))
        cls = CLASSES[name][0]
        entry = {"file": FILES[name], "width": width, "range": cls.range,
                 "higher_is_better": cls.higher_is_better, "steps": steps, "batch": batch,
                 "seconds": round(time.time() - t1, 1), "final_train_loss": round(loss, 4)}
        if name == "digits-quality":
            entry.update(conditioned=True, levels=QUALITY_LEVELS,
                         teacher_per_level=teacher_per_level if levels else 0,
                         teacher_seconds=round(t_teacher, 1),
                         teacher_prompts="TRAIN_PROMPTS (64 of 80)", teacher_seeds=TRAIN_SEED)
        meta["rewards"][name] = entry
    meta["seconds"] = round(time.time() - t0, 1)
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Train the digits rewards (train split only).")
    p.add_argument("--out", default=str(REWARDS_DIR))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--only", help="comma-separated reward names (default: all three)")
    p.add_argument("--teacher-per-level", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.teacher_per_level < 0:
        raise SystemExit("--steps must be >= 1 and --teacher-per-level >= 0")
    only = tuple(s.strip() for s in args.only.split(",")) if args.only else None
    meta = train_digit_rewards(args.out, steps=args.steps, only=only,
                               teacher_per_level=args.teacher_per_level,
                               generator=torch.Generator().manual_seed(args.seed))
    print(json.dumps(meta, indent=2))
    print(json.dumps(sanity_report(args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
