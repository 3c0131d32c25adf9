"""Metric tables at 1/2/4/8 steps.

Digits world: digit accuracy (the evaluation classifier recognises the prompted
digit), colour accuracy (the ink's colour is nearest the prompted colour), and FD,
the Frechet distance to held-out real digits in the evaluation feature net's space
(the real-vs-real FD of two held-out halves is reported as the floor).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hypersd_core.paths import DIGITS_EVAL
from hypersd_core.worlds import digits

PALETTE = torch.tensor([digits.COLOURS[c] for c in digits.COLOUR_NAMES], dtype=torch.float32) / 255


def to_tensor(images) -> torch.Tensor:
    """PIL list or tensor -> float [B,3,H,W] in [0,1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def ink_colour(images: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Palette index of each image's ink colour [B] (images in [0,1]).

    Ink = pixels whose brightest channel exceeds ``threshold``; their mean colour is
    scaled so its brightest channel is 1 (intensity follows the ink), then matched to
    the nearest palette colour.
    """
    peak = images.amax(1, keepdim=True)  # [B,1,H,W]
    ink = (peak > threshold).float()
    mean = (images * ink).sum((2, 3)) / ink.sum((2, 3)).clamp(min=1)
    mean = mean / mean.amax(1, keepdim=True).clamp(min=1e-6)
    return torch.cdist(mean, PALETTE).argmin(1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets [N,D] and [M,D]."""
    from hypersd_core.digits.frechet import fd

    return fd(a.double().numpy(), b.double().numpy())


class DigitsEvaluator:
    """The digits metrics with the shipped evaluation networks."""

    def __init__(self, folder: str | Path = DIGITS_EVAL):
        from hypersd_core.digits.evalnets import load_eval_nets

        self.classifier, self.featnet = load_eval_nets(folder)
        held = digits.DigitsDataset("heldout").tensors()
        self.real_features = self.features((held["images"] + 1) / 2)
        # the floor splits by source: the 8 colourings of one handwritten shape stay in
        # one half (split by image, the halves share shapes and the floor reads too low)
        from hypersd_core.protocol.stats import cluster_split

        shapes = np.repeat(digits.split_indices()[1], len(digits.COLOUR_NAMES))
        first, second = cluster_split(shapes, np.random.default_rng(0))
        self.fd_floor = frechet_distance(self.real_features[first], self.real_features[second])

    @torch.no_grad()
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.featnet.features(images01[i:i + 256] * 2 - 1)
                          for i in range(0, len(images01), 256)])

    @torch.no_grad()
    def predict_digits(self, images01: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(images01[i:i + 256] * 2 - 1).argmax(1)
                          for i in range(0, len(images01), 256)])

    def metrics(self, images, prompts: list[str]) -> dict[str, float]:
        """digit_acc, colour_acc (in %) and fd of generated images against their prompts."""
        x = to_tensor(images)
        if x.shape[1:] != (3, digits.RESOLUTION, digits.RESOLUTION):
            raise ValueError(f"digits metrics need 3x32x32 images, got {tuple(x.shape[1:])}")
        parsed = [digits.parse_caption(p) for p in prompts]
        want_digit = torch.tensor([d for _, d in parsed])
        want_colour = torch.tensor([digits.COLOUR_NAMES.index(c) for c, _ in parsed])
        return {
            "digit_acc": 100 * (self.predict_digits(x) == want_digit).float().mean().item(),
            "colour_acc": 100 * (ink_colour(x) == want_colour).float().mean().item(),
            "fd": frechet_distance(self.features(x), self.real_features),
        }


@lru_cache(maxsize=1)
def default_evaluator() -> DigitsEvaluator:
    return DigitsEvaluator()


def eval_prompts(num_images: int, seed: int = 1000) -> tuple[list[str], list[int]]:
    """The same prompts and seeds for every method: image i uses prompt i mod 80."""
    prompts = [digits.ALL_PROMPTS[i % len(digits.ALL_PROMPTS)][0] for i in range(num_images)]
    return prompts, [seed + i for i in range(num_images)]


def evaluate_digits(sampler, methods: list[str], steps_list: list[int], num_images: int,
                    teacher_steps: int = 25, batch_size: int = 200, adapters: dict | None = None,
                    guidance: float | None = None, log=print) -> list[dict]:
    """One row per (method, steps): metrics plus seconds per image."""
    evaluator = default_evaluator()
    prompts, seeds = eval_prompts(num_images)
    rows = []
    for method in methods:
        steps_for = list(steps_list)
        if method == "teacher" and teacher_steps and teacher_steps not in steps_for:
            steps_for.append(teacher_steps)
        for steps in steps_for:
            t0 = time.perf_counter()
            cfg = guidance if method == "teacher" else None
            gen = sampler.generate(method, steps, prompts, seeds, batch_size=batch_size,
                                   adapter=(adapters or {}).get(method), guidance=cfg)
            row = {"method": method, "steps": steps, "adapter": gen.adapter,
                   "guidance": cfg if cfg is not None else
                   (sampler.backbone.guidance_scale if method == "teacher" else 0.0),
                   **evaluator.metrics(gen.images, prompts),
                   "s_per_image": float(np.mean(gen.seconds_per_image)),
                   "n": num_images, "wall_s": time.perf_counter() - t0}
            log(f"{method:>16} {steps:>2} steps: digit {row['digit_acc']:.1f}%  "
                f"colour {row['colour_acc']:.1f}%  FD {row['fd']:.2f}")
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], floor: float | None = None) -> str:
    lines = ["| method | steps | CFG | adapter | digit acc % | colour acc % | FD | ms / image |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r.get("guidance") or "-"
        lines.append(f"| {r['method']} | {r['steps']} | {cfg} | {r.get('adapter') or '-'} | "
                     f"{r['digit_acc']:.1f} | {r['colour_acc']:.1f} | {r['fd']:.2f} | "
                     f"{1000 * r['s_per_image']:.2f} |")
    if floor is not None:
        lines.append(f"\nFD floor (real vs real, two held-out halves): {floor:.2f}")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], out_png: str | Path, metrics=("digit_acc", "colour_acc", "fd"),
              floor: float | None = None) -> None:
    """One panel per metric against steps, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for method, cfg in dict.fromkeys((r["method"], r.get("guidance") or 0) for r in rows):
            pts = sorted((r["steps"], r[metric]) for r in rows if r["method"] == method
                         and (r.get("guidance") or 0) == cfg and r["steps"] <= 8)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{method} (CFG {cfg})" if cfg else method)
        if metric == "fd" and floor is not None:
            ax.axhline(floor, color="grey", ls=":", label="real-vs-real floor")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("steps")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--model", default="digits")
    p.add_argument("--methods", default="teacher,lcm,tcd,hypersd,hypersd-unified")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--teacher-steps", type=int, default=25,
                   help="extra teacher row at this step count (0: none)")
    p.add_argument("--num-images", type=int, default=800)
    p.add_argument("--out", default="results/results.json")
    p.add_argument("--metrics", default="", help="real models: clip,aesthetic,imagereward,pickscore")
    p.add_argument("--prompts", help="real models: a prompt list file (one per line)")
    p.add_argument("--guidance", type=float,
                   help="the teacher's CFG scale (default: the model's recommended one)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out table (same method and steps: replaced)")
    p.add_argument("--adapter", action="append", default=[], metavar="METHOD=FILE",
                   help="use FILE as METHOD's adapter (e.g. hypersd-unified=runs/x/final)")
    p.add_argument("--reward-weights", action="append", default=[], metavar="NAME=PATH",
                   help="real models: local reward weights (clip, aesthetic, imagereward, pickscore)")
    p.add_argument("--reward-config", help="real models: JSON of load_reward arguments per reward")


def main_evaluate(args) -> int:
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    try:
        steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps must be integers >= 1, got {args.steps!r}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    adapters = dict(item.split("=", 1) for item in args.adapter)
    if args.model != "digits":
        from hypersd_core.evaluation.paper_metrics import main_evaluate_real

        return main_evaluate_real(args, methods, steps, adapters)
    sampler = Sampler(load_backbone("digits"))
    rows = evaluate_digits(sampler, methods, steps, args.num_images, args.teacher_steps,
                           adapters=adapters, guidance=args.guidance)
    floor = default_evaluator().fd_floor
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        def key(r):
            return r["method"], r["steps"], r.get("guidance")
        new = {key(r) for r in rows}
        old = [r for r in json.loads(out.read_text())["rows"] if key(r) not in new]
        order = list(dict.fromkeys([r["method"] for r in old] + [r["method"] for r in rows]))
        rows = sorted(old + rows, key=lambda r: (order.index(r["method"]), -(r.get("guidance") or 0),
                                                 r["steps"]))
    out.write_text(json.dumps({"rows": rows, "fd_floor": floor, "num_images": args.num_images},
                              indent=1))
    out.with_suffix(".md").write_text(markdown_table(rows, floor))
    plot_rows(rows, out.with_suffix(".png"), floor=floor)
    print(markdown_table(rows, floor))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0
