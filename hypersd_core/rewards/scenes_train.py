"""Train the scenes-world rewards on the ``reward`` split (never the training, evaluation-net,
reference or evaluation scenes) and check what they rank.

``python -m hypersd_core.rewards.scenes_train [--out DIR] [--steps N]`` writes
``quality.safetensors``, ``alignment.safetensors`` and ``rewards.json`` (fp16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hypersd_core.rewards.scenes import FILES, REWARDS_DIR, CellNet, QualityNet, degrade
from hypersd_core.worlds import scenes as world


def _quality_batch(images01: torch.Tensor, g: torch.Generator):
    b = len(images01)
    severity = torch.rand(b, generator=g)
    severity[: b // 3] = 0.0  # a third clean
    kind = torch.randint(0, 5, (b,), generator=g)
    x = degrade(images01, severity, kind, g)
    pure = torch.rand(b, generator=g) < 0.05  # pure noise: the floor of the scale
    x = torch.where(pure.view(b, 1, 1, 1), torch.rand(x.shape, generator=g), x)
    target = torch.where(pure, torch.zeros(b), 1 - severity)
    return x, target


def train_scenes_rewards(out: str | Path = REWARDS_DIR, n_images: int = 8000, steps: int = 800,
                         batch_size: int = 64, width: int = 16, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = world.scenes("reward", n_images)
    images = world.render_many(items).float() / 255.0
    tgt = world.cell_targets(items)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    quality, cells = QualityNet(width), CellNet(width)
    opt = torch.optim.AdamW([*quality.parameters(), *cells.parameters()], lr=2e-3,
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="scenes rewards", mininterval=10)
    for _ in bar:
        idx = torch.randint(0, n_images, (batch_size,), generator=g)
        xq, yq = _quality_batch(images[idx], g)
        lq = F.binary_cross_entropy_with_logits(quality(xq), yq)
        # the cell reader sees mildly degraded images too, as it will see samples
        mild = degrade(images[idx], 0.3 * torch.rand(batch_size, generator=g),
                       torch.randint(0, 3, (batch_size,), generator=g), g)
        o = cells(mild)
        lc = sum(F.cross_entropy(o[k].reshape(-1, o[k].shape[-1]), tgt[k][idx].reshape(-1),
                                 ignore_index=-100) for k in ("cls", "colour", "size"))
        opt.zero_grad(set_to_none=True)
        (lq + lc).backward()
        opt.step()
        sched.step()
        bar.set_postfix(quality=f"{lq.item():.3f}", cells=f"{lc.item():.3f}")
    for name, net in (("scenes-quality", quality), ("scenes-alignment", cells)):
        save_file({k: v.half().contiguous() for k, v in net.state_dict().items()},
                  out / FILES[name])
    meta = {name: {"width": width, "split": "reward", "images": n_images, "steps": steps,
                   "batch_size": batch_size} for name in FILES}
    (out / "rewards.json").write_text(json.dumps(meta, indent=2))
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypersd_core.rewards.scenes_train")
    p.add_argument("--out", default=str(REWARDS_DIR))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--images", type=int, default=8000)
    args = p.parse_args(argv)
    print(json.dumps(train_scenes_rewards(args.out, args.images, args.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
