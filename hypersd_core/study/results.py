"""The study's results: strengths within each step count (primary), head-to-head win
rates, the primary comparisons with their correction, the position term, the both-bad
sensitivity view, anchored strengths across step counts, warnings, and a plot.
Pure functions of a votes frame (see :mod:`hypersd_core.study.stats` for the methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from hypersd_core.study.config import Primary
from hypersd_core.study.stats import (
    Options,
    bootstrap_weights,
    check_frame,
    fit_items,
    group_counts,
    holm,
    position_table,
    strengths_table,
    win_rate_interval,
    win_rates_table,
    within_step,
)

METHOD_NOTE = (
    "Strengths: Davidson Bradley-Terry log-strengths with a left/right position term, fitted "
    "**within each step count** (compare methods within a row of the plot, never across step "
    "counts). Intervals: {level:.0%} from a bootstrap over whole {cluster}s ({n_boot} resamples; "
    "estimate ± t(G-1)·SD for strengths, Wilson on the effective sample size for win rates). "
    "Ties count as ties (half a win in win rates). Both-bad rule: **{rule}** "
    "(sensitivity view: the other rule). Primary comparisons: {primary}.")


@dataclass
class StudyResults:
    strengths: pd.DataFrame
    win_rates: pd.DataFrame
    primary: pd.DataFrame
    position: pd.DataFrame
    sensitivity: pd.DataFrame
    anchored: pd.DataFrame | None
    warnings: list[str] = field(default_factory=list)
    note: str = ""
    n_votes: int = 0
    n_voters: int = 0


def analyse(frame: pd.DataFrame, methods: list[str], opts: Options = Options(),
            primary: Primary | None = None, login_only: bool = False) -> StudyResults:
    """Every table of the results view from the votes frame.

    Args:
        methods: the study's methods (a method without votes still gets a row, with no number).
        primary: the primary comparisons (study.yaml); None: none named.
        login_only: only votes of logged-in voters (voter_kind 'login').
    """
    f = check_frame(frame)
    if login_only:
        f = f[f["voter_kind"] == "login"] if "voter_kind" in f else f.iloc[:0]
    within = within_step(f)
    fits, counts, weights, fits_other, warnings = {}, {}, {}, {}, []
    other = "exclude" if opts.both_bad == "tie" else "tie"
    for steps in sorted(set(within.steps_a)):
        sub = within[within.steps_a == steps]
        c, g = group_counts(sub, methods, sub.method_a, sub.method_b, opts)
        label = f"{steps} steps"
        counts[steps] = c
        fits[steps] = fit_items(c, methods, opts, label)
        fits_other[steps] = fit_items(c, methods, opts, label, rule=other)
        weights[steps] = bootstrap_weights(g, opts.n_boot, np.random.default_rng(opts.seed + 1))
        warnings += fits[steps].warnings
    strengths = strengths_table(fits, opts.level)
    alt = strengths_table(fits_other, opts.level)
    sens = strengths[["steps", "method", "n_votes", "strength"]].rename(
        columns={"strength": f"strength_both_bad_{opts.both_bad}"})
    sens[f"strength_both_bad_{other}"] = alt["strength"].to_numpy() if len(alt) else []
    both_bad = {s: counts[s][..., 3].sum(axis=(0, 2)) + counts[s][..., 3].sum(axis=(0, 1))
                for s in counts}
    sens["both_bad_votes"] = [int(both_bad[s][methods.index(m)])
                              for s, m in zip(sens.steps, sens.method)]
    anchored = anchored_strengths(f, opts) if (f.steps_a != f.steps_b).any() else None
    if anchored is not None:
        warnings += anchored.attrs.get("warnings", [])
    n_voters = int(f["voter_hash"].nunique()) if len(f) else 0
    note = METHOD_NOTE.format(level=opts.level, cluster=opts.cluster, n_boot=opts.n_boot,
                              rule="counted as a tie" if opts.both_bad == "tie" else "excluded",
                              primary=_primary_text(primary))
    return StudyResults(strengths, win_rates_table(counts, weights, methods, opts),
                        primary_table(counts, weights, methods, opts, primary),
                        position_table(fits, counts, opts.level), sens, anchored,
                        warnings, note, len(f), n_voters)


def _primary_text(primary: Primary | None) -> str:
    if primary is None:
        return "none named in study.yaml"
    how = {"holm": "Holm's step-down correction over the family, intervals at the Bonferroni "
                   "level 1 - alpha/m",
           "bonferroni": "Bonferroni correction, intervals at the level 1 - alpha/m",
           "none": "no correction"}[primary.correction]
    return (f"{primary.method} against {', '.join(primary.against)} at every step count, "
            f"two-sided tests of win rate = 0.5, {how}")


def primary_table(counts: dict, weights: dict, methods: list[str], opts: Options,
                  primary: Primary | None) -> pd.DataFrame:
    """The named comparisons with raw and adjusted p-values and corrected intervals."""
    cols = ["steps", "method", "opponent", "n", "win_rate", "ci_low", "ci_high", "ci_level",
            "p_value", "p_adjusted", "significant"]
    if primary is None or primary.method not in methods:
        return pd.DataFrame(columns=cols)
    family = [(s, o) for s in counts for o in primary.against if o in methods]
    m = len(family)
    alpha = 1 - opts.level
    level = 1 - alpha / m if primary.correction != "none" and m else opts.level
    rows = []
    i = methods.index(primary.method)
    for steps, o in family:
        r = win_rate_interval(counts[steps], weights[steps], i, methods.index(o),
                              opts.both_bad, level)
        if r["n"] == 0:
            rows.append((steps, primary.method, o, 0, np.nan, np.nan, np.nan, level, np.nan))
            continue
        t = (r["win_rate"] - 0.5) / max(float(r["se"]), 1e-12)
        df = r["clusters"] - 1
        p = 2 * (sps.t.sf(abs(t), df) if df >= 2 else sps.norm.sf(abs(t)))
        rows.append((steps, primary.method, o, r["n"], r["win_rate"], r["ci_low"],
                     r["ci_high"], level, float(p)))
    out = pd.DataFrame(rows, columns=cols[:-2])
    ok = out.p_value.notna().to_numpy()
    adj = np.full(len(out), np.nan)
    if ok.any():
        p = out.p_value.to_numpy()[ok]
        adj[ok] = {"holm": holm(p), "bonferroni": np.minimum(1.0, p * m),
                   "none": p}[primary.correction]
    out["p_adjusted"] = adj
    out["significant"] = out.p_adjusted < alpha
    return out


def anchored_strengths(frame: pd.DataFrame, opts: Options) -> pd.DataFrame:
    """Strengths of ``method@steps`` items on one scale, from all votes incl. anchor pairs."""
    item_a = frame.method_a + "@" + frame.steps_a.astype(str)
    item_b = frame.method_b + "@" + frame.steps_b.astype(str)
    items = sorted(set(item_a) | set(item_b), key=lambda s: (int(s.rsplit("@", 1)[1]), s))
    c, _ = group_counts(frame, items, item_a, item_b, opts)
    fit = fit_items(c, items, opts, "across step counts")
    lo, hi = fit.interval(opts.level)
    out = pd.DataFrame({"item": items, "method": [s.rsplit("@", 1)[0] for s in items],
                        "steps": [int(s.rsplit("@", 1)[1]) for s in items],
                        "n_votes": fit.n_votes.astype(int), "strength": fit.strength,
                        "ci_low": lo, "ci_high": hi})
    out.attrs["warnings"] = fit.warnings
    return out


def strength_figure(strengths: pd.DataFrame, level: float = 0.95):
    """Matplotlib figure: one panel per step count, strength ± interval per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = sorted(set(strengths.steps)) if len(strengths) else []
    fig, axes = plt.subplots(1, max(len(steps), 1), figsize=(3.2 * max(len(steps), 1), 3.2),
                             squeeze=False)
    for ax, s in zip(axes[0], steps):
        sub = strengths[(strengths.steps == s)].reset_index(drop=True)
        y = np.arange(len(sub))[::-1]
        voted = sub.n_votes > 0
        est = pd.to_numeric(sub.strength, errors="coerce").to_numpy(float)
        lo = pd.to_numeric(sub.ci_low, errors="coerce").to_numpy(float)
        hi = pd.to_numeric(sub.ci_high, errors="coerce").to_numpy(float)
        v = voted.to_numpy()
        ax.errorbar(est[v], y[v], xerr=[est[v] - lo[v], hi[v] - est[v]], fmt="o",
                    color="#3b5bdb", ecolor="#3b5bdb", capsize=3, lw=1.5)
        for yy, ok in zip(y, v):
            if not ok:
                ax.text(0, yy, "no votes", ha="center", va="center", color="#888", fontsize=8)
        ax.axvline(0, color="#aaa", lw=0.8, ls="--")
        ax.set_yticks(y, sub.method)
        ax.set_title(f"within {s} step{'' if s == 1 else 's'}", fontsize=10)
        ax.set_xlabel("log-strength")
    if not steps:
        axes[0][0].text(0.5, 0.5, "no votes yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.suptitle(f"Bradley-Terry strengths with {level:.0%} intervals (within each step count)",
                 fontsize=10)
    fig.tight_layout()
    return fig
