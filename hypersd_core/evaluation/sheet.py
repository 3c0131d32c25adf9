"""An image sheet: one column per prompt (its text on top), one row per method, for any
world (``scenes/sheet.py``, ``digits/sheet.py``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np


def draw_sheet(columns: dict[str, list], prompts: list[str], out: str | Path,
               scale: float = 1.6) -> Path:
    """columns: row label -> PIL images (one per prompt). One column per prompt (its text
    on top), one row per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = len(prompts), len(columns)
    fig, axes = plt.subplots(m, n, figsize=(scale * n, scale * m + 0.9), squeeze=False)
    for c, prompt in enumerate(prompts):
        for r, (label, images) in enumerate(columns.items()):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[c]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                # a long label wraps so that it stays beside its own row
                ax.set_ylabel("\n".join(textwrap.wrap(label, 18)), fontsize=8)
        axes[0, c].set_title("\n".join(textwrap.wrap(prompt, 22)), fontsize=6.5)
    return save_figure(fig, out, dpi=100)


def save_figure(fig, out: str | Path, dpi: int = 100) -> Path:
    """Lay out, write (its folder made) and close a matplotlib figure; the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
