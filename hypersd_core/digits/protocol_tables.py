"""The Markdown tables of the digits protocol report (``protocol_report``): results with
intervals, who leads (Holm), the independent views, the trajectory, the budget per row,
the ablations and the eta choice. Pure formatting of rows already computed."""

from __future__ import annotations

STEPS = (1, 2, 4, 8)
LEAD_KEYS = ("fd_real", "fd_teacher", "fd_real_random", "fd_teacher_random")
VIEW_KEYS = ("fd_real_pixel", "kid_real_pixel", "fd_real_disjoint", "fd_teacher_disjoint",
             "hue_err", "edge_width_gap", "stray_ink")
ALPHA = 0.05


def _lead_cell(rec: dict, digits: int) -> str:
    d, (lo, hi) = rec["diff"], rec["ci"]
    mark = "*" if rec.get("p_holm", 1.0) < ALPHA else ""
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def leads_table(lead_rows: list[dict]) -> str:
    lines = ["| steps | Hyper-SD row | against | dFD vs real | dFD vs teacher | dFD vs real "
             "(random) | dFD vs teacher (random) | Hyper-SD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in lead_rows:
        cells = [_lead_cell(r[k], 2 if "random" not in k else 3) if k in r else "-"
                 for k in LEAD_KEYS]
        lines.append(f"| {r['steps']} | {r['hypersd']} | {r['baseline']} | " + " | ".join(cells)
                     + f" | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def views_leads_table(lead_rows: list[dict]) -> str:
    lines = ["| steps | Hyper-SD row | against | dFD pixels vs real | dKID pixels vs real (x1000) "
             "| dFD disjoint vs real | dFD disjoint vs teacher | d hue error (deg) | d edge-width "
             "gap to real (px) | d stray ink | Hyper-SD |", "|---|---|---|" + "---|" * 8]
    for r in lead_rows:
        cells = []
        for k in VIEW_KEYS:
            if k not in r:
                cells.append("-")
                continue
            rec = r[k]
            if k.startswith("kid"):
                rec = {**rec, "diff": 1000 * rec["diff"], "ci": [1000 * c for c in rec["ci"]]}
            cells.append(_lead_cell(rec, 1 if k == "hue_err" else 3))
        lines.append(f"| {r['steps']} | {r['hypersd']} | {r['baseline']} | " + " | ".join(cells)
                     + f" | {r.get('verdict_views', '-')} |")
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


def views_table(ci_rows: list[dict], eta: dict, real_edge: float | None) -> str:
    """The independent views per row: pixel FD / KID, the disjoint net's FD, hue error,
    edge width and stray ink (``measures.py``)."""
    by_id = {r["id"]: r for r in ci_rows}
    lines = ["| method | steps | FD pixels vs real | KID pixels vs real (x1000) | FD disjoint vs "
             "real | FD disjoint vs teacher | hue error (deg) | edge width (px"
             + (f"; real {real_edge:.2f}" if real_edge is not None else "") + ") | stray ink |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r, key, digits=2, scale=1.0):
        if key not in r:
            return "-"
        lo, hi = r[key + "_ci"]
        return f"{scale * r[key]:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"

    order = [("teacher", "teacher@{n}"), ("lcm", "lcm@{n}"), ("tcd", "tcd@{n}"),
             ("hypersd", "hypersd@{n}"), ("hypersd-unified", "unified@{n}/eta{e}")]
    for label, pattern in order:
        for n in STEPS + ((25,) if label == "teacher" else ()):
            r = by_id.get(pattern.format(n=n, e=eta.get(n, 1.0)))
            if r is None or "fd_real_pixel" not in r:
                continue
            lines.append(f"| {label} | {n} | {cell(r, 'fd_real_pixel', 3)} | "
                         f"{cell(r, 'kid_real_pixel', 2, 1000)} | {cell(r, 'fd_real_disjoint')} | "
                         f"{cell(r, 'fd_teacher_disjoint')} | {cell(r, 'hue_err', 1)} | "
                         f"{cell(r, 'edge_width')} | {cell(r, 'stray_ink', 3)} |")
    return "\n".join(lines) + "\n"


ROW_RUNS = {"lcm": "lcm", "tcd": "tcd", "hypersd": "k{n}", "unified": "dmd"}


def row_budget_table(runs: dict) -> str:
    """The compared rows' budgets (their runs with parents) against LCM's at each step
    count: samples, forward-equivalents, seconds, rank, and the ratios to LCM."""
    from hypersd_core.protocol.budget import row_budget

    lines = ["| steps | row | run | samples | x LCM | forward-equivalents | x LCM | seconds "
             "| LoRA rank |", "|---|---|---|---|---|---|---|---|---|"]
    for n in STEPS:
        base = row_budget(runs, "lcm") if "steps" in runs.get("lcm", {}) else None
        for label, pattern in ROW_RUNS.items():
            run = pattern.format(n=n)
            if "steps" not in runs.get(run, {}):
                continue
            b = row_budget(runs, run)
            fe = b["forward_equivalents"]
            ratio_s = f"{b['samples'] / base['samples']:.2f}" if base else "-"
            ratio_f = (f"{fe / base['forward_equivalents']:.2f}"
                       if base and fe is not None and base["forward_equivalents"] else "-")
            lines.append(f"| {n} | {label}@{n} | {run} | {b['samples']:,} | {ratio_s} | "
                         + (f"{fe:,.0f}" if fe is not None else "-")
                         + f" | {ratio_f} | {b['seconds']:,.0f} | {b['rank'] or '-'} |")
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
