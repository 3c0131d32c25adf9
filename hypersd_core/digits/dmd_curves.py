"""DMD2's training curves of a protocol root: the distribution-matching loss, the fake
score's loss, the classifier's loss (chance 1.386) and the rewards the sample grids were
scored with (one panel each), for the reward-on (``dmd``) and reward-free (``dmd-nofb``)
rows, the losses smoothed over 10 logs. Any world's protocol root: ``--runs`` names its
DMD runs, and a loss none of them logs is left out.

``python -m hypersd_core.digits.dmd_curves --root runs/protocol --out dmd_curves.png``
``python -m hypersd_core.digits.dmd_curves --root runs/protocol-scenes --runs dmd,dmd-advoff --out c.png``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hypersd_core.evaluation.sheet import save_figure

PANELS = (("loss_dmd", "distribution-matching loss"), ("loss_fake", "fake-score loss"),
          ("loss_cls", "classifier loss (chance 1.386)"))
# then one panel per reward the sample grids were scored with (``reward/NAME``)
COLOURS = {"dmd": "tab:purple", "dmd-nofb": "tab:pink", "dmd-advoff": "tab:olive"}


def series(metrics: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    return _points([json.loads(line) for line in metrics.read_text().splitlines()], key)


def _points(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(d["step"], d[key]) for d in records if key in d]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = map(np.asarray, zip(*pts))
    return x, y


def plot(root: str | Path, out: str | Path, runs=("dmd", "dmd-nofb"), smooth: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {run: [json.loads(line) for line in path.read_text().splitlines()]
            for run in runs if (path := Path(root) / run / "metrics.jsonl").is_file()}
    logged = {k for records in logs.values() for d in records for k in d}
    panels = [(key, title) for key, title in PANELS if key in logged]
    panels += [(k, f"sample grid: {k.split('/', 1)[1]}") for k in sorted(logged)
               if k.startswith("reward/")]
    if not panels:
        raise ValueError(f"no DMD metrics of runs {list(runs)} under {root}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for run, records in logs.items():
            x, y = _points(records, key)
            if len(y) > smooth and not key.startswith("reward/"):
                y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
                x = x[smooth - 1:]
            if len(y):
                ax.plot(x, y, marker="o" if key.startswith("reward/") else None,
                        label=run, color=COLOURS.get(run))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, out, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypersd_core.digits.dmd_curves")
    p.add_argument("--root", default="runs/protocol")
    p.add_argument("--runs", default="dmd,dmd-nofb", help="comma-separated DMD run names")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(plot(args.root, args.out, runs=tuple(args.runs.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
