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
