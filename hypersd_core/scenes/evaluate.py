"""Evaluation of the scenes world: GenEval in miniature plus distribution distances.

Per image, from the prompt's ground truth and the detector's reading of the 2x2 cells
(``evalnets.GridDetector``, trained on a split disjoint from training and rewards):

- per-object accuracy of class, colour, size (where the prompt names one) and position
  (the side of the grid a relation puts the object on), each prompted object matched to
  the detected object that agrees with it best;
- relation accuracy (both objects found and on the right sides), count accuracy (exactly
  n objects of the prompted class and colour, nothing else), and all-correct.

Per row, against real renders of the ``reference`` split: FD and KID in three spaces (the
detector's features, fixed random conv features, 8x8 pixels), and precision / recall
(Kynkaanniemi et al. 2019) in the detector space. Intervals resample whole generator
sources (layout and style), never single images; the real-vs-real floor splits by source.

``python -m hypersd_core.scenes.evaluate --rows teacher:25,teacher:4 --num-images 2000``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from hypersd_core.paths import SCENES_EVAL
from hypersd_core.scenes.evalnets import EMPTY, EvalNets
from hypersd_core.scenes.summary import (  # noqa: F401 (re-export)
    ACC_KEYS,
    SPACES,
    Replicates,
    floor,
    paired_difference,
    replicates,
    summarize,
)
from hypersd_core.worlds import scenes as world


def _object_scores(want: world.SceneObject, size_given: bool, side: tuple | None,
                   cell: int, read: dict, i: int) -> dict[str, float]:
    r, c = divmod(cell, 2)
    s = {"class": float(read["cls"][i, cell] == world.CLASSES.index(want.cls)),
         "colour": float(read["colour"][i, cell] == world.COLOUR_NAMES.index(want.colour))}
    if size_given:
        s["size"] = float(read["size"][i, cell] == world.SIZE_NAMES.index(want.size))
    if side is not None:
        axis, value = side
        s["position"] = float((c if axis == "col" else r) == value)
    return s


def _sides(scene: world.Scene) -> list[tuple | None]:
    """Where a relation puts each object: ("col", 0) = left half, ("row", 0) = top half."""
    return {"left of": [("col", 0), ("col", 1)], "right of": [("col", 1), ("col", 0)],
            "above": [("row", 0), ("row", 1)], "below": [("row", 1), ("row", 0)]
            }.get(scene.relation, [None] * len(scene.objects))


def score_image(scene: world.Scene, read: dict, i: int) -> dict[str, float]:
    """GenEval-style scores of image i of ``read`` (detector output) against ``scene``."""
    present = [c for c in range(4) if read["cls"][i, c] != EMPTY]
    wants = scene.objects
    given = (scene.size_given * len(wants))[:len(wants)] if scene.template == "count" \
        else scene.size_given
    sides = _sides(scene)
    best, best_total = None, -1.0
    # every injective assignment of prompted objects to detected cells (None: not found)
    options = present + [None] * len(wants)
    for perm in set(itertools.permutations(options, len(wants))):
        if any(a is not None and perm.count(a) > 1 for a in perm):
            continue
        per = [_object_scores(w, g, sd, cell, read, i) if cell is not None else None
               for w, g, sd, cell in zip(wants, given, sides, perm)]
        total = sum(sum(p.values()) for p in per if p)
        if total > best_total:
            best, best_total = per, total
    res: dict[str, float] = {}
    for key, name in (("class", "class_acc"), ("colour", "colour_acc"), ("size", "size_acc"),
                      ("position", "position_acc")):
        vals = [(p.get(key) if p else 0.0) for p, g, sd in zip(best, given, sides)
                if (key != "size" or g) and (key != "position" or sd is not None)]
        res[name] = float(np.mean(vals)) if vals else float("nan")
    objects_ok = all(p and all(v == 1.0 for v in p.values()) for p in best)
    if scene.template == "relation":
        res["relation_acc"] = float(all(p and p["class"] and p["colour"] and p["position"]
                                        for p in best))
        res["count_acc"] = float("nan")
        extra_ok = len(present) == 2
    else:
        match = sum(1 for c in present
                    if read["cls"][i, c] == world.CLASSES.index(wants[0].cls)
                    and read["colour"][i, c] == world.COLOUR_NAMES.index(wants[0].colour))
        res["count_acc"] = float(match == len(wants) and len(present) == len(wants))
        res["relation_acc"] = float("nan")
        extra_ok = len(present) == len(wants)
    res["all_correct"] = float(objects_ok and extra_ok)
    res["n_detected"] = float(len(present))
    return res


def score_images(items: list[world.Scene], read: dict) -> dict[str, np.ndarray]:
    rows = [score_image(s, read, i) for i, s in enumerate(items)]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------- generation and caching

def parse_row(spec: str) -> dict:
    """"method:steps[:adapter]" -> row; e.g. "teacher:25", "lcm:4:runs/x/final"."""
    if spec == "real":  # the eval scenes' own renders: the ceiling of every measure
        return {"method": "real", "steps": 0, "adapter": None, "label": "real renders"}
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(f"a row is METHOD:STEPS[:ADAPTER] with STEPS >= 1, got {spec!r}")
    return {"method": parts[0], "steps": int(parts[1]),
            "adapter": parts[2] if len(parts) == 3 else None,
            "label": f"{parts[0]}@{parts[1]}" + (f" ({_adapter_name(parts[2])})"
                                                 if len(parts) == 3 else "")}


def _adapter_name(path: str) -> str:
    """A row label's adapter: the run's folder for RUN/final/pytorch_lora_weights.safetensors
    or RUN/checkpoints/step-N/lora.safetensors, else the file or folder name."""
    p = Path(path)
    if p.parent.name == "final":
        return p.parent.parent.name
    if p.parent.parent.name == "checkpoints":
        return f"{p.parent.parent.parent.name} {p.parent.name}"
    return p.name


def _images_tensor(pil_images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB")) for im in pil_images])
    return world.to_model(torch.from_numpy(arr).permute(0, 3, 1, 2))


def reference(nets: EvalNets, n: int, cache: Path) -> dict:
    """Features and sources of ``n`` real renders of the ``reference`` split (cached)."""
    path = cache / f"reference-{n}.npz"
    if path.is_file():
        return dict(np.load(path, allow_pickle=False))
    items = world.scenes("reference", n)
    read = nets.read(world.to_model(world.render_many(items)))
    out = {f"f_{s}": read[f"f_{s}"] for s in SPACES}
    out["source"] = np.array([s.source for s in items])
    _save_npz(path, out)
    return out


def _save_npz(path: Path, arrays: dict) -> None:
    """Write a cache file whole or not at all: a stopped evaluation leaves no half-written
    file for the next one to read."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()[:10]


def model_digest(pipe) -> str:
    """A digest of the weights that draw a row (UNet and text encoder): a rebuilt teacher
    never reads the previous teacher's cached rows."""
    import hashlib

    h = hashlib.sha1()
    for part in (pipe.unet, pipe.text_encoder):
        for name, t in sorted(part.state_dict().items()):
            if "lora" in name:  # adapters are keyed by their own file
                continue
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def row_key(row: dict, items: list[world.Scene], guidance: float | None = None,
            model: str = "") -> str:
    """Method, steps, the model's weights (``model_digest``), the adapter file's content,
    the teacher's CFG and the scenes (their seeds): everything that fixes a row's images."""
    adapter = row.get("adapter")
    if adapter is None:
        who = "base"
    elif Path(adapter).is_file():
        who = _digest(Path(adapter).read_bytes())
    else:  # a shipped adapter's name
        who = str(adapter).replace("/", "_")
    cfg = f"-cfg{guidance:g}" if guidance is not None and row["method"] == "teacher" else ""
    seeds = _digest(",".join(str(s.seed) for s in items).encode())
    base = f"{model}-" if model else ""
    return f"{row['method']}-{row['steps']}-{base}{who}{cfg}-{seeds}-{len(items)}"


def generate_row(sampler, nets: EvalNets, row: dict, items: list[world.Scene],
                 cache: Path, batch: int = 50, guidance: float | None = None) -> dict:
    """Generate (or load from cache) a row's images for ``items``; return its arrays.

    The cache is keyed by what fixes the images (``row_key``), not by the row's label: a
    label that later names another checkpoint never reads a stale row, and two tables that
    share a row (the same adapter file) generate it once."""
    model = ""
    if sampler is not None:
        if getattr(sampler, "model_digest", None) is None:
            sampler.model_digest = model_digest(sampler.backbone.pipe)
        model = sampler.model_digest
    path = cache / f"row-{row_key(row, items, guidance, model)}.npz"
    if path.is_file():
        return dict(np.load(path, allow_pickle=False))
    t0 = time.perf_counter()
    chunks = []
    if row["method"] == "real":
        chunks.append(world.to_model(world.render_many(items)))
    for i in range(0, len(items) if sampler is not None and row["method"] != "real" else 0,
                   batch):
        part = items[i:i + batch]
        gen = sampler.generate(row["method"], row["steps"], [s.prompt for s in part],
                               [s.seed for s in part], adapter=row["adapter"],
                               guidance=guidance)
        chunks.append(_images_tensor(gen.images))
    images = torch.cat(chunks)
    read = nets.read(images)
    out = {**{k: v for k, v in read.items()}, **score_images(items, read),
           "source": np.array([s.source for s in items]),
           "seconds": np.array(time.perf_counter() - t0)}
    _save_npz(path, out)
    preview = path.with_suffix(".png")
    _save_grid(images[:16], preview)
    return out


def _save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows = -(-len(x) // cols)
    grid = np.zeros((rows * x.shape[1], cols * x.shape[2], 3), np.uint8)
    for k, im in enumerate(x):
        r, c = divmod(k, cols)
        grid[r * x.shape[1]:(r + 1) * x.shape[1], c * x.shape[2]:(c + 1) * x.shape[2]] = im
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------- summaries

PAIR_KEYS = ("class_acc", "colour_acc", "size_acc", "position_acc", "all_correct",
             "fd_detector", "fd_random", "fd_pixels")


def criteria(arrays: dict[str, dict], summaries: dict[str, dict], ref: dict,
             n_boot: int = 1000) -> dict:
    """Is the world fit to rank methods? (a) teacher@25 learns it; (b) teacher@4 and
    teacher@25 differ beyond their paired interval on some measure; (c) at 2 and at 4 steps
    some pair of rows differs beyond its paired interval. Missing rows: None."""
    out: dict = {}
    t25 = summaries.get("teacher@25")
    if t25 is not None:
        attrs = {k: t25[k] for k in ("class_acc", "colour_acc", "size_acc", "position_acc")}
        out["a"] = {"per_attribute": attrs, "all_correct": t25["all_correct"],
                    "met": min(attrs.values()) >= 90 and t25["all_correct"] >= 70}

    def pair(x, y):
        diffs = {}
        for k in PAIR_KEYS:
            point, ci = paired_difference(arrays[x], arrays[y], ref, k, n_boot)
            diffs[k] = {"diff": point, "ci": ci, "separated": ci[0] > 0 or ci[1] < 0}
        return diffs

    if "teacher@4" in arrays and "teacher@25" in arrays:
        d = pair("teacher@4", "teacher@25")
        out["b"] = {"pair": ["teacher@4", "teacher@25"], "diffs": d,
                    "met": any(v["separated"] for v in d.values())}
    for steps in (2, 4):
        labels = [k for k in arrays if k.split("@")[-1].split(" ")[0] == str(steps)]
        pairs = {f"{x} vs {y}": pair(x, y) for x, y in itertools.combinations(labels, 2)}
        out[f"c{steps}"] = {"pairs": pairs, "met": any(v["separated"] for d in pairs.values()
                                                       for v in d.values()) if pairs else None}
    return out


def criteria_markdown(c: dict) -> str:
    lines = []
    if "a" in c:
        a = c["a"]
        lines.append("- (a) teacher@25 learns the world: per-attribute "
                     + ", ".join(f"{k.removesuffix('_acc')} {v:.1f}%" for k, v in
                                 a["per_attribute"].items())
                     + f"; all-correct {a['all_correct']:.1f}% -> **{'met' if a['met'] else 'not met'}**"
                     " (needs every attribute >= 90% and all-correct >= 70%)")
    if "b" in c:
        sep = [k for k, v in c["b"]["diffs"].items() if v["separated"]]
        lines.append(f"- (b) teacher@4 vs teacher@25 differ beyond the paired 95% interval on: "
                     f"{', '.join(sep) or 'nothing'} -> **{'met' if c['b']['met'] else 'not met'}**")
    for steps in (2, 4):
        cc = c.get(f"c{steps}")
        if cc is None or cc["met"] is None:
            lines.append(f"- (c) at {steps} steps: fewer than two rows measured")
            continue
        seps = [f"{name}: {', '.join(k for k, v in d.items() if v['separated'])}"
                for name, d in cc["pairs"].items() if any(v["separated"] for v in d.values())]
        lines.append(f"- (c) at {steps} steps, pairs separated: {'; '.join(seps) or 'none'} "
                     f"-> **{'met' if cc['met'] else 'not met'}**")
    return "\n".join(lines) + "\n"


def markdown(summaries: dict[str, dict], fl: dict) -> str:
    head = ("| row | class | colour | size | position | relation | count | all-correct | "
            "FD det | FD rand | FD pix | KID det x1e3 | prec | rec |")
    lines = [head, "|" + "---|" * 14]

    def ci(s, k, fmt="{:.1f}"):
        lo, hi = s[f"{k}_ci"]
        return f"{fmt.format(s[k])} [{fmt.format(lo)}, {fmt.format(hi)}]"

    for label, s in summaries.items():
        lines.append("| " + " | ".join([label, *(ci(s, k) for k in ACC_KEYS),
                                        *(ci(s, f"fd_{sp}", "{:.2f}") for sp in SPACES),
                                        f"{s['kid_detector']:.2f}", f"{s['precision']:.0f}",
                                        f"{s['recall']:.0f}"]) + " |")
    lines.append("| real vs real (split by source) | | | | | | | | " + " | ".join(
        f"{fl[f'fd_{sp}']:.2f} [{fl[f'fd_{sp}_ci'][0]:.2f}, {fl[f'fd_{sp}_ci'][1]:.2f}]"
        for sp in SPACES) + " | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypersd_core.scenes.evaluate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="scenes")
    p.add_argument("--rows", default="teacher:1,teacher:2,teacher:4,teacher:8,teacher:25",
                   help="comma-separated METHOD:STEPS[:ADAPTER]")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--reference-images", type=int, default=4000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--floor-splits", type=int, default=200)
    p.add_argument("--guidance", type=float, help="the teacher's CFG (default: the model's)")
    p.add_argument("--eval-nets", default=str(SCENES_EVAL))
    p.add_argument("--split", default="eval", choices=["eval", "tune"])
    p.add_argument("--out", default="results/scenes")
    args = p.parse_args(argv)
    if args.num_images < 2 or args.reference_images < 4:  # noqa: PLR2004
        raise SystemExit("--num-images must be >= 2 and --reference-images >= 4")
    rows = [parse_row(r.strip()) for r in args.rows.split(",") if r.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nets = EvalNets(args.eval_nets)
    ref = reference(nets, args.reference_images, out)
    items = world.scenes(args.split, args.num_images)
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    sampler = Sampler(load_backbone(args.model))
    arrays = {}
    for row in rows:
        arrays[row["label"]] = generate_row(sampler, nets, row, items, out,
                                            guidance=args.guidance)
        print(f"{row['label']}: all-correct {np.nanmean(arrays[row['label']]['all_correct']):.3f}",
              flush=True)
    summaries = {k: summarize(v, ref, args.bootstrap) for k, v in arrays.items()}
    fl = floor(ref, n_splits=args.floor_splits)
    crit = criteria(arrays, summaries, ref, args.bootstrap)
    table = markdown(summaries, fl) + "\n" + criteria_markdown(crit)
    (out / "scenes_eval.json").write_text(json.dumps(
        {"rows": summaries, "floor": fl, "criteria": crit, "num_images": args.num_images,
         "reference_images": args.reference_images, "bootstrap": args.bootstrap,
         "seconds": {k: float(v["seconds"]) for k, v in arrays.items()}}, indent=1))
    (out / "scenes_eval.md").write_text(table)
    print(table)
    return 0


def main_from_cli(args) -> int:
    """``python -m hypersd_core evaluate --model scenes``: methods x steps (+ teacher row)."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    steps = [s.strip() for s in str(args.steps).split(",") if s.strip()]
    rows = [f"{m}:{s}" for m in methods for s in steps]
    if args.teacher_steps:
        rows.append(f"teacher:{args.teacher_steps}")
    out = args.out if not str(args.out).endswith(".json") else str(Path(args.out).parent)
    return main(["--rows", ",".join(rows), "--num-images", str(args.num_images), "--out", out])


if __name__ == "__main__":
    raise SystemExit(main())
