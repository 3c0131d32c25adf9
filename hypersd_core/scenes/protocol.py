"""The scenes world's part of the comparison protocol (``WORLD``): its run graph, its
evaluation and its report, on the world-agnostic runner, budgets and statistics.

    python -m hypersd_core.protocol train  --world scenes --root runs/protocol-scenes --jobs 2
    python -m hypersd_core.protocol eval   --world scenes --root runs/protocol-scenes --out results/scenes-protocol
    python -m hypersd_core.protocol report --world scenes --eval results/scenes-protocol

Runs: the TSCD chain k8 -> k4 -> k2 -> k1, DMD from k1 (the unified adapter), and the LCM
and TCD baselines trained to the unified adapter's training samples with a checkpoint at
every N-step adapter's count. Rows (GenEval-style accuracies, FD / KID in three spaces,
intervals by generator source, ``scenes/evaluate.py``): the teacher at 1/2/4/8/25 steps;
per N, ``hypersd@N`` (the k=N adapter), ``unified@N``, and each baseline at the compared
row's samples (``lcm@N``: the k=N adapter's count; ``lcm@N/u``: unified's). Who leads:
paired cluster-bootstrap differences, Holm-adjusted over the whole table, which also holds
unified against ``lcm@N`` (a baseline that gets worse with more samples is met at its
earlier checkpoint too). Ablation (``group: ablation``): k2 / k1 without the adversarial
term and DMD2 from that k=1 (rows ``hypersd-advoff@N``, ``unified-advoff@N``), and that
DMD2 trained 3x longer, beyond the budget (rows ``unified-advoff-long@1/2``, no verdicts).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from hypersd_core.protocol import runner
from hypersd_core.protocol.runner import (
    WEIGHTS,
    RunSpec,
    copy_adapter,
    matched_adapter,
    run_samples,
)
from hypersd_core.protocol.world import World

STEPS = (1, 2, 4, 8)
CHAIN = 4 * 600 * 16  # scenes-tscd-k8..k1: 600 steps x 16 each
DMD_SAMPLES = 500 * 16  # scenes-dmd
# the baselines reach the unified adapter's count, a checkpoint at every k=N adapter's
BASELINE_BUDGET = (f"steps={(CHAIN + DMD_SAMPLES) // 16}", "checkpoint_every=600",
                   "keep_checkpoints=6")
LEAD_KEYS = ("class_acc", "colour_acc", "size_acc", "position_acc", "all_correct",
             "fd_detector", "fd_random", "fd_pixels")
ALPHA = 0.05


def protocol_runs() -> list[RunSpec]:
    return [
        RunSpec("k8", "scenes-tscd-k8"),
        RunSpec("k4", "scenes-tscd-k4", parent="k8"),
        RunSpec("k2", "scenes-tscd-k2", parent="k4"),
        RunSpec("k1", "scenes-tscd-k1", parent="k2"),
        RunSpec("dmd", "scenes-dmd", parent="k1"),
        RunSpec("lcm", "scenes-lcm", BASELINE_BUDGET),
        RunSpec("tcd", "scenes-tcd", BASELINE_BUDGET),
        # ablation: the chain's k2 / k1 without PCM's adversarial term, and DMD2 from that
        # k=1 (each with the budget of the run it replaces)
        RunSpec("k2-advoff", "scenes-tscd-k2", ("adv_weight=0.0",), "k4", "ablation",
                "adversarial term off"),
        RunSpec("k1-advoff", "scenes-tscd-k1", ("adv_weight=0.0",), "k2-advoff", "ablation",
                "adversarial term off"),
        RunSpec("dmd-advoff", "scenes-dmd", (), "k1-advoff", "ablation",
                "DMD2 from the k=1 adapter trained without the adversarial term"),
        # beyond the equal budget (rows only, not in the who-leads table): do DMD2's curves
        # flatten, and what does one step gain, with three times the generator updates?
        RunSpec("dmd-advoff-long", "scenes-dmd", ("steps=1500", "checkpoint_every=500"),
                "k1-advoff", "ablation", "dmd-advoff trained 3x longer (beyond the budget)"),
    ]


def row_specs(root: Path, steps=STEPS) -> list[dict]:
    """Every row: {"label", "method", "steps", "adapter" (file or None)}."""
    root = Path(root)
    samples = run_samples(root)
    rows = [{"label": f"teacher@{n}", "method": "teacher", "steps": n, "adapter": None}
            for n in (*steps, 25)]
    for n in steps:
        rows.append({"label": f"hypersd@{n}", "method": "hypersd", "steps": n,
                     "adapter": root / f"k{n}" / WEIGHTS})
        rows.append({"label": f"unified@{n}", "method": "hypersd-unified", "steps": n,
                     "adapter": root / "dmd" / WEIGHTS})
        for b in ("lcm", "tcd"):
            rows.append({"label": f"{b}@{n}", "method": b, "steps": n,
                         "adapter": matched_adapter(root, b, samples.get(f"k{n}"))})
            rows.append({"label": f"{b}@{n}/u", "method": b, "steps": n,
                         "adapter": root / b / WEIGHTS})
    for n in steps:  # the ablation's rows, where its runs exist
        if n in (1, 2) and (root / f"k{n}-advoff").is_dir():
            rows.append({"label": f"hypersd-advoff@{n}", "method": "hypersd", "steps": n,
                         "adapter": root / f"k{n}-advoff" / WEIGHTS})
        if (root / "dmd-advoff").is_dir():
            rows.append({"label": f"unified-advoff@{n}", "method": "hypersd-unified",
                         "steps": n, "adapter": root / "dmd-advoff" / WEIGHTS})
        if n in (1, 2) and (root / "dmd-advoff-long").is_dir():
            rows.append({"label": f"unified-advoff-long@{n}", "method": "hypersd-unified",
                         "steps": n, "adapter": root / "dmd-advoff-long" / WEIGHTS})
    return rows


def lead_pairs(labels, steps=STEPS) -> list[tuple[str, str]]:
    """(Hyper-SD row, baseline row at its training samples) for every step count; then the
    unified rows against the baselines' checkpoint at the k=N adapter's count, fewer
    samples than unified's: the stricter test where a baseline gets worse with training."""
    out = []
    for n in steps:
        for b in ("lcm", "tcd"):
            out += [(f"hypersd@{n}", f"{b}@{n}"), (f"unified@{n}", f"{b}@{n}/u"),
                    (f"hypersd-advoff@{n}", f"{b}@{n}"), (f"unified-advoff@{n}", f"{b}@{n}/u")]
    for n in steps:
        for b in ("lcm", "tcd"):
            out += [(f"unified@{n}", f"{b}@{n}"), (f"unified-advoff@{n}", f"{b}@{n}")]
    return [(a, b) for a, b in out if a in labels and b in labels]


def leads(arrays: dict, ref: dict, n_boot: int) -> list[dict]:
    """Paired differences (Hyper-SD minus baseline) of every lead measure, Holm-adjusted
    over the whole table; accuracies: higher is better, FDs: lower."""
    from hypersd_core.protocol.stats import bootstrap_p, holm
    from hypersd_core.scenes.evaluate import paired_difference

    out = []
    for a, b in lead_pairs(set(arrays)):
        row = {"hypersd": a, "baseline": b}
        for k in LEAD_KEYS:
            point, ci, boots = paired_difference(arrays[a], arrays[b], ref, k, n_boot,
                                                 with_draws=True)
            row[k] = {"diff": point, "ci": ci, "p": bootstrap_p(boots, point)}
        out.append(row)
    tests = [(i, k) for i, r in enumerate(out) for k in LEAD_KEYS]
    for (i, k), p_adj in zip(tests, holm([out[i][k]["p"] for i, k in tests])):
        out[i][k]["p_holm"] = p_adj
    for r in out:
        better = [k for k in LEAD_KEYS if r[k]["p_holm"] < ALPHA
                  and (r[k]["diff"] < 0 if k.startswith("fd_") else r[k]["diff"] > 0)]
        worse = [k for k in LEAD_KEYS if r[k]["p_holm"] < ALPHA and k not in better]
        r["verdict"] = (f"ahead on {len(better)} of {len(LEAD_KEYS)}" if better and not worse
                        else f"behind on {len(worse)} of {len(LEAD_KEYS)}" if worse and not better
                        else "level" if not better else
                        f"ahead on {len(better)}, behind on {len(worse)}")
    return out


def leads_markdown(rows: list[dict]) -> str:
    lines = ["| Hyper-SD row | baseline (same samples) | " + " | ".join(LEAD_KEYS) + " | verdict |",
             "|" + "---|" * (len(LEAD_KEYS) + 3)]
    for r in rows:
        cells = []
        for k in LEAD_KEYS:
            v = r[k]
            star = "*" if v["p_holm"] < ALPHA else ""
            cells.append(f"{v['diff']:+.2f}{star} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]")
        lines.append(f"| {r['hypersd']} | {r['baseline']} | " + " | ".join(cells)
                     + f" | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def eval_main(argv: list[str] | None = None) -> int:
    """Generate and measure every row of a scenes protocol root; write scenes_eval.json,
    scenes_eval.md and leads.md in --out."""
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler
    from hypersd_core.paths import SCENES_EVAL
    from hypersd_core.scenes import evaluate as ev
    from hypersd_core.scenes.evalnets import EvalNets
    from hypersd_core.worlds import scenes as world

    p = argparse.ArgumentParser(prog="python -m hypersd_core.protocol eval --world scenes")
    p.add_argument("--root", default="runs/protocol-scenes")
    p.add_argument("--out", default="results/scenes-protocol")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--reference-images", type=int, default=4000)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--floor-splits", type=int, default=200)
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    args = p.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nets = EvalNets(SCENES_EVAL)
    ref = ev.reference(nets, args.reference_images, out)
    items = world.scenes("eval", args.num_images)
    sampler = Sampler(load_backbone("scenes"))
    copies = Path(tempfile.mkdtemp(prefix="scenes-protocol-"))
    arrays, skipped = {}, []
    for i, row in enumerate(row_specs(Path(args.root), steps)):
        if row["adapter"] is not None:
            if not Path(row["adapter"]).is_file():
                skipped.append(f"{row['label']} (no adapter)")
                continue
            copy = copies / f"row{i}.safetensors"  # checkpoints load like final adapters
            copy_adapter(row["adapter"], copy)
            row = {**row, "adapter": str(copy)}
        arrays[row["label"]] = ev.generate_row(sampler, nets, row, items, out)
        print(f"{row['label']}: all-correct {np.nanmean(arrays[row['label']]['all_correct']):.3f}",
              flush=True)
    summaries = {k: ev.summarize(v, ref, args.bootstrap) for k, v in arrays.items()}
    fl = ev.floor(ref, n_splits=args.floor_splits)
    lead_rows = leads(arrays, ref, args.bootstrap)
    (out / "scenes_eval.json").write_text(json.dumps(
        {"rows": summaries, "floor": fl, "leads": lead_rows, "skipped": skipped,
         "num_images": args.num_images, "bootstrap": args.bootstrap}, indent=1))
    (out / "scenes_eval.md").write_text(ev.markdown(summaries, fl))
    (out / "leads.md").write_text(leads_markdown(lead_rows))
    print(ev.markdown(summaries, fl) + "\n" + leads_markdown(lead_rows))
    if skipped:
        print(f"skipped: {', '.join(skipped)}")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    """Print an evaluation folder's tables (the evaluation computes them)."""
    p = argparse.ArgumentParser(prog="python -m hypersd_core.protocol report --world scenes")
    p.add_argument("--eval", default="results/scenes-protocol")
    args, _ = p.parse_known_args(argv)
    folder = Path(args.eval)
    if not (folder / "scenes_eval.md").is_file():
        raise SystemExit(f"{folder} holds no scenes protocol evaluation (run `protocol eval "
                         "--world scenes` first)")
    print((folder / "scenes_eval.md").read_text() + "\n" + (folder / "leads.md").read_text())
    return 0


SHIPPED = {"k8": "hypersd-k8", "k4": "hypersd-k4", "k2": "hypersd-k2", "k1": "hypersd-k1",
           "dmd": "hypersd-unified", "lcm": "lcm", "tcd": "tcd"}


def ship(root: str | Path, out_root: Path | None = None) -> dict:
    """The main runs' final adapters as the scenes world's shipped adapters."""
    from hypersd_core.paths import SCENES_ADAPTERS

    return runner.ship_runs(root, SHIPPED, out_root or SCENES_ADAPTERS)


def pack(root: str | Path, out: str | Path) -> None:
    runner.pack_root(root, out, tuple(SHIPPED))


WORLD = World(name="scenes", runs=protocol_runs, shipped=tuple(SHIPPED),
              eval_main="hypersd_core.scenes.protocol:eval_main",
              report_main="hypersd_core.scenes.protocol:report_main", ship=ship, pack=pack)


def main(argv: list[str] | None = None) -> int:
    return runner.main(argv, WORLD)
