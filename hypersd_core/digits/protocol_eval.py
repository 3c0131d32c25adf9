"""Evaluation of a protocol root (``digits/protocol.py``): every row the README's tables
and curves need, generated and measured in one pass.

    python -m hypersd_core.digits.protocol_eval --root runs/protocol --out results/protocol

Seeds (image i uses prompt i mod 80 and seed base + i):
  eval 1000 (800 images; the README tables), tune 5000 (400; choices: eta, variants, lr),
  curve 7000 (400; quality against training samples), teacher reference 9000 (800; the
  teacher at the recommended CFG, 25 steps: the target of FD vs teacher).
Writes rows.json (point metrics of every row) and arrays-*.npz (per-image features and
correctness of the eval rows, for bootstrap intervals), trajectory.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hypersd_core.digits.evaluate import eval_prompts
from hypersd_core.protocol.runner import copy_adapter, matched_adapter, run_samples  # noqa: F401 (copy_adapter: re-exported)

SEEDS = {"eval": (1000, 800), "tune": (5000, 400), "curve": (7000, 400), "ref": (9000, 800)}
STEPS = (1, 2, 4, 8)
ETAS = (0.0, 0.3, 0.5, 0.7, 1.0)
WEIGHTS = "final/pytorch_lora_weights.safetensors"


def row_specs(root: Path) -> list[dict]:
    """Rows in priority order: {"id", "seeds", "method", "steps", "adapter" (file or
    None), "eta", "save" (keep per-image arrays)}."""
    rows: list[dict] = []

    def add(id_, seeds, method, steps, run=None, eta=None, file=None, save=False):
        adapter = file if file is not None else (root / run / WEIGHTS if run else None)
        rows.append({"id": id_, "seeds": seeds, "method": method, "steps": steps,
                     "adapter": str(adapter) if adapter else None, "eta": eta, "save": save})

    for n in STEPS + (25,):
        add(f"teacher@{n}", "eval", "teacher", n, save=True)
    samples = run_samples(root)
    for n in STEPS:
        # equal budgets: a baseline row is the baseline's checkpoint with the training
        # samples of the Hyper-SD row it is compared with (its N-step adapter: lcm@N; the
        # unified adapter: lcm@N/u, the baselines' final adapter, trained to unified's count)
        for b in ("lcm", "tcd"):
            add(f"{b}@{n}", "eval", b, n, file=matched_adapter(root, b, samples.get(f"k{n}")),
                save=True)
            add(f"{b}@{n}/u", "eval", b, n, b, save=True)
        add(f"hypersd@{n}", "eval", "hypersd", n, f"k{n}", save=True)
    for n in STEPS:
        for eta in ETAS:
            add(f"unified@{n}/eta{eta}", "tune", "hypersd-unified", n, "dmd", eta)
    for n in STEPS:  # which Hyper-SD row (N-step or unified) the leads table names
        add(f"hypersd@{n}", "tune", "hypersd", n, f"k{n}")
    for n in STEPS:
        for eta in ETAS:
            add(f"unified@{n}/eta{eta}", "eval", "hypersd-unified", n, "dmd", eta, save=True)
    # ablations: tune seeds to choose, eval seeds to report
    abl = [("k8-edge", 8), ("k8-huber", 8), ("k8-tuniform", 8), ("k8-perturb", 8), ("k8", 8),
           ("k2-advoff", 2), ("k2-advdata", 2), ("k2", 2), ("k1-advoff", 1), ("k1-advdata", 1),
           ("k1", 1), ("k1-direct", 1)]
    for seeds in ("tune", "eval"):
        for run, n in abl:
            add(f"{run}@{n}", seeds, "hypersd", n, run, save=seeds == "eval")
        for n in STEPS:
            for run in ("dmd-nofb", "feedback"):
                for eta in (0.0, 0.3, 1.0):  # the unified recipe's candidates that win
                    add(f"{run}-unified@{n}/eta{eta}", seeds, "hypersd-unified", n, run, eta,
                        save=seeds == "eval")
    # learning-rate search: 600 steps at every point, the presets' own included
    from hypersd_core.digits.protocol import LR_POINTS

    for lr in LR_POINTS:
        for name in ("lcm", "tcd"):
            for n in STEPS:
                add(f"{name}-lr{lr}@{n}", "tune", name, n, f"{name}-lr{lr}")
        add(f"k8-lr{lr}@8", "tune", "hypersd", 8, f"k8-lr{lr}")
    # quality against training samples (checkpoints)
    for name in ("lcm", "tcd"):
        for ck in sorted((root / name / "checkpoints").glob("step-*")):
            for n in STEPS:
                add(f"{name}/{ck.name}@{n}", "curve", name, n, file=ck / "lora.safetensors")
    for k in (8, 4, 2, 1):
        for ck in sorted((root / f"k{k}" / "checkpoints").glob("step-*")):
            add(f"k{k}/{ck.name}@{k}", "curve", "hypersd", k, file=ck / "lora.safetensors")
    for ck in sorted((root / "k1-direct" / "checkpoints").glob("step-*")):
        add(f"k1-direct/{ck.name}@1", "curve", "hypersd", 1, file=ck / "lora.safetensors")
    for run in ("dmd", "dmd-nofb"):  # DMD2's curves, at one step
        for ck in sorted((root / run / "checkpoints").glob("step-*")):
            add(f"{run}/{ck.name}@1", "curve", "hypersd-unified", 1, file=ck / "lora.safetensors")
    return rows


def run_of(spec: dict, root: Path) -> str | None:
    """The protocol run a row's adapter comes from (None: the teacher or a foreign file)."""
    if not spec["adapter"]:
        return None
    try:
        return Path(spec["adapter"]).resolve().relative_to(Path(root).resolve()).parts[0]
    except ValueError:
        return None


def select_rows(specs: list[dict], root: Path, part: str) -> list[dict]:
    """``part``: all; main (the teacher and the shipped runs: LCM, TCD, the chain); rest
    (the ablations and the learning-rate search). main then rest can run as two passes
    (two --out folders, both given to protocol_report)."""
    from hypersd_core.digits.protocol import SHIPPED

    if part == "all":
        return specs
    main = [s for s in specs if run_of(s, root) in (None, *SHIPPED)]
    return main if part == "main" else [s for s in specs if s not in main]


def shipped_row_specs(extra: list[str] = ()) -> list[dict]:
    """The main table for the adapters in assets/digits/adapters (eval seeds), the unified
    adapter at eta 0.3 and 1.0, and ``extra`` rows "ID=METHOD:STEPS:FILE"."""
    rows = []
    for n in STEPS + (25,):
        rows.append({"id": f"teacher@{n}", "seeds": "eval", "method": "teacher", "steps": n,
                     "adapter": None, "eta": None, "save": True})
    for n in STEPS:
        for method, label in (("lcm", "lcm"), ("tcd", "tcd"), ("hypersd", "hypersd")):
            rows.append({"id": f"{label}@{n}", "seeds": "eval", "method": method, "steps": n,
                         "adapter": None, "eta": None, "save": True})
        for eta in (0.3, 1.0):
            rows.append({"id": f"unified@{n}/eta{eta}", "seeds": "eval",
                         "method": "hypersd-unified", "steps": n, "adapter": None, "eta": eta,
                         "save": True})
    for item in extra:
        id_, spec = item.split("=", 1)
        method, steps, file = spec.split(":", 2)
        rows.append({"id": id_, "seeds": "eval", "method": method, "steps": int(steps),
                     "adapter": file, "eta": None, "save": True})
    return rows


def run_eval(root: str | Path, out: str | Path, device: str = "cpu",
             deadline_s: float | None = None, trajectories: bool = True, num_scale: float = 1.0,
             specs: list[dict] | None = None, shipped: bool = False, log=print) -> dict:
    import torch

    from hypersd_core.digits.metrics import DigitsMetrics, point_metrics
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    t0 = time.perf_counter()
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(load_backbone("digits", device=device))
    metrics = DigitsMetrics(device)
    prompts_of = {k: eval_prompts(max(8, round(n * num_scale)), seed)
                  for k, (seed, n) in SEEDS.items()}
    p, s = prompts_of["ref"]
    gen = sampler.generate("teacher", 25, p, s, batch_size=400)
    teacher_ref = metrics.row_arrays(gen.images, p)
    saved = {"ref/teacher@25": teacher_ref}
    results: dict = {"rows": [], "skipped": [], "fd_floor": float(metrics.ev.fd_floor)}
    copies = Path(tempfile.mkdtemp(prefix="protocol-adapters-"))
    for spec in (specs if specs is not None else row_specs(root)):
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            results["skipped"].append(spec["id"] + " (deadline)")
            continue
        if spec["adapter"] and not Path(spec["adapter"]).is_file():
            results["skipped"].append(spec["id"] + " (no adapter)")
            continue
        prompts, seeds = prompts_of[spec["seeds"]]
        t1 = time.perf_counter()
        adapter = spec["adapter"]
        if adapter:  # the sampler names a file adapter by its stem: give each file its own
            unique = copies / (hashlib.sha1(adapter.encode()).hexdigest()[:16] + ".safetensors")
            if not unique.is_file():
                copy_adapter(adapter, unique)
            adapter = str(unique)
        try:
            gen = sampler.generate(spec["method"], spec["steps"], prompts, seeds,
                                   adapter=adapter, eta=spec["eta"], batch_size=400)
        except Exception as err:  # one bad row must not lose the others
            results["skipped"].append(f"{spec['id']} ({type(err).__name__}: {err})")
            continue
        arrays = metrics.row_arrays(gen.images, prompts)
        row = {k: v for k, v in spec.items() if k != "save"}
        row.update(point_metrics(arrays, metrics.real, teacher_ref), seconds=time.perf_counter() - t1)
        results["rows"].append(row)
        if spec["save"]:
            saved[f"{spec['seeds']}/{spec['id']}"] = arrays
        log(f"{spec['seeds']:>5} {spec['id']:<34} FD {row['fd_real']:6.2f} / teacher "
            f"{row['fd_teacher']:5.2f}  random {row['fd_real_random']:6.2f}  pixel "
            f"{row.get('fd_real_pixel', float('nan')):6.3f}  disjoint "
            f"{row.get('fd_real_disjoint', float('nan')):6.2f}  hue err "
            f"{row.get('hue_err', float('nan')):5.1f}  digit {row['digit_acc']:5.1f}")
        (out / "rows.json").write_text(json.dumps(results, indent=1))
    save_arrays(saved, metrics.real, out)
    if trajectories:
        try:
            from hypersd_core.digits.trajectory import trajectory_error

            p, s = eval_prompts(64, 1000)
            traj = []
            for method, run in (("hypersd", None), ("lcm", "lcm"), ("tcd", "tcd"),
                                ("hypersd-unified", "dmd")):
                for n in (2, 4, 8):
                    adapter = root / (run or f"k{n}") / WEIGHTS
                    if shipped:  # the shipped adapters
                        from hypersd_core.models.sampling import default_adapter
                        from hypersd_core.paths import DIGITS_ADAPTERS

                        adapter = (DIGITS_ADAPTERS / default_adapter(method, n)
                                   / "pytorch_lora_weights.safetensors")
                    if adapter.is_file():
                        unique = copies / f"traj-{method}-{n}.safetensors"
                        copy_adapter(adapter, unique)
                        traj.append(trajectory_error(sampler, method, n, p, s, adapter=str(unique)))
            (out / "trajectory.json").write_text(json.dumps(traj, indent=1))
        except Exception as err:  # the rows above are kept
            log(f"trajectory diagnostic failed: {type(err).__name__}: {err}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "rows.json").write_text(json.dumps(results, indent=1))
    del torch
    return results


def _compact(arr: np.ndarray) -> np.ndarray:
    """float -> float16, bool -> uint8, integers (cluster ids) -> int32."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float16)
    return arr.astype(np.uint8) if arr.dtype == bool else arr.astype(np.int32)


def save_arrays(saved: dict, real: dict, out: Path, files: int = 3) -> None:
    """Per-image arrays as float16 / uint8 in at most ``files`` npz files."""
    keys = sorted(saved)
    size = max(1, -(-len(keys) // files))
    chunks = [keys[i:i + size] for i in range(0, len(keys), size)] or [[]]
    for j, chunk in enumerate(chunks):
        flat = {}
        for key in chunk:
            for field, arr in saved[key].items():
                flat[f"{key}|{field}"] = _compact(arr)
        if j == 0:
            for space, arr in real.items():
                flat[f"real|{space}"] = _compact(arr)
        np.savez_compressed(out / f"arrays-{j}.npz", **flat)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="runs/protocol")
    p.add_argument("--out", default="results/protocol")
    p.add_argument("--device", default="cpu")
    p.add_argument("--deadline-s", type=float)
    p.add_argument("--no-trajectories", action="store_true")
    p.add_argument("--num-scale", type=float, default=1.0, help="fewer images (a dry run)")
    p.add_argument("--part", choices=("all", "main", "rest"), default="all",
                   help="main: teacher, LCM, TCD and the chain's rows; rest: ablations and the "
                        "learning-rate search (a second pass, e.g. while those runs train)")
    p.add_argument("--ids", help="only rows whose id matches this regular expression")
    p.add_argument("--shipped", action="store_true",
                   help="the main table of the shipped adapters instead of a protocol root")
    p.add_argument("--extra-row", action="append", default=[], metavar="ID=METHOD:STEPS:FILE",
                   help="with --shipped: another adapter file as a row")
    args = p.parse_args(argv)
    specs = (shipped_row_specs(args.extra_row) if args.shipped
             else select_rows(row_specs(Path(args.root)), Path(args.root), args.part))
    if args.ids:
        import re

        specs = [s for s in specs if re.search(args.ids, s["id"])]
    res = run_eval(args.root, args.out, args.device, args.deadline_s,
                   not args.no_trajectories and args.part != "rest", args.num_scale, specs,
                   args.shipped)
    print(f"{len(res['rows'])} rows in {res['seconds']} s; skipped {len(res['skipped'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
