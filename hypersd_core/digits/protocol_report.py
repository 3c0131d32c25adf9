"""Tables and plots of an evaluated protocol (``protocol_eval``): choices made on the
tune seeds, reported on the eval seeds with bootstrap 95% intervals.

    python -m hypersd_core.digits.protocol_report --eval results/protocol \
        --protocol runs/protocol/protocol.json --out assets/results/protocol

Writes OUT.json, OUT.md (results, who leads with Holm's correction, the independent
views, the budget per run, eta, ablation, learning-rate tables) and OUT.png (results
against steps) plus OUT-curves.png (quality against training samples). Also
``python -m hypersd_core.protocol report --world digits ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hypersd_core.digits.metrics import summarize
from hypersd_core.digits.protocol_tables import (  # noqa: F401 (row_budget_table: re-exported)
    ALPHA,
    LEAD_KEYS,
    STEPS,
    VIEW_KEYS,
    ablation_ids,
    eta_table,
    leads_table,
    results_table,
    row_budget_table,
    simple_table,
    trajectory_table,
    views_leads_table,
    views_table,
)

FD_KEYS = ("fd_real", "fd_teacher", "fd_real_random", "fd_teacher_random")


def load_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """{"eval/lcm@4": {"project": ..., "random": ..., "digit_ok": ..., "colour_ok": ...}}."""
    rows: dict[str, dict] = {}
    for f in sorted(folder.glob("arrays-*.npz")):
        with np.load(f) as z:
            for key in z.files:
                row, field = key.rsplit("|", 1)
                arr = z[key]
                rows.setdefault(row, {})[field] = (
                    arr.astype(np.float32) if arr.dtype.kind == "f"
                    else arr.astype(bool) if arr.dtype == np.uint8 else arr)
    return rows


def _best(rows: list[dict], ids: list[str], key: str = "fd_real") -> str | None:
    cands = [r for r in rows if r["id"] in ids and r["seeds"] == "tune"]
    return min(cands, key=lambda r: r[key])["id"] if cands else None


def choose(rows: list[dict]) -> dict:
    """Choices on the tune seeds (FD vs real in the project space, the rule everywhere)."""
    from hypersd_core.digits.protocol_eval import ETAS

    eta = {}
    for n in STEPS:
        best = _best(rows, [f"unified@{n}/eta{e}" for e in ETAS])
        if best:
            eta[n] = float(best.split("eta")[1])
    lr = {}
    for name, steps in (("lcm", STEPS), ("tcd", STEPS), ("k8", (8,))):
        scores = {}
        for point in ("1.0e-4", "3e-4", "1.0e-3"):
            vals = [r["fd_real"] for r in rows if r["seeds"] == "tune"
                    and r["id"] in [f"{name}-lr{point}@{n}" for n in steps]]
            if len(vals) == len(steps):
                scores[point] = float(np.mean(vals))
        lr[name] = scores
    return {"eta": eta, "lr_search": lr}


def references(arrays: dict, n_boot: int = 1000):
    """The real and teacher reference sets with their bootstrap replicates (built once)."""
    from hypersd_core.digits.metrics import MEASURES
    from hypersd_core.protocol.summary import References

    sets = {k: arrays[key] for k, key in (("real", "real"), ("teacher", "ref/teacher@25"))
            if key in arrays}
    return References(sets, MEASURES, n_boot) if "real" in sets else None


def interval_rows(arrays: dict, rows: list[dict], n_boot: int = 1000, refs=None) -> list[dict]:
    refs = refs or references(arrays, n_boot)
    out = []
    for row in rows:
        key = f"{row['seeds']}/{row['id']}"
        if row["seeds"] != "eval" or key not in arrays or refs is None:
            continue
        out.append({**{k: row[k] for k in ("id", "method", "steps", "eta")},
                    **summarize(arrays[key], None, refs=refs)})
    return out


def hypersd_choice(rows: list[dict], eta: dict) -> dict[int, str]:
    """Per step count, the Hyper-SD row the leads table names: N-step or unified (at its
    chosen eta), whichever has the lower FD vs real on the tune seeds (the N-step one
    where there are no tune rows)."""
    out = {}
    for n in STEPS:
        cands = [f"hypersd@{n}", f"unified@{n}/eta{eta.get(n, 1.0)}"]
        out[n] = _best(rows, cands) or cands[0]
    return out


# the views that share no net with the rewards (measures.py): pixels, the disjoint net,
# and what 1-step images get wrong


def baseline_row(baseline: str, n: int, hypersd_id: str, arrays: dict) -> str:
    """The baseline's row with the training samples of ``hypersd_id`` (equal budgets):
    ``lcm@N`` for an N-step adapter, ``lcm@N/u`` (the baseline's final adapter, trained
    to unified's count) for the unified one; evaluations without /u rows name ``lcm@N``."""
    if hypersd_id.startswith("unified") and f"eval/{baseline}@{n}/u" in arrays:
        return f"{baseline}@{n}/u"
    return f"{baseline}@{n}"


def leads(arrays: dict, rows: list[dict], eta: dict, n_boot: int = 1000, refs=None) -> list[dict]:
    """Hyper-SD against LCM and TCD at each step count, and unified@1 against LCM@4 /
    TCD@4, each baseline at the compared row's training samples (``baseline_row``):
    paired differences of every FD and independent view with 95% intervals and
    Holm-adjusted p-values over the whole table (every pair and every measure: one
    family), so a verdict "ahead" or "behind" is one that survives the multiplicity."""
    from hypersd_core.protocol.stats import holm
    from hypersd_core.protocol.summary import paired_differences

    if "real" not in arrays or "ref/teacher@25" not in arrays:
        return []
    refs = refs or references(arrays, n_boot)
    pick = hypersd_choice(rows, eta)
    pairs = [(n, pick[n], baseline_row(b, n, pick[n], arrays)) for n in STEPS for b in ("lcm", "tcd")]
    pairs += [(1, f"unified@1/eta{eta.get(1, 1.0)}", baseline_row(b, 4, "unified", arrays))
              for b in ("lcm", "tcd")]
    out = []
    for n, a_id, b_id in pairs:
        a, b = arrays.get(f"eval/{a_id}"), arrays.get(f"eval/{b_id}")
        if a is None or b is None:
            continue
        diffs = paired_differences(a, b, refs)
        out.append({"steps": n, "hypersd": a_id, "baseline": b_id,
                    **{k: diffs[k] for k in LEAD_KEYS + VIEW_KEYS if k in diffs}})
    tests = [(i, k) for i, r in enumerate(out) for k in LEAD_KEYS + VIEW_KEYS if k in r]
    for (i, k), p_adj in zip(tests, holm([out[i][k]["p"] for i, k in tests])):
        out[i][k]["p_holm"] = p_adj
    for r in out:
        for group, keys in (("verdict", LEAD_KEYS), ("verdict_views", VIEW_KEYS)):
            present = [k for k in keys if k in r]
            sig = [k for k in present if r[k]["p_holm"] < ALPHA]
            ahead = sum(r[k]["diff"] < 0 for k in sig)
            behind = len(sig) - ahead
            m = len(present)
            r[group] = (f"ahead on {ahead} of {m}" if ahead and not behind else
                        f"behind on {behind} of {m}" if behind and not ahead else
                        f"level on all {m}" if not sig else f"ahead on {ahead}, behind on {behind}")
    return out


def floors(arrays: dict) -> dict[str, float]:
    """Real vs real FD in every space: two halves of the reference that share no shape."""
    from hypersd_core.digits.metrics import MEASURES
    from hypersd_core.protocol.stats import cluster_split, fd

    real = arrays.get("real", {})
    out = {}
    for space in MEASURES.spaces:
        clusters = real.get(MEASURES.clusters.get(space, "cluster"))
        if space in real and clusters is not None:
            a, b = cluster_split(clusters, np.random.default_rng(0))
            out[space] = fd(real[space][a], real[space][b])
    return out


CURVE_COLOURS = {"lcm": "tab:orange", "tcd": "tab:green", "hypersd (chain)": "tab:red",
                 "k1-direct": "tab:brown", "dmd": "tab:purple",
                 "dmd-nofb": "tab:pink"}  # one colour per method in every panel and plot
OWN_CURVES = ("k1-direct", "dmd", "dmd-nofb")  # runs drawn as their own line (not the chain)


def curves(rows: list[dict], protocol: dict, out_png: Path) -> dict:
    """FD vs real (project) against training samples: LCM / TCD checkpoints at 1/2/4/8
    steps; Hyper-SD: each stage's checkpoints at its own step count, samples counted
    from the start of the chain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = protocol.get("runs", {})

    def samples(run: str, step: int) -> int:
        r = runs[run]
        before = runs[r["parent"]]["samples"] if r.get("parent") else 0
        return before + step * r["batch_size"]

    pts: dict[str, list] = {}
    for r in rows:
        if r["seeds"] != "curve" or "/step-" not in r["id"]:
            continue
        run, rest = r["id"].split("/step-")
        step, n = int(rest.split("@")[0]), int(rest.split("@")[1])
        if run not in runs:
            continue
        label = f"{run}@{n}" if run in ("lcm", "tcd", *OWN_CURVES) else f"hypersd (chain)@{n}"
        pts.setdefault(label, []).append((samples(run, step), r["fd_real"], r["fd_real_random"]))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, n in zip(axes, STEPS):
        for label, p in sorted(pts.items()):
            if label.endswith(f"@{n}"):
                p = sorted(p)
                ax.plot([q[0] for q in p], [q[1] for q in p], marker="o", label=label,
                        color=CURVE_COLOURS.get(label.split("@")[0]))
        ax.set_title(f"{n} step{'s' if n > 1 else ''}: FD vs real")
        ax.set_xlabel("training samples")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return {k: sorted(v) for k, v in pts.items()}


def plot_results(ci_rows: list[dict], eta: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {r["id"]: r for r in ci_rows}
    keys = ("fd_real", "fd_teacher", "fd_real_random", "digit_acc")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        for label, pattern in (("teacher", "teacher@{n}"), ("lcm", "lcm@{n}"), ("tcd", "tcd@{n}"),
                               ("hypersd", "hypersd@{n}"), ("unified", "unified@{n}/eta{e}")):
            pts = [(n, by_id[pattern.format(n=n, e=eta.get(n, 1.0))]) for n in STEPS
                   if pattern.format(n=n, e=eta.get(n, 1.0)) in by_id]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1][key] for p in pts]
            err = np.array([[p[1][key] - p[1][key + "_ci"][0], p[1][key + "_ci"][1] - p[1][key]]
                            for p in pts]).T.clip(min=0)
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label,
                        color={"teacher": "tab:blue", "unified": "tab:purple"}.get(
                            label, CURVE_COLOURS.get(label if label != "hypersd"
                                                     else "hypersd (chain)")))
        ax.set_xscale("log", base=2)
        if key.startswith("fd"):  # 1 step is an order of magnitude above 2-8 steps
            ax.set_yscale("log")
        ax.set_xticks(list(STEPS), [str(s) for s in STEPS])
        ax.set_title(key)
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def report(eval_dir: str | Path | list, protocol_json: str | Path, out: str | Path,
           n_boot: int = 1000) -> dict:
    import time

    t0 = time.perf_counter()
    dirs = [Path(d) for d in (eval_dir if isinstance(eval_dir, (list, tuple)) else [eval_dir])]
    out = Path(out)
    results = [json.loads((d / "rows.json").read_text()) for d in dirs]
    res = results[0]
    # e.g. protocol_eval --part main, then rest; a row measured twice counts once (the later)
    rows = list({(r["id"], r["seeds"]): r for one in results for r in one["rows"]}.values())
    protocol = json.loads(Path(protocol_json).read_text()) if Path(protocol_json).is_file() else {}
    arrays: dict = {}
    for d in dirs:
        arrays.update(load_arrays(d))
    chosen = choose(rows)
    refs = references(arrays, n_boot)
    ci = interval_rows(arrays, rows, n_boot, refs)
    lead_rows = leads(arrays, rows, chosen["eta"], n_boot, refs)
    out.parent.mkdir(parents=True, exist_ok=True)
    curve_pts = curves(rows, protocol, out.with_name(out.name + "-curves.png"))
    plot_results(ci, chosen["eta"], out.with_suffix(".png"))
    n = ci[0]["n"] if ci else 0
    floor = floors(arrays)
    real_edge = (float(np.nanmean(arrays["real"]["edge_width"]))
                 if "edge_width" in arrays.get("real", {}) else None)
    floor_line = ", ".join(f"{k} {v:.3f}" for k, v in floor.items())
    from hypersd_core.protocol.budget import budget_table

    md = [f"#### Results (eval seeds, {n} images per row, bootstrap 95% intervals, {n_boot} "
          "replicates; real digits resampled by shape)\n",
          results_table(ci, chosen["eta"]),
          f"\nFD floor (real vs real, two held-out halves that share no shape): "
          f"{res['fd_floor']:.2f}" + (f"; per space: {floor_line}" if floor else "") + "\n",
          "\n#### Who leads (Hyper-SD minus baseline, paired bootstrap 95% intervals; negative: "
          "Hyper-SD closer; * and ahead / behind: Holm-adjusted p < 0.05 over every pair and "
          "measure of both who-leads tables)\n",
          leads_table(lead_rows),
          "\n#### Independent views (no net shared with the rewards: pixels, a net trained on "
          "held-out shapes only, per-image hue error, edge width and stray ink)\n",
          views_table(ci, chosen["eta"], real_edge),
          "\n#### Who leads in the independent views (as above; hue error, stray ink and the "
          "edge width's gap to real digits: lower is better)\n",
          views_leads_table(lead_rows),
          "\n#### Budget per run (with its parents': training samples, UNet forward-"
          "equivalents, seconds, LoRA rank)\n",
          (row_budget_table(protocol["runs"]) + "\n" + budget_table(protocol["runs"]))
          if protocol.get("runs") else "(no protocol.json)\n",
          "\n#### eta of the unified adapter (tune seeds, FD vs real)\n", eta_table(rows),
          "\n#### Ablations (eval seeds)\n", simple_table(ci, ablation_ids(chosen["eta"])),
          "\n#### Learning-rate search (600 steps each, tune seeds, mean FD vs real over its step counts)\n",
          "| method | " + " | ".join(("1.0e-4", "3e-4", "1.0e-3")) + " |\n|---|---|---|---|\n"
          + "".join(f"| {m} | " + " | ".join(f"{s[p]:.2f}" if p in s else "-"
                                             for p in ("1.0e-4", "3e-4", "1.0e-3")) + " |\n"
                    for m, s in chosen["lr_search"].items())]
    if not chosen["eta"]:  # no tune rows (e.g. the shipped adapters): results, leads, views
        md = md[:11]
    traj_files = [d / "trajectory.json" for d in dirs if (d / "trajectory.json").is_file()]
    traj = json.loads(traj_files[0].read_text()) if traj_files else []
    if traj:
        md += ["\n#### Trajectory diagnostic (RMS distance of the sampler's state to the teacher's "
               "N=40 ODE state at the same timestep, relative to that state's RMS; 64 images)\n",
               trajectory_table(traj)]
    seconds = round(time.perf_counter() - t0, 1)
    md.append(f"\n(report: {n_boot} bootstrap replicates, {seconds} s)\n")
    out.with_suffix(".md").write_text("".join(md))
    record = {"chosen": chosen, "eval_rows": ci, "leads": lead_rows, "trajectory": traj,
              "curves": curve_pts, "fd_floor": res["fd_floor"], "floors": floor,
              "n_boot": n_boot, "seconds": seconds, "protocol": protocol}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", required=True, nargs="+",
                   help="protocol_eval's --out folder(s) (e.g. its --part main and rest passes)")
    p.add_argument("--protocol", required=True, help="the protocol root's protocol.json")
    p.add_argument("--out", default="results/protocol")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap replicates (at least 1000 for reported figures)")
    args = p.parse_args(argv)
    if args.n_boot < 1:
        raise SystemExit("--n-boot must be >= 1")
    report(args.eval, args.protocol, args.out, args.n_boot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
