"""Reward scores and digits metrics of adapters on held-out seeds: the before/after
table of the feedback stage.

    python -m hypersd_core.digits.reward_eval --entry k1=hypersd:1:hypersd-k1 \\
        --entry k1-feedback=hypersd:1:hypersd-k1-feedback --num-images 800 --out results/feedback.json

Each entry is LABEL=METHOD:STEPS:ADAPTER (an adapter name of the digits world or a LoRA
file). Seeds start at 50000, apart from the evaluate table's (1000+) and training's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hypersd_core.rewards.reward_log import DIGITS_REWARDS

HELDOUT_SEED = 50_000


def score_entries(sampler, entries: list[tuple[str, str, int, str]], num_images: int,
                  seed: int = HELDOUT_SEED, log=print) -> list[dict]:
    """One row per (label, method, steps, adapter): mean rewards plus digit/colour acc and FD."""
    import torch

    from hypersd_core.digits.evaluate import default_evaluator, eval_prompts
    from hypersd_core.rewards import load_reward

    evaluator = default_evaluator()
    rewards = {n: load_reward(n) for n in DIGITS_REWARDS}
    prompts, seeds = eval_prompts(num_images, seed)
    rows = []
    for label, method, steps, adapter in entries:
        gen = sampler.generate(method, steps, prompts, seeds, adapter=adapter, batch_size=200)
        row = {"label": label, "method": method, "steps": steps, "adapter": adapter,
               **evaluator.metrics(gen.images, prompts)}
        with torch.no_grad():
            for name, reward in rewards.items():
                scores = torch.cat([reward.score(gen.images[i:i + 200], prompts[i:i + 200])
                                    for i in range(0, num_images, 200)])
                row[name] = float(scores.mean())
        log(f"{label:>20}: " + "  ".join(f"{k} {row[k]:.4f}" for k in
                                          ("digits-quality", "digits-alignment", "digit_acc",
                                           "colour_acc", "fd")))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| adapter | method | steps | digits-quality | digits-alignment | digit acc % | "
             "colour acc % | FD |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['method']} | {r['steps']} | {r['digits-quality']:.4f} | "
                     f"{r['digits-alignment']:.4f} | {r['digit_acc']:.1f} | {r['colour_acc']:.1f} | "
                     f"{r['fd']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Digits rewards and metrics of adapters.")
    parser.add_argument("--entry", action="append", required=True,
                        metavar="LABEL=METHOD:STEPS:ADAPTER")
    parser.add_argument("--num-images", type=int, default=800)
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED)
    parser.add_argument("--out", default="results/feedback.json")
    args = parser.parse_args(argv)
    entries = []
    for item in args.entry:
        try:
            label, rest = item.split("=", 1)
            method, steps, adapter = rest.split(":", 2)
            entries.append((label, method, int(steps), adapter))
        except ValueError:
            parser.error(f"--entry must be LABEL=METHOD:STEPS:ADAPTER, got {item!r}")
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    rows = score_entries(Sampler(load_backbone("digits")), entries, args.num_images, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "num_images": args.num_images, "seed": args.seed},
                              indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
