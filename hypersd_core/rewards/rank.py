"""Does a reward rank what it claims to? The world-agnostic half of the ranking tables
(``digits_rank.py``, ``scenes_rank.py``): mean score per image set with a bootstrap 95%
interval, and the markdown table."""

from __future__ import annotations

import numpy as np
import torch


def mean_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """Mean and percentile-bootstrap 95% interval of per-image scores."""
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(values.mean()), [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


@torch.no_grad()
def ranking_table(sets: dict[str, tuple[torch.Tensor, list[str]]], models: dict,
                  n_boot: int = 1000, batch_size: int = 256) -> list[dict]:
    """One row per set: {"set", "n", <reward>: mean, <reward>_ci: [lo, hi]}.

    ``sets``: {name: (images [N,3,H,W] in [0,1], prompts)}; ``models``: {name: Reward}."""
    rows = []
    for name, (x, prompts) in sets.items():
        row: dict = {"set": name, "n": len(x)}
        for rname, model in models.items():
            scores = torch.cat([model.score(x[i:i + batch_size], prompts[i:i + batch_size])
                                for i in range(0, len(x), batch_size)]).double().numpy()
            row[rname], row[rname + "_ci"] = mean_interval(scores, n_boot)
        rows.append(row)
    return rows


def markdown(rows: list[dict], rewards: tuple[str, ...]) -> str:
    lines = ["| set | n | " + " | ".join(rewards) + " |", "|---|---|" + "---|" * len(rewards)]
    for r in rows:
        cells = [f"{r[k]:.3f} [{r[k + '_ci'][0]:.3f}, {r[k + '_ci'][1]:.3f}]" for k in rewards]
        lines.append(f"| {r['set']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cli(argv, prog: str, description: str, run, rewards: tuple[str, ...], where: str = "") -> int:
    """The ranking tables' command line: --num-images, --weights, --n-boot, --out.
    ``run(num_images, weights, n_boot)`` returns the rows."""
    import argparse
    import json
    import time
    from pathlib import Path

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--num-images", type=int, default=256, help="images per set")
    p.add_argument("--weights", help="a rewards folder (default: the shipped one)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.num_images < 2 or args.n_boot < 1:
        raise SystemExit("--num-images must be >= 2 and --n-boot >= 1")
    t0 = time.perf_counter()
    rows = run(args.num_images, args.weights, args.n_boot)
    print(markdown(rows, rewards))
    print(f"{args.num_images} images per set{where}, {args.n_boot} bootstrap replicates, "
          f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0
