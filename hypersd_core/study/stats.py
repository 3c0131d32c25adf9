"""User-study statistics, pure functions of a votes frame (``StudyStore.votes_frame()``).

What is estimated, and how (the results view states the same):

* **Strengths** (primary result): Davidson Bradley-Terry log-strengths with a position
  (left/right) term and a tie parameter (:mod:`hypersd_core.study.bt`), fitted **within
  each step count** (centred there: a strength compares methods at that step count only).
  With anchor pairs across step counts (e.g. the teacher at 25 steps against every cell),
  :func:`anchored_strengths` fits ``method@steps`` items on one scale.
* **Intervals** come from a **cluster bootstrap**: whole voters (default) or whole prompts
  are resampled, because one voter's votes are not independent. Strength intervals are
  ``estimate +- t(G-1) * bootstrap SD`` (G clusters). Win-rate intervals are Wilson
  intervals on the effective sample size ``n / design effect`` (design effect = bootstrap
  variance over binomial variance, at least 1), also with the t(G-1) quantile: they stay
  inside [0, 1] and never collapse at 5 wins of 5.
* **Ties** count as ties (Davidson); in win rates a tie is half a win.
* **"Both bad"** rule (primary): a both-bad vote is a tie (no preference between two
  failures). Sensitivity view: both-bad votes excluded. Both-bad rates are reported per pair.
* **Primary comparisons** (named in study.yaml): two-sided tests of win rate = 0.5 with
  Holm's step-down correction, and intervals at the Bonferroni level 1 - alpha/m.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from hypersd_core.study.bt import DEFAULT_RIDGE, LEFT, RIGHT, TIE, fit_davidson

CHOICES = ("A", "B", "tie", "both_bad")
BOTH_BAD_RULES = ("tie", "exclude")
CLUSTERS = ("voter", "prompt", "vote")
CORRECTIONS = ("holm", "bonferroni", "none")
BOTH_BAD = 3  # fourth outcome slot in the count tensors
FEW_VOTES = 10
STRENGTH_COLUMNS = ["steps", "method", "n_votes", "strength", "ci_low", "ci_high", "note"]
WIN_COLUMNS = ["steps", "method", "opponent", "n", "wins", "losses", "ties", "both_bad",
               "win_rate", "ci_low", "ci_high", "design_effect", "clusters",
               "both_bad_rate", "both_bad_low", "both_bad_high", "note"]


@dataclass(frozen=True)
class Options:
    """How the analysis runs."""

    cluster: str = "voter"
    both_bad: str = "tie"
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {list(CLUSTERS)}, got {self.cluster!r}")
        if self.both_bad not in BOTH_BAD_RULES:
            raise ValueError(f"both_bad must be one of {list(BOTH_BAD_RULES)}, "
                             f"got {self.both_bad!r}")
        if not (type(self.n_boot) is int and self.n_boot >= 50):
            raise ValueError(f"n_boot must be an integer >= 50, got {self.n_boot!r}")
        if not 0.5 < self.level < 1:
            raise ValueError(f"level must be in (0.5, 1), got {self.level!r}")


def check_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with steps_a / steps_b / voter_hash / prompt filled in; raises if unusable."""
    missing = {"steps", "method_a", "method_b", "choice"} - set(frame.columns)
    if missing:
        raise ValueError(f"votes frame lacks columns {sorted(missing)}")
    bad = set(frame["choice"]) - set(CHOICES)
    if bad:
        raise ValueError(f"votes frame has choices {sorted(bad)}; allowed {list(CHOICES)}")
    f = frame.copy()
    for col in ("steps_a", "steps_b"):
        f[col] = f[col].fillna(f["steps"]) if col in f else f["steps"]
    f["steps_a"], f["steps_b"] = f["steps_a"].astype(int), f["steps_b"].astype(int)
    if "voter_hash" not in f:
        f["voter_hash"] = "unknown"
    if "prompt" not in f:
        f["prompt"] = ""
    return f


def within_step(frame: pd.DataFrame) -> pd.DataFrame:
    """Votes whose two images share the step count (anchor pairs excluded)."""
    return frame[frame.steps_a == frame.steps_b]


# ----------------------------------------------------------------- intervals
def wilson(k: float | np.ndarray, n: float | np.ndarray, z: float) -> tuple:
    """Wilson score interval for k successes in n (both may be fractional)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def quantile(level: float, clusters: int) -> float:
    """Two-sided critical value: Student t with clusters - 1 df (normal when too few)."""
    q = (1 + level) / 2
    return float(sps.t.ppf(q, clusters - 1)) if clusters >= 3 else float(sps.norm.ppf(q))


def cluster_ids(frame: pd.DataFrame, cluster: str) -> tuple[np.ndarray, int]:
    """Cluster index per vote and the number of clusters."""
    if cluster == "vote":
        return np.arange(len(frame)), len(frame)
    codes, uniques = pd.factorize(frame["voter_hash" if cluster == "voter" else "prompt"])
    return codes, len(uniques)


def bootstrap_weights(n_groups: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_groups) multiplicities of a with-replacement resample of the groups."""
    if n_groups == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(float)


def outcome_codes(frame: pd.DataFrame) -> np.ndarray:
    """LEFT / RIGHT / TIE / BOTH_BAD per vote (method_a is the left image)."""
    return frame["choice"].map({"A": LEFT, "B": RIGHT, "tie": TIE, "both_bad": BOTH_BAD}
                               ).to_numpy(dtype=int)


def group_counts(frame: pd.DataFrame, items: list[str], item_a: pd.Series, item_b: pd.Series,
                 opts: Options) -> tuple[np.ndarray, int]:
    """Counts (G, k, k, 4) per cluster [left item, right item, outcome incl. both-bad]."""
    pos = {m: i for i, m in enumerate(items)}
    keep = item_a.isin(pos).to_numpy() & item_b.isin(pos).to_numpy()
    f = frame[keep]
    g, n_groups = cluster_ids(f, opts.cluster)
    out = np.zeros((max(n_groups, 1), len(items), len(items), 4))
    np.add.at(out, (g, item_a[keep].map(pos).to_numpy(int), item_b[keep].map(pos).to_numpy(int),
                    outcome_codes(f)), 1.0)
    return out, n_groups


def as_davidson(counts4: np.ndarray, rule: str) -> np.ndarray:
    """Fold both-bad votes into ties ('tie') or drop them ('exclude')."""
    out = counts4[..., :3].copy()
    if rule == "tie":
        out[..., TIE] += counts4[..., BOTH_BAD]
    return out


# ----------------------------------------------------------------- strengths
@dataclass
class Fitted:
    """Strengths and position term of one set of items, with bootstrap draws."""

    items: list[str]
    n_votes: np.ndarray
    strength: np.ndarray
    position: float
    log_tie: float
    boot_strength: np.ndarray
    boot_position: np.ndarray
    clusters: int
    warnings: list[str] = field(default_factory=list)

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        half = quantile(level, self.clusters) * self.boot_strength.std(axis=0, ddof=1)
        return self.strength - half, self.strength + half


def fit_items(counts4: np.ndarray, items: list[str], opts: Options, label: str,
              rule: str | None = None) -> Fitted:
    """Davidson fit of the pooled counts plus a cluster-bootstrap of it."""
    rule = rule or opts.both_bad
    pooled = as_davidson(counts4.sum(axis=0), rule)
    k = len(items)
    n_votes = pooled.sum(axis=(1, 2)) + pooled.sum(axis=(0, 2))
    rng = np.random.default_rng(opts.seed)
    w = bootstrap_weights(counts4.shape[0], opts.n_boot, rng)
    act = np.flatnonzero(n_votes > 0)  # items without votes are not fitted (no number)
    sub = as_davidson(counts4, rule)[:, act][:, :, act]
    boot = np.einsum("bg,gijo->bijo", w, sub)
    point = fit_davidson(sub.sum(axis=0), ridge=opts.ridge) if len(act) else None
    draws = fit_davidson(boot, ridge=opts.ridge) if len(act) else None
    strength = np.full(k, np.nan)
    boot_strength = np.full((opts.n_boot, k), np.nan)
    if point is None:
        return Fitted(items, n_votes, strength, float("nan"), float("nan"), boot_strength,
                      np.full(opts.n_boot, np.nan), 1, [])
    strength[act] = point.strength
    boot_strength[:, act] = draws.strength
    warn = []
    if not bool(point.converged):
        warn.append(f"{label}: the strength fit did not converge; treat its numbers as unreliable")
    bad = 1 - draws.converged.mean()
    if bad > 0.01:
        warn.append(f"{label}: {bad:.0%} of bootstrap fits did not converge")
    warn += _graph_warnings(pooled, items, n_votes, label)
    clusters = int((counts4.sum(axis=(1, 2, 3)) > 0).sum())
    if clusters < 2 and n_votes.sum() > 0:
        warn.append(f"{label}: votes from one {opts.cluster} only: no interval can be estimated")
    return Fitted(items, n_votes, strength, float(point.position), float(point.log_tie),
                  boot_strength, draws.position, max(clusters, 1), warn)


def _graph_warnings(pooled: np.ndarray, items: list[str], n_votes: np.ndarray,
                    label: str) -> list[str]:
    """Disconnected comparisons and methods that won or lost every decisive vote."""
    k = len(items)
    games = pooled.sum(axis=-1)
    adj = (games + games.T) > 0
    voted = [i for i in range(k) if n_votes[i] > 0]
    out = []
    if voted:
        seen, stack = {voted[0]}, [voted[0]]
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(adj[i]):
                if j not in seen:
                    seen.add(int(j))
                    stack.append(int(j))
        apart = [items[i] for i in voted if i not in seen]
        if apart:
            out.append(f"{label}: {', '.join(apart)} never compared (directly or through others) "
                       f"with {items[voted[0]]}: their strengths are not comparable")
    wins = pooled[:, :, LEFT].sum(axis=1) + pooled[:, :, RIGHT].sum(axis=0)
    losses = pooled[:, :, RIGHT].sum(axis=1) + pooled[:, :, LEFT].sum(axis=0)
    for i in voted:
        if wins[i] + losses[i] > 0 and (wins[i] == 0 or losses[i] == 0):
            what = "won" if losses[i] == 0 else "lost"
            out.append(f"{label}: {items[i]} {what} every decisive vote ({int(wins[i] + losses[i])}):"
                       " its strength is bounded only by the prior")
    return out


def strengths_table(fits: dict[int, Fitted], level: float) -> pd.DataFrame:
    """One row per step count and method; methods without votes get no number."""
    rows = []
    for steps, fit in fits.items():
        lo, hi = fit.interval(level)
        for i, m in enumerate(fit.items):
            n = int(fit.n_votes[i])
            if n == 0:
                rows.append((steps, m, 0, pd.NA, pd.NA, pd.NA, "no votes yet"))
                continue
            note = "few votes" if n < FEW_VOTES else ""
            rows.append((steps, m, n, float(fit.strength[i]), float(lo[i]), float(hi[i]), note))
    return pd.DataFrame(rows, columns=STRENGTH_COLUMNS)


def position_table(fits: dict, counts: dict, level: float) -> pd.DataFrame:
    """Per step count: the position term h (log-odds for the left image) and the share of
    decisive votes that went to the left image."""
    rows = []
    for steps, fit in fits.items():
        c = counts[steps].sum(axis=0)
        left, right = c[..., LEFT].sum(), c[..., RIGHT].sum()
        if left + right == 0:
            continue
        half = quantile(level, fit.clusters) * fit.boot_position.std(ddof=1)
        lo, hi = wilson(left, left + right, quantile(level, fit.clusters))
        rows.append((steps, fit.position, fit.position - half, fit.position + half,
                     int(left + right), left / (left + right), lo, hi))
    return pd.DataFrame(rows, columns=["steps", "position_h", "ci_low", "ci_high", "decisive",
                                       "left_share", "left_low", "left_high"])


# ----------------------------------------------------------------- win rates
def pair_scores(counts4: np.ndarray, i: int, j: int, rule: str) -> tuple:
    """For i against j (either side): wins, losses, ties, both-bad (leading axes kept)."""
    c = counts4[..., i, j, :] + counts4[..., j, i, :][..., [RIGHT, LEFT, TIE, BOTH_BAD]]
    wins, losses, ties, bb = c[..., LEFT], c[..., RIGHT], c[..., TIE], c[..., BOTH_BAD]
    return wins, losses, ties, bb


def win_rate_interval(counts4: np.ndarray, w: np.ndarray, i: int, j: int, rule: str,
                      level: float) -> dict:
    """Head-to-head win rate of i against j (ties half) with a cluster-adjusted Wilson CI."""
    wins, losses, ties, bb = pair_scores(counts4, i, j, rule)
    ties_used = ties + (bb if rule == "tie" else 0)
    n_g = wins + losses + ties_used
    s_g = wins + 0.5 * ties_used
    n, s = n_g.sum(), s_g.sum()
    clusters = int((n_g > 0).sum())
    out = {"n": int(round(n)), "wins": int(wins.sum()), "losses": int(losses.sum()),
           "ties": int(ties.sum()), "both_bad": int(bb.sum()), "clusters": clusters}
    total = n + (0 if rule == "tie" else bb.sum())
    z = quantile(level, clusters)
    if total > 0:
        out["both_bad_rate"] = bb.sum() / total
        out["both_bad_low"], out["both_bad_high"] = wilson(bb.sum(), total, z)
    if n == 0:
        return out | {"note": "no votes yet"}
    p = s / n
    deff = 1.0
    if clusters >= 2:
        bn, bs = w @ n_g, w @ s_g
        ok = bn > 0
        var_boot = np.var(bs[ok] / bn[ok], ddof=1)
        p_t = (s + z * z / 2) / (n + z * z)  # away from 0 / 1 for the binomial variance
        deff = max(1.0, float(var_boot / (p_t * (1 - p_t) / n)))
    lo, hi = wilson(s, n, z) if deff == 1.0 else wilson(p * n / deff, n / deff, z)
    note = "few votes" if n < FEW_VOTES else ""
    if clusters < 2:
        note = (note + "; " if note else "") + "one cluster: votes treated as independent"
    return out | {"win_rate": p, "ci_low": lo, "ci_high": hi, "design_effect": deff,
                  "note": note, "se": np.sqrt(p_t * (1 - p_t) / n * deff) if clusters >= 2
                  else np.sqrt(max(p * (1 - p), 0.25 / n) / n)}


def win_rates_table(counts: dict[int, np.ndarray], weights: dict[int, np.ndarray],
                    items: list[str], opts: Options, level: float | None = None) -> pd.DataFrame:
    """Every pair of methods at every step count (head to head, never against a field)."""
    level = level or opts.level
    rows = []
    for steps, c in counts.items():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                r = win_rate_interval(c, weights[steps], a, b, opts.both_bad, level)
                if r["n"] == 0 and r["both_bad"] == 0:
                    continue
                rows.append({"steps": steps, "method": items[a], "opponent": items[b]} | r)
    frame = pd.DataFrame(rows, columns=WIN_COLUMNS)
    return frame


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    m = len(p)
    adj = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adj[idx] = running
    return adj
