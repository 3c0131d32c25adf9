"""Simulated studies: votes from a Davidson model with voter tastes, the population values
they estimate, and the coverage of the study's intervals.

    python -m hypersd_core.study.simulate --replicates 200 --voters 20 --votes 100 --taste-sd 1.0

Each voter has their own log-strengths (the population's plus a N(0, taste_sd^2) offset per
method), so one voter's votes are correlated. The population value of a win rate is its
expectation over voters (ties half); the population strengths are the Davidson fit to the
expected counts of the whole population (Monte Carlo over tastes).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from hypersd_core.study.bt import LEFT, RIGHT, TIE, fit_davidson, probabilities
from hypersd_core.study.stats import (
    Options,
    bootstrap_weights,
    fit_items,
    group_counts,
    quantile,
    win_rate_interval,
)

CHOICE_OF = {LEFT: "A", RIGHT: "B", TIE: "tie"}


def simulate_votes(strengths: dict[str, float], n_voters: int, votes_per_voter: int,
                   taste_sd: float, log_tie: float, position: float,
                   rng: np.random.Generator, steps: int = 4, n_prompts: int = 8,
                   both_bad: float = 0.0) -> pd.DataFrame:
    """Votes of ``n_voters`` voters, pairs and sides balanced per voter (cycled, shuffled).

    ``both_bad``: probability that a vote is 'both_bad' instead of the model's outcome.
    """
    names = list(strengths)
    k = len(names)
    base = np.array([strengths[m] for m in names])
    cells = [(a, b) for a in range(k) for b in range(k) if a != b]  # ordered: sides balanced
    rows = []
    for v in range(n_voters):
        s = base + rng.normal(0.0, taste_sd, size=k)
        prob = probabilities(np.concatenate([s, [position, log_tie]]), k)  # (k*k, 3)
        order = np.concatenate([rng.permutation(len(cells))
                                for _ in range(-(-votes_per_voter // len(cells)))])
        order = order[:votes_per_voter]
        a, b = np.array(cells)[order].T
        cum = prob[a * k + b].cumsum(axis=1)
        o = (rng.random(len(order))[:, None] > cum[:, :2]).sum(axis=1)
        bad = rng.random(len(order)) < both_bad
        for t in range(len(order)):
            choice = "both_bad" if bad[t] else CHOICE_OF[int(o[t])]
            rows.append((steps, names[a[t]], names[b[t]], choice, f"voter{v}",
                         f"prompt{(v + t) % n_prompts}"))
    return pd.DataFrame(rows, columns=["steps", "method_a", "method_b", "choice",
                                       "voter_hash", "prompt"])


def population_values(strengths: dict[str, float], taste_sd: float, log_tie: float,
                      position: float, draws: int = 100_000, seed: int = 12345) -> dict:
    """Win rates (ties half, sides balanced) and Davidson strengths of the whole population."""
    names = list(strengths)
    k = len(names)
    rng = np.random.default_rng(seed)
    s = np.array([strengths[m] for m in names]) + rng.normal(0.0, taste_sd, size=(draws, k))
    theta = np.concatenate([s, np.full((draws, 1), position), np.full((draws, 1), log_tie)], 1)
    prob = probabilities(theta, k).mean(axis=0).reshape(k, k, 3)  # expected outcome shares
    win = {}
    for a in range(k):
        for b in range(a + 1, k):
            pa = (prob[a, b, LEFT] + prob[b, a, RIGHT]) / 2
            pt = (prob[a, b, TIE] + prob[b, a, TIE]) / 2
            win[(names[a], names[b])] = float(pa + 0.5 * pt)
    counts = prob * 1e7
    for i in range(k):
        counts[i, i] = 0.0
    fit = fit_davidson(counts, ridge=1e-9)
    return {"win_rate": win, "strength": dict(zip(names, fit.strength.tolist())),
            "position": float(fit.position), "log_tie": float(fit.log_tie)}


def coverage(replicates: int = 200, n_voters: int = 20, votes_per_voter: int = 100,
             taste_sd: float = 1.0, strengths: dict[str, float] | None = None,
             log_tie: float = np.log(0.5), position: float = 0.2, n_boot: int = 500,
             level: float = 0.95, seed: int = 0, clusters: tuple[str, ...] = ("voter", "vote"),
             ) -> dict:
    """Share of intervals that cover the population values, per clustering."""
    strengths = strengths or {"m0": 0.0, "m1": 0.5, "m2": 1.0, "m3": 1.5}
    names = list(strengths)
    truth = population_values(strengths, taste_sd, log_tie, position)
    rng = np.random.default_rng(seed)
    hits = {c: {"win_rate": [], "strength": [], "position": []} for c in clusters}
    for r in range(replicates):
        frame = simulate_votes(strengths, n_voters, votes_per_voter, taste_sd, log_tie,
                               position, rng)
        for c in clusters:
            opts = Options(cluster=c, n_boot=n_boot, level=level, seed=seed * 100_003 + r)
            counts, n_groups = group_counts(frame, names, frame.method_a, frame.method_b, opts)
            fit = fit_items(counts, names, opts, "sim")
            lo, hi = fit.interval(level)
            for i, m in enumerate(names):
                hits[c]["strength"].append(lo[i] <= truth["strength"][m] <= hi[i])
            w = bootstrap_weights(n_groups, n_boot, np.random.default_rng(opts.seed + 1))
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    res = win_rate_interval(counts, w, a, b, "tie", level)
                    p = truth["win_rate"][(names[a], names[b])]
                    hits[c]["win_rate"].append(res["ci_low"] <= p <= res["ci_high"])
            sd = fit.boot_position.std(ddof=1)
            q = quantile(level, fit.clusters)
            hits[c]["position"].append(abs(fit.position - truth["position"]) <= q * sd)
    return {"replicates": replicates, "voters": n_voters, "votes_per_voter": votes_per_voter,
            "taste_sd": taste_sd, "level": level, "n_boot": n_boot, "truth": {
                "win_rate": {f"{a}>{b}": v for (a, b), v in truth["win_rate"].items()},
                "strength": truth["strength"], "position": truth["position"]},
            "coverage": {c: {k: float(np.mean(v)) for k, v in h.items()}
                         for c, h in hits.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Coverage of the study's intervals on simulated "
                                "studies with clustered voters")
    p.add_argument("--replicates", type=int, default=200)
    p.add_argument("--voters", type=int, default=20)
    p.add_argument("--votes", type=int, default=100, help="votes per voter")
    p.add_argument("--taste-sd", type=float, default=1.0)
    p.add_argument("--boot", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = coverage(a.replicates, a.voters, a.votes, a.taste_sd, n_boot=a.boot, seed=a.seed)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
