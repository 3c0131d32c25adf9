"""Tables beyond the base model: control fidelity with the digits ControlNet, and the
base model's adapters applied unchanged to the glow style backbone.

Control: every method draws held-out digits' ink masks (never trained on) with the
caption of that digit in one of the eight colours; control fidelity is the IoU of the
generated ink (brightest channel > 0.25, the dataset's mask threshold) with the mask,
beside digit and colour accuracy. A teacher row without the control image gives the
IoU that chance alignment reaches.

Style: FD is measured against the style backbone's own teacher (25 steps, the model's
CFG, other seeds) in the evaluation feature net's space; style accuracy is the share of
images the style-recognition net calls "glow".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from hypersd_core.digits.evaluate import (
    default_evaluator,
    eval_prompts,
    frechet_distance,
    ink_colour,
    to_tensor,
)
from hypersd_core.worlds import digits

CONTROL_SEED = 2000
STYLE_REF_SEED = 5000


def control_set(num_images: int) -> tuple[list[str], list[int], torch.Tensor]:
    """(prompts, seeds, masks [N,32,32] bool): image i draws held-out digit i mod 362 in
    colour i mod 8, with that digit's caption."""
    _, held = digits.split_indices()
    ink, labels = digits.ink_32(), digits.labels()
    prompts, masks = [], []
    for i in range(num_images):
        idx = int(held[i % len(held)])
        colour = digits.COLOUR_NAMES[i % len(digits.COLOUR_NAMES)]
        prompts.append(digits.caption(colour, int(labels[idx])))
        masks.append(ink[idx] > digits.MASK_THRESHOLD)
    return prompts, [CONTROL_SEED + i for i in range(num_images)], torch.stack(masks)


def ink_iou(images01: torch.Tensor, masks: torch.Tensor,
            threshold: float = digits.MASK_THRESHOLD) -> torch.Tensor:
    """IoU per image [B] of the ink (brightest channel > threshold) with bool masks [B,H,W]."""
    ink = images01.amax(1) > threshold
    inter = (ink & masks).flatten(1).sum(1).float()
    union = (ink | masks).flatten(1).sum(1).float().clamp(min=1)
    return inter / union


def _accuracies(x: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    ev = default_evaluator()
    parsed = [digits.parse_caption(p) for p in prompts]
    want_d = torch.tensor([d for _, d in parsed])
    want_c = torch.tensor([digits.COLOUR_NAMES.index(c) for c, _ in parsed])
    return {"digit_acc": 100 * (ev.predict_digits(x) == want_d).float().mean().item(),
            "colour_acc": 100 * (ink_colour(x) == want_c).float().mean().item()}


def evaluate_control(sampler, methods: list[str], steps_list: list[int], num_images: int,
                     scale: float = 1.0, teacher_steps: int = 25, batch_size: int = 200,
                     log=print) -> list[dict]:
    """One row per (method, steps) with the control image; plus the teacher without it."""
    from hypersd_core.models.controlnet import mask_image

    prompts, seeds, masks = control_set(num_images)
    controls = [mask_image(m) for m in masks]
    def steps_for(m):  # the one-step UNet samples at timesteps=[800] whatever the count
        if m == "hypersd-unet":
            return [1]
        return steps_list + ([teacher_steps] if m == "teacher" and teacher_steps else [])
    plan = [(m, s, True) for m in methods for s in steps_for(m)]
    if teacher_steps:
        plan.append(("teacher", teacher_steps, False))
    rows = []
    for method, steps, control in plan:
        t0 = time.perf_counter()
        gen = sampler.generate(method, steps, prompts, seeds, batch_size=batch_size,
                               control_image=controls if control else None,
                               controlnet_conditioning_scale=scale)
        x = to_tensor(gen.images)
        row = {"method": method, "steps": steps, "control": control, "scale": scale,
               "adapter": gen.adapter, "iou": 100 * ink_iou(x, masks).mean().item(),
               **_accuracies(x, prompts), "s_per_image": float(np.mean(gen.seconds_per_image)),
               "n": num_images, "wall_s": time.perf_counter() - t0}
        log(f"{method:>16} {steps:>2} steps {'control' if control else 'no control'}: "
            f"IoU {row['iou']:.1f}  digit {row['digit_acc']:.1f}%  colour {row['colour_acc']:.1f}%")
        rows.append(row)
    return rows


def control_table(rows: list[dict]) -> str:
    lines = ["| method | steps | control | IoU % | digit acc % | colour acc % | ms / image |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {'mask' if r['control'] else 'none'} | "
                     f"{r['iou']:.1f} | {r['digit_acc']:.1f} | {r['colour_acc']:.1f} | "
                     f"{1000 * r['s_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


def evaluate_style(sampler, methods: list[str], steps_list: list[int], num_images: int,
                   style_net, teacher_steps: int = 25, batch_size: int = 200,
                   base_sampler=None, log=print) -> tuple[list[dict], float]:
    """Rows on the style backbone (adapters of the base, unchanged) and the FD floor
    (the style teacher against itself with other seeds)."""
    ev = default_evaluator()
    prompts, seeds = eval_prompts(num_images)
    _, ref_seeds = eval_prompts(num_images, seed=STYLE_REF_SEED)
    ref = sampler.generate("teacher", teacher_steps, prompts, ref_seeds, batch_size=batch_size)
    ref_feat = ev.features(to_tensor(ref.images))

    def row_for(s, method, steps, backbone_name):
        t0 = time.perf_counter()
        gen = s.generate(method, steps, prompts, seeds, batch_size=batch_size)
        x = to_tensor(gen.images)
        with torch.no_grad():
            style = torch.cat([style_net(x[i:i + 256] * 2 - 1).argmax(1)
                               for i in range(0, len(x), 256)])
        row = {"backbone": backbone_name, "method": method, "steps": steps,
               "adapter": gen.adapter, "fd_style_teacher": frechet_distance(ev.features(x), ref_feat),
               "style_acc": 100 * (style == 1).float().mean().item(), **_accuracies(x, prompts),
               "s_per_image": float(np.mean(gen.seconds_per_image)), "n": num_images,
               "wall_s": time.perf_counter() - t0}
        log(f"{backbone_name:>6} {method:>16} {steps:>2} steps: FD {row['fd_style_teacher']:.2f} "
            f"style {row['style_acc']:.1f}%  digit {row['digit_acc']:.1f}%")
        return row

    rows = [row_for(sampler, "teacher", teacher_steps, "glow")]
    for method in methods:
        for steps in steps_list:
            rows.append(row_for(sampler, method, steps, "glow"))
    if base_sampler is not None:
        rows.append(row_for(base_sampler, "teacher", teacher_steps, "base"))
    return rows, rows[0]["fd_style_teacher"]


def style_table(rows: list[dict]) -> str:
    lines = ["| backbone | method | steps | adapter (from the base) | FD to glow teacher | "
             "style acc % | digit acc % | colour acc % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['method']} | {r['steps']} | {r.get('adapter') or '-'} | "
                     f"{r['fd_style_teacher']:.2f} | {r['style_acc']:.1f} | {r['digit_acc']:.1f} | "
                     f"{r['colour_acc']:.1f} |")
    return "\n".join(lines) + "\n"


def _write(out: str | Path, payload: dict, table: str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _csv(text: str, cast=str) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def main_control(args) -> int:
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.controlnet import load_controlnet
    from hypersd_core.models.sampling import Sampler

    backbone = load_backbone("digits", device=args.device)
    sampler = Sampler(backbone)
    sampler.set_controlnet(load_controlnet(args.controlnet, device=args.device))
    rows = evaluate_control(sampler, _csv(args.methods), _csv(args.steps, int), args.num_images,
                            scale=args.scale, teacher_steps=args.teacher_steps)
    _write(args.out, {"rows": rows, "controlnet": str(args.controlnet),
                      "num_images": args.num_images, "device": args.device}, control_table(rows))
    return 0


def main_style(args) -> int:
    from hypersd_core.digits.style import STYLE_PIPELINE, load_style_net
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    style = Sampler(load_backbone(str(args.style_model or STYLE_PIPELINE), device=args.device))
    base = Sampler(load_backbone("digits", device=args.device))
    rows, floor = evaluate_style(style, _csv(args.methods), _csv(args.steps, int), args.num_images,
                                 load_style_net(), base_sampler=base)
    _write(args.out, {"rows": rows, "fd_floor": floor, "num_images": args.num_images,
                      "device": args.device}, style_table(rows))
    return 0


def add_control_arguments(p) -> None:
    p.add_argument("--controlnet", default="digits", help="'digits', a folder or a hub id")
    p.add_argument("--methods", default="teacher,lcm,tcd,hypersd,hypersd-unified")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--num-images", type=int, default=400)
    p.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/control.json")


def add_style_arguments(p) -> None:
    p.add_argument("--style-model", help="style backbone folder (default: the shipped glow one)")
    p.add_argument("--methods", default="teacher,lcm,tcd,hypersd,hypersd-unified")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--num-images", type=int, default=400)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/style.json")
