"""Paper-style evaluation of real models (Hyper-SD Table 2): CLIP score, LAION aesthetic,
ImageReward and PickScore per method and step count.

    python -m hypersd_core evaluate --model models/sd15 --prompts assets/prompts/coco_style_100.txt \\
        --metrics clip,aesthetic,imagereward,pickscore --methods teacher,lcm,tcd,hypersd \\
        --adapter lcm=loras/lcm.safetensors --adapter hypersd=loras/Hyper-SD15-1step-lora.safetensors \\
        --reward-weights clip=weights/open_clip_vit_b32.safetensors ...

Reward weights come from local paths: ``--reward-weights NAME=PATH``, a JSON file
``--reward-config`` ({"aesthetic": {"path": ..., "clip_path": ...}, ...}: every key is
passed to :func:`hypersd_core.rewards.load_reward`), or environment variables
``HYPERSD_<NAME>_WEIGHTS`` (e.g. ``HYPERSD_CLIP_WEIGHTS``; ``HYPERSD_AESTHETIC_CLIP`` for
the aesthetic predictor's ViT-L/14). All rewards load before any image is generated,
so missing weights fail in seconds with one clear error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from hypersd_core.paths import ASSETS

DEFAULT_PROMPTS = ASSETS / "prompts" / "coco_style_100.txt"
# metric -> (reward registry name, column title, scale applied for the table)
METRICS: dict[str, tuple[str, str, float]] = {
    "clip": ("clip-score", "CLIP", 1.0),
    "aesthetic": ("aesthetic", "Aes", 1.0),
    "imagereward": ("imagereward", "IR", 1.0),
    "pickscore": ("pickscore", "Pick", 0.01),  # the paper prints PickScore / 100
}
# Hyper-SD paper Table 2 (REFERENCE.md section 2): (model, steps, CLIP, Aes, IR, Pick)
PAPER = {
    "sd15": [("SD15 base", 25, 31.88, 5.26, 0.18, 0.217), ("SD15 LCM", 4, 30.36, 5.66, -0.37, 0.212),
             ("SD15 TCD", 4, 30.62, 5.45, -0.15, 0.214), ("Hyper-SD15 (LoRA)", 1, 30.87, 5.79, 0.29, 0.215)],
    "sdxl": [("SDXL base", 25, 33.16, 5.54, 0.87, 0.229), ("SDXL LCM", 4, 32.43, 5.42, 0.48, 0.224),
             ("SDXL TCD", 4, 32.45, 5.42, 0.67, 0.226), ("Hyper-SDXL (LoRA)", 4, 32.56, 5.74, 0.93, 0.232),
             ("Hyper-SDXL (UNet)", 1, 32.85, 5.85, 1.19, 0.231)],
}


class MissingAdapterError(FileNotFoundError):
    """A method needs an adapter that was not given."""


def parse_metrics(text: str) -> list[str]:
    """'clip,aesthetic,...' -> metric names (empty: all four), with a clear error."""
    names = [m.strip() for m in (text or "").split(",") if m.strip()] or list(METRICS)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    return names


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and '#' comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (one prompt per line; "
                                f"a ready one ships as {DEFAULT_PROMPTS})")
    prompts = [line.strip() for line in path.read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def reward_settings(metrics: list[str], weights: list[str] | None = None,
                    config: str | Path | None = None, env=os.environ) -> dict[str, dict]:
    """load_reward keyword arguments per metric, from the config file, then
    ``--reward-weights`` and the environment (later sources fill only what is unset)."""
    settings: dict[str, dict] = {m: {} for m in metrics}
    if config:
        data = json.loads(Path(config).read_text())
        for key, kw in data.items():
            metric = next((m for m, (reg, *_) in METRICS.items() if key in (m, reg)), None)
            if metric is None:
                raise ValueError(f"{config}: unknown reward {key!r}; use one of {', '.join(METRICS)}")
            if metric in settings:
                settings[metric].update(kw)
    for item in weights or []:
        if "=" not in item:
            raise ValueError(f"--reward-weights expects NAME=PATH, got {item!r}")
        key, path = item.split("=", 1)
        metric = next((m for m, (reg, *_) in METRICS.items() if key in (m, reg)), None)
        if metric is None:
            raise ValueError(f"--reward-weights: unknown reward {key!r}; use one of {', '.join(METRICS)}")
        if metric in settings:
            settings[metric]["path"] = path
    for metric, kw in settings.items():
        kw.setdefault("path", env.get(f"HYPERSD_{metric.upper()}_WEIGHTS") or None)
        if metric == "aesthetic" and env.get("HYPERSD_AESTHETIC_CLIP"):
            kw.setdefault("clip_path", env["HYPERSD_AESTHETIC_CLIP"])
    return settings


def load_rewards(metrics: list[str], settings: dict[str, dict], device: str) -> dict:
    """Every reward, loaded up front; a missing one names the flag and variable to set."""
    from hypersd_core.rewards import RewardWeightsMissing, load_reward

    rewards = {}
    for metric in metrics:
        name = METRICS[metric][0]
        try:
            rewards[metric] = load_reward(name, device=device, **settings[metric])
        except RewardWeightsMissing as err:
            raise RewardWeightsMissing(
                f"{err} -- give the {metric} weights with --reward-weights {metric}=PATH, "
                f"HYPERSD_{metric.upper()}_WEIGHTS=PATH or --reward-config FILE") from None
    return rewards


@torch.no_grad()
def score_all(rewards: dict, images, prompts: list[str], batch_size: int = 16) -> dict[str, float]:
    """Mean score per metric over PIL images (table scale applied)."""
    out = {}
    for metric, reward in rewards.items():
        scores = [reward.score(images[i:i + batch_size], prompts[i:i + batch_size]).float().cpu()
                  for i in range(0, len(images), batch_size)]
        out[metric] = float(torch.cat(scores).mean()) * METRICS[metric][2]
    return out


def plan_rows(methods: list[str], steps: list[int], teacher_steps: int) -> list[tuple[str, int]]:
    """(method, steps) pairs: the teacher at ``teacher_steps`` (the paper's 25), the
    one-step UNet at 1, the others at every step count."""
    jobs = []
    for method in methods:
        if method == "teacher":
            jobs += [(method, s) for s in ([teacher_steps] if teacher_steps else steps)]
        elif method == "hypersd-unet":
            jobs.append((method, 1))
        else:
            jobs += [(method, s) for s in steps]
    return jobs


def adapter_for(sampler, adapters: dict[str, str], method: str, steps: int) -> str | None:
    """``--adapter METHOD@STEPS=FILE`` or ``METHOD=FILE``; else the model's own, or a clear error."""
    from hypersd_core.models.sampling import default_adapter

    given = adapters.get(f"{method}@{steps}") or adapters.get(method)
    if given:
        return given
    name = default_adapter(method, steps)
    if name is None or name in sampler.backbone.adapter_dirs or method == "hypersd-unet":
        return None
    raise MissingAdapterError(f"method {method!r} at {steps} steps needs an adapter: pass "
                              f"--adapter {method}=FILE (or {method}@{steps}=FILE)")


def evaluate_real(sampler, rewards: dict, prompts: list[str], jobs: list[tuple[str, int]],
                  adapters: dict[str, str], batch_size: int = 4, seed: int = 1000,
                  log=print) -> list[dict]:
    """One row per (method, steps): the mean of each metric over the prompts."""
    seeds = [seed + i for i in range(len(prompts))]
    rows = []
    for method, steps in jobs:
        adapter = adapter_for(sampler, adapters, method, steps)
        t0 = time.perf_counter()
        gen = sampler.generate(method, steps, prompts, seeds, adapter=adapter, batch_size=batch_size)
        row = {"method": method, "steps": steps, "adapter": gen.adapter,
               **score_all(rewards, gen.images, prompts),
               "s_per_image": sum(gen.seconds_per_image) / len(gen.seconds_per_image),
               "n": len(prompts), "wall_s": time.perf_counter() - t0}
        log(f"{method:>16} {steps:>2} steps: " + "  ".join(
            f"{METRICS[m][1]} {row[m]:.4g}" for m in rewards))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], metrics: list[str], kind: str | None = None) -> str:
    """Our rows shaped like the paper's Table 2, then the paper's own rows for the kind."""
    head = "| method | steps | adapter | " + " | ".join(METRICS[m][1] for m in metrics) + " | s / image |"
    lines = [head, "|" + "---|" * (len(metrics) + 4)]
    for r in rows:
        cells = " | ".join(f"{r[m]:.3f}" if m == "pickscore" else f"{r[m]:.2f}" for m in metrics)
        lines.append(f"| {r['method']} | {r['steps']} | {r.get('adapter') or '-'} | {cells} | "
                     f"{r['s_per_image']:.3f} |")
    if kind in PAPER:
        lines += ["", "Paper (Hyper-SD Table 2, COCO-5k; CLIP ViT-B/32, LAION aesthetic, "
                  "ImageReward, PickScore / 100):", "",
                  "| model | steps | CLIP | Aes | IR | Pick |", "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {s} | {c} | {a} | {i} | {p} |" for m, s, c, a, i, p in PAPER[kind]]
    lines.append("\nPickScore is shown / 100 as the paper prints it; CLIP score is 100 x cosine.")
    return "\n".join(lines) + "\n"


def main_evaluate_real(args, methods: list[str], steps: list[int], adapters: dict[str, str]) -> int:
    """``evaluate --model <sd15|sdxl folder>``: the four paper metrics -> JSON + Markdown."""
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import RECIPES, Sampler

    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(RECIPES)}")
    metrics = parse_metrics(getattr(args, "metrics", ""))
    prompts = read_prompts(getattr(args, "prompts", None) or DEFAULT_PROMPTS)
    prompts = prompts[:max(1, min(args.num_images, len(prompts)))]
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = reward_settings(metrics, getattr(args, "reward_weights", None),
                               getattr(args, "reward_config", None))
    rewards = load_rewards(metrics, settings, device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    backbone = load_backbone(args.model, device=device, dtype=dtype)
    sampler = Sampler(backbone)
    jobs = plan_rows(methods, steps, args.teacher_steps)
    for method, n in jobs:  # every adapter is checked before the first image
        adapter_for(sampler, adapters, method, n)
    rows = evaluate_real(sampler, rewards, prompts, jobs, adapters,
                         batch_size=getattr(args, "batch_size", None) or 4, log=print)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "kind": backbone.kind, "metrics": metrics,
                               "num_prompts": len(prompts), "rows": rows,
                               "paper": PAPER.get(backbone.kind, [])}, indent=1))
    table = markdown_table(rows, metrics, backbone.kind)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0
