"""User-study statistics, pure functions of ``StudyStore.votes_frame()``: pairwise win
rates with percentile-bootstrap CIs and Bradley-Terry scores (MM algorithm, Hunter 2004)."""

from __future__ import annotations

import numpy as np
import pandas as pd

CHOICES = ("A", "B", "tie", "both_bad")
VOTE_COLUMNS = ["id", "token", "prompt", "seed", "steps", "method_a", "method_b",
                "choice", "voter_hash", "created_at"]
RESULT_COLUMNS = ["method", "steps", "wins", "losses", "ties", "both_bad", "win_rate",
                  "ci_low", "ci_high", "bt_score"]


def _check_frame(frame: pd.DataFrame) -> None:
    missing = {"steps", "method_a", "method_b", "choice"} - set(frame.columns)
    if missing:
        raise ValueError(f"votes frame lacks columns {sorted(missing)}")
    bad = set(frame["choice"]) - set(CHOICES)
    if bad:
        raise ValueError(f"votes frame has choices {sorted(bad)}; allowed {list(CHOICES)}")


def _outcomes(frame: pd.DataFrame, method: str) -> pd.Series:
    """For each vote involving ``method``: 'win', 'loss', 'tie' or 'both_bad'."""
    f = frame[(frame.method_a == method) | (frame.method_b == method)]
    won = ((f.choice == "A") & (f.method_a == method)) | (
        (f.choice == "B") & (f.method_b == method))
    out = np.where(f.choice.isin(["tie", "both_bad"]), f.choice, np.where(won, "win", "loss"))
    return pd.Series(out, index=f.index, dtype=object)


def _scores(outcomes: pd.Series) -> np.ndarray:
    """1 per win, 0.5 per tie, 0 per loss; 'both_bad' votes are dropped."""
    kept = outcomes[outcomes != "both_bad"]
    return kept.map({"win": 1.0, "tie": 0.5, "loss": 0.0}).to_numpy(dtype=float)


def bootstrap_ci(scores: np.ndarray, generator: np.random.Generator, n_boot: int = 1000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``scores`` (NaNs when empty)."""
    if len(scores) == 0:
        return float("nan"), float("nan")
    idx = generator.integers(0, len(scores), size=(n_boot, len(scores)))
    means = scores[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bradley_terry(frame: pd.DataFrame, methods: list[str] | None = None, prior: float = 1.0,
                  tol: float = 1e-10, max_iter: int = 10_000) -> pd.Series:
    """Bradley-Terry log-strengths by the MM algorithm (Hunter 2004, eq. 3).

    Ties count as half a win each; 'both_bad' is ignored. ``prior`` adds that many
    virtual tied games to every pair, so a method with no wins stays finite.
    Returns log-strengths with mean zero: P(i beats j) = sigmoid(s_i - s_j).
    """
    _check_frame(frame)
    methods = methods or sorted(set(frame.method_a) | set(frame.method_b))
    k = len(methods)
    if k == 0:
        return pd.Series(dtype=float, name="bt_score")
    pos = {m: i for i, m in enumerate(methods)}
    w = np.full((k, k), prior / 2.0)  # w[i, j]: (half-)wins of i over j
    np.fill_diagonal(w, 0.0)
    for a, b, c in frame[["method_a", "method_b", "choice"]].itertuples(index=False):
        if c == "both_bad" or a not in pos or b not in pos:
            continue
        i, j = pos[a], pos[b]
        if c == "A":
            w[i, j] += 1.0
        elif c == "B":
            w[j, i] += 1.0
        else:
            w[i, j] += 0.5
            w[j, i] += 0.5
    n = w + w.T  # games between i and j
    wins = w.sum(axis=1)
    p = np.ones(k)
    for _ in range(max_iter):
        denom = (n / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denom > 0, wins / np.where(denom > 0, denom, 1.0), 1.0)
        new = np.maximum(new, 1e-300)
        new /= np.exp(np.log(new).mean())
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    s = np.log(p)
    return pd.Series(s - s.mean(), index=methods, name="bt_score")


def pairwise_win_rates(frame: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Win rate of each method against each other, per step count and overall ('all').

    Columns: steps, method, opponent, n, win_rate, ci_low, ci_high; ties count
    half, 'both_bad' is excluded from ``n``. CIs: 95% percentile bootstrap.
    """
    _check_frame(frame)
    gen = np.random.default_rng(seed)
    methods = sorted(set(frame.method_a) | set(frame.method_b))
    rows = []
    for scope, sub in _scopes(frame):
        for m in methods:
            for o in methods:
                if m == o:
                    continue
                vs = sub[((sub.method_a == m) & (sub.method_b == o))
                         | ((sub.method_a == o) & (sub.method_b == m))]
                sc = _scores(_outcomes(vs, m))
                if len(sc) == 0:
                    continue
                lo, hi = bootstrap_ci(sc, gen, n_boot)
                rows.append((scope, m, o, len(sc), float(sc.mean()), lo, hi))
    return pd.DataFrame(rows, columns=["steps", "method", "opponent", "n", "win_rate",
                                       "ci_low", "ci_high"])


def _scopes(frame: pd.DataFrame) -> list[tuple[int | str, pd.DataFrame]]:
    """(steps, votes) for each step count present, then ('all', every vote)."""
    out: list[tuple[int | str, pd.DataFrame]] = [
        (int(s), frame[frame.steps == s]) for s in sorted(frame.steps.unique())]
    return out + [("all", frame)]


def results_table(frame: pd.DataFrame, methods: list[str] | None = None, n_boot: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """One row per method and step count (and steps='all'): the study page's table.

    Columns RESULT_COLUMNS. ``win_rate`` is over all decisive votes of the method
    (ties half, 'both_bad' excluded but counted); CIs are 95% percentile bootstrap
    over votes with ``np.random.default_rng(seed)``; ``bt_score`` is the
    :func:`bradley_terry` log-strength within the same step count.
    """
    _check_frame(frame)
    if len(frame) == 0:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    methods = methods or sorted(set(frame.method_a) | set(frame.method_b))
    gen = np.random.default_rng(seed)
    rows = []
    for scope, sub in _scopes(frame):
        bt = bradley_terry(sub, methods)
        for m in methods:
            outcomes = _outcomes(sub, m)
            counts = outcomes.value_counts()
            sc = _scores(outcomes)
            lo, hi = bootstrap_ci(sc, gen, n_boot)
            rate = float(sc.mean()) if len(sc) else float("nan")
            rows.append((m, scope, *(int(counts.get(k, 0)) for k in
                                     ("win", "loss", "tie", "both_bad")),
                         rate, lo, hi, float(bt[m])))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
