"""Tables and plots of an evaluated protocol (``protocol_eval``): choices made on the
tune seeds, reported on the eval seeds with bootstrap 95% intervals.

    python -m hypersd_core.digits.protocol_report --eval results/protocol \
        --protocol runs/protocol/protocol.json --out assets/results/protocol

Writes OUT.json, OUT.md (results, eta, ablation, learning-rate tables) and OUT.png
(results against steps) plus OUT-curves.png (quality against training samples).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hypersd_core.digits.metrics import summarize

STEPS = (1, 2, 4, 8)
FD_KEYS = ("fd_real", "fd_teacher", "fd_real_random", "fd_teacher_random")


def load_arrays(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """{"eval/lcm@4": {"project": ..., "random": ..., "digit_ok": ..., "colour_ok": ...}}."""
    rows: dict[str, dict] = {}
    for f in sorted(folder.glob("arrays-*.npz")):
        with np.load(f) as z:
            for key in z.files:
                row, field = key.rsplit("|", 1)
                arr = z[key]
                rows.setdefault(row, {})[field] = (arr.astype(np.float32) if arr.dtype == np.float16
                                                   else arr.astype(bool))
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


def interval_rows(arrays: dict, rows: list[dict], n_boot: int = 200) -> list[dict]:
    real = arrays.get("real")
    teacher = arrays.get("ref/teacher@25")
    out = []
    for row in rows:
        key = f"{row['seeds']}/{row['id']}"
        if row["seeds"] != "eval" or key not in arrays or real is None:
            continue
        out.append({**{k: row[k] for k in ("id", "method", "steps", "eta")},
                    **summarize(arrays[key], real, teacher, n_boot=n_boot)})
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


LEAD_KEYS = ("fd_real", "fd_teacher", "fd_real_random", "fd_teacher_random")


def leads(arrays: dict, rows: list[dict], eta: dict, n_boot: int = 100) -> list[dict]:
    """Hyper-SD against LCM and TCD at each step count, and unified@1 against LCM@4 /
    TCD@4: paired differences of every FD with 95% intervals (metrics.paired_difference)."""
    from hypersd_core.digits.metrics import paired_difference

    refs = {"real": arrays.get("real"), "teacher": arrays.get("ref/teacher@25")}
    if refs["real"] is None or refs["teacher"] is None:
        return []
    pick = hypersd_choice(rows, eta)
    pairs = [(n, pick[n], f"{b}@{n}") for n in STEPS for b in ("lcm", "tcd")]
    pairs += [(1, f"unified@1/eta{eta.get(1, 1.0)}", f"{b}@4") for b in ("lcm", "tcd")]
    out = []
    for n, a_id, b_id in pairs:
        a, b = arrays.get(f"eval/{a_id}"), arrays.get(f"eval/{b_id}")
        if a is None or b is None:
            continue
        rec = {"steps": n, "hypersd": a_id, "baseline": b_id}
        for key in LEAD_KEYS:
            rec[key] = paired_difference(a, b, refs, key, n_boot=n_boot)
        ahead = sum(rec[k]["ci"][1] < 0 for k in LEAD_KEYS)
        behind = sum(rec[k]["ci"][0] > 0 for k in LEAD_KEYS)
        rec["verdict"] = (f"ahead on {ahead} of 4" if ahead and not behind else
                          f"behind on {behind} of 4" if behind and not ahead else
                          "level on all 4" if not (ahead or behind) else
                          f"ahead on {ahead}, behind on {behind}")
        out.append(rec)
    return out


def leads_table(lead_rows: list[dict]) -> str:
    lines = ["| steps | Hyper-SD row | against | dFD vs real | dFD vs teacher | dFD vs real "
             "(random) | dFD vs teacher (random) | Hyper-SD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in lead_rows:
        cells = []
        for key in LEAD_KEYS:
            d, (lo, hi) = r[key]["diff"], r[key]["ci"]
            digits = 2 if "random" not in key else 3
            cells.append(f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]")
        lines.append(f"| {r['steps']} | {r['hypersd']} | {r['baseline']} | " + " | ".join(cells)
                     + f" | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def trajectory_table(traj: list[dict]) -> str:
    """Relative RMS distance to the teacher's ODE state after each step (trajectory.json)."""
    lines = ["| method | steps | after each step (timestep: relative distance) |", "|---|---|---|"]
    for r in traj:
        cells = ", ".join(f"{'clean' if t < 0 else t}: {v:.2f}"
                          for t, v in zip(r["timesteps"], r["relative"]))
        lines.append(f"| {r['method']} | {r['steps']} | {cells} |")
    return "\n".join(lines) + "\n"


def _cell(r: dict, key: str, digits: int = 2) -> str:
    lo, hi = r[key + "_ci"]
    return f"{r[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def results_table(ci_rows: list[dict], eta: dict) -> str:
    by_id = {r["id"]: r for r in ci_rows}
    lines = ["| method | steps | FD vs real | FD vs teacher | FD vs real (random feats) | "
             "FD vs teacher (random feats) | digit acc % | colour acc % |",
             "|---|---|---|---|---|---|---|---|"]
    order = [("teacher", "teacher@{n}"), ("lcm", "lcm@{n}"), ("tcd", "tcd@{n}"),
             ("hypersd", "hypersd@{n}"), ("hypersd-unified", "unified@{n}/eta{e}")]
    for label, pattern in order:
        for n in STEPS + ((25,) if label == "teacher" else ()):
            rid = pattern.format(n=n, e=eta.get(n, 1.0))
            r = by_id.get(rid)
            if r is None:
                continue
            name = label + (f" (eta {eta.get(n, 1.0)})" if label == "hypersd-unified" else "")
            lines.append(f"| {name} | {n} | {_cell(r, 'fd_real')} | {_cell(r, 'fd_teacher')} | "
                         f"{_cell(r, 'fd_real_random')} | {_cell(r, 'fd_teacher_random')} | "
                         f"{_cell(r, 'digit_acc', 1)} | {_cell(r, 'colour_acc', 1)} |")
    return "\n".join(lines) + "\n"


def simple_table(ci_rows: list[dict], ids: list[tuple[str, str]]) -> str:
    by_id = {r["id"]: r for r in ci_rows}
    lines = ["| variant | row | FD vs real | FD vs teacher | FD vs real (random) | digit acc % |",
             "|---|---|---|---|---|---|"]
    for label, rid in ids:
        r = by_id.get(rid)
        if r is not None:
            lines.append(f"| {label} | {rid} | {_cell(r, 'fd_real')} | {_cell(r, 'fd_teacher')} | "
                         f"{_cell(r, 'fd_real_random')} | {_cell(r, 'digit_acc', 1)} |")
    return "\n".join(lines) + "\n"


ABLATIONS = [
    ("loss in edge space", "k8-edge@8"), ("loss x0-scaled (shipped)", "k8@8"),
    ("x0-scaled pseudo-Huber", "k8-huber@8"),
    ("t_end uniform in [t_b, t_{n-1}] (Algorithm 1)", "k8-tuniform@8"),
    ("noise perturbation (offset noise 0.1)", "k8-perturb@8"),
    ("k=2 adversarial off", "k2-advoff@2"),
    ("k=2 PCM adversarial, real = re-noised target (preset)", "k2@2"),
    ("k=2 PCM adversarial, real = data", "k2-advdata@2"),
    ("k=1 adversarial off", "k1-advoff@1"),
    ("k=1 PCM adversarial, real = re-noised target (preset)", "k1@1"),
    ("k=1 PCM adversarial, real = data", "k1-advdata@1"),
    ("k=1 direct (same samples as 8->4->2->1)", "k1-direct@1"),
]


def ablation_ids(eta: dict) -> list[tuple[str, str]]:
    ids = list(ABLATIONS)
    for n in STEPS:
        e = eta.get(n, 1.0)
        e2 = e if e in (0.0, 0.3, 1.0) else 1.0  # the ablation rows' etas
        ids += [(f"unified {n} steps: k1 + feedback, no DMD", f"feedback-unified@{n}/eta{e2}"),
                (f"unified {n} steps: k1-direct + DMD2, reward-free", f"dmd-nofb-unified@{n}/eta{e2}"),
                (f"unified {n} steps: k1-direct + DMD2 with rewards (shipped)", f"unified@{n}/eta{e}")]
    return ids


def eta_table(rows: list[dict]) -> str:
    from hypersd_core.digits.protocol_eval import ETAS

    by = {(r["id"], r["seeds"]): r for r in rows}
    lines = ["| steps | " + " | ".join(f"eta {e}" for e in ETAS) + " | chosen |",
             "|---|" + "---|" * (len(ETAS) + 1)]
    for n in STEPS:
        vals = [by.get((f"unified@{n}/eta{e}", "tune")) for e in ETAS]
        if not any(vals):
            continue
        best = min((v for v in vals if v), key=lambda v: v["fd_real"])
        lines.append(f"| {n} | " + " | ".join(f"{v['fd_real']:.2f}" if v else "-" for v in vals)
                     + f" | {best['id'].split('eta')[1]} |")
    return "\n".join(lines) + "\n"


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
           n_boot: int = 200) -> dict:
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
    ci = interval_rows(arrays, rows, n_boot)
    lead_rows = leads(arrays, rows, chosen["eta"], max(50, n_boot // 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    curve_pts = curves(rows, protocol, out.with_name(out.name + "-curves.png"))
    plot_results(ci, chosen["eta"], out.with_suffix(".png"))
    n = ci[0]["n"] if ci else 0
    md = [f"#### Results (eval seeds, {n} images per row, bootstrap 95% intervals)\n",
          results_table(ci, chosen["eta"]),
          f"\nFD floor (real vs real, two held-out halves, project space): {res['fd_floor']:.2f}\n",
          "\n#### Who leads (Hyper-SD minus baseline, paired bootstrap 95% intervals; negative: "
          "Hyper-SD closer; ahead / behind where an interval excludes 0)\n",
          leads_table(lead_rows),
          "\n#### eta of the unified adapter (tune seeds, FD vs real)\n", eta_table(rows),
          "\n#### Ablations (eval seeds)\n", simple_table(ci, ablation_ids(chosen["eta"])),
          "\n#### Learning-rate search (600 steps each, tune seeds, mean FD vs real over its step counts)\n",
          "| method | " + " | ".join(("1.0e-4", "3e-4", "1.0e-3")) + " |\n|---|---|---|---|\n"
          + "".join(f"| {m} | " + " | ".join(f"{s[p]:.2f}" if p in s else "-"
                                             for p in ("1.0e-4", "3e-4", "1.0e-3")) + " |\n"
                    for m, s in chosen["lr_search"].items())]
    if not chosen["eta"]:  # no tune rows (e.g. the shipped adapters): results and leads only
        md = md[:5]
    traj_files = [d / "trajectory.json" for d in dirs if (d / "trajectory.json").is_file()]
    traj = json.loads(traj_files[0].read_text()) if traj_files else []
    if traj:
        md += ["\n#### Trajectory diagnostic (RMS distance of the sampler's state to the teacher's "
               "N=40 ODE state at the same timestep, relative to that state's RMS; 64 images)\n",
               trajectory_table(traj)]
    out.with_suffix(".md").write_text("".join(md))
    record = {"chosen": chosen, "eval_rows": ci, "leads": lead_rows, "trajectory": traj, "curves": curve_pts, "fd_floor": res["fd_floor"],
              "protocol": protocol}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", required=True, nargs="+",
                   help="protocol_eval's --out folder(s) (e.g. its --part main and rest passes)")
    p.add_argument("--protocol", required=True, help="the protocol root's protocol.json")
    p.add_argument("--out", default="results/protocol")
    p.add_argument("--n-boot", type=int, default=200)
    args = p.parse_args(argv)
    report(args.eval, args.protocol, args.out, args.n_boot)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
