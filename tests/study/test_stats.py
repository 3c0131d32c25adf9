"""Study statistics on simulated studies: Davidson BT recovery (ties, position), an
independent maximum-likelihood check, interval coverage with clustered voters, Wilson
intervals at small counts, the multiplicity correction, and honest empty cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from hypersd_core.study.bt import counts_tensor, fit_davidson
from hypersd_core.study.config import Primary
from hypersd_core.study.results import analyse, strength_figure
from hypersd_core.study.simulate import coverage, population_values, simulate_votes
from hypersd_core.study.stats import Options, holm, wilson

TRUE = {"m0": 0.0, "m1": 0.5, "m2": 1.0, "m3": 1.5}
LOG_NU = np.log(0.6)


def _codes(frame: pd.DataFrame, names: list[str]):
    pos = {m: i for i, m in enumerate(names)}
    out = frame.choice.map({"A": 0, "B": 1, "tie": 2, "both_bad": 2}).to_numpy()
    return frame.method_a.map(pos).to_numpy(), frame.method_b.map(pos).to_numpy(), out


def _independent_mle(left, right, out, k: int, ridge: float) -> np.ndarray:
    """The same penalised Davidson likelihood, vote by vote, minimised by BFGS."""
    def nll(theta):
        s, h, lnu = theta[:k], theta[k], theta[k + 1]
        el, er = s[left] + h / 2, s[right] - h / 2
        et = lnu + (s[left] + s[right]) / 2
        eta = np.stack([el, er, et], 1)
        lse = np.logaddexp.reduce(eta, axis=1)
        return -(eta[np.arange(len(out)), out] - lse).sum() + ridge / 2 * (theta ** 2).sum()
    res = minimize(nll, np.zeros(k + 2), method="BFGS", options={"gtol": 1e-9})
    return res.x


def test_davidson_fit_equals_independent_mle_and_recovers_truth() -> None:
    names = list(TRUE)
    frame = simulate_votes(TRUE, 20, 100, 0.0, LOG_NU, 0.3, np.random.default_rng(0))
    left, right, out = _codes(frame, names)
    fit = fit_davidson(counts_tensor(left, right, out, 4), ridge=0.01)
    ref = _independent_mle(left, right, out, 4, 0.01)
    s_ref = ref[:4] - ref[:4].mean()
    assert fit.converged
    np.testing.assert_allclose(fit.strength, s_ref, atol=1e-5)
    assert abs(fit.position - ref[4]) < 1e-5 and abs(fit.log_tie - ref[5]) < 1e-5
    truth = np.array(list(TRUE.values())) - np.mean(list(TRUE.values()))
    np.testing.assert_allclose(fit.strength, truth, atol=0.2)
    assert abs(fit.position - 0.3) < 0.2 and abs(fit.log_tie - LOG_NU) < 0.2


def test_davidson_recovers_scale_where_half_wins_shrink_it() -> None:
    """Over 20 replicates: Davidson slope ~1; ties as half-wins (plain BT) shrink it."""
    names, k = list(TRUE), 4
    truth = np.array(list(TRUE.values())) - 0.75
    rng = np.random.default_rng(1)
    dav, half = [], []
    for _ in range(20):
        frame = simulate_votes(TRUE, 20, 100, 0.0, np.log(1.5), 0.0, rng)
        left, right, out = _codes(frame, names)
        dav.append(fit_davidson(counts_tensor(left, right, out, k)).strength)
        # plain BT with a tie as half a win each way = Davidson counts without the tie slot
        c = counts_tensor(left, right, out, k)
        c_half = c.copy()
        c_half[..., 0] += c[..., 2] / 2
        c_half[..., 1] += c[..., 2] / 2
        c_half[..., 2] = 0
        half.append(fit_davidson(c_half).strength)
    slope = lambda s: float(np.mean(s, 0) @ truth / (truth @ truth))  # noqa: E731
    assert 0.93 < slope(dav) < 1.07
    assert slope(half) < 0.85  # the bias the Davidson model removes
    assert np.abs(np.mean(dav, 0) - truth).max() < 0.05


def test_wilson_at_small_counts_and_no_numbers_without_votes() -> None:
    lo, hi = wilson(5, 5, 1.96)
    assert hi == pytest.approx(1.0) and 0.4 < lo < 0.6  # not [1, 1]
    frame = pd.DataFrame({"steps": 1, "method_a": ["a"] * 5, "method_b": ["b"] * 5,
                          "choice": ["A"] * 5, "voter_hash": [f"v{i}" for i in range(5)]})
    res = analyse(frame, ["a", "b", "c"], Options(n_boot=200))
    wr = res.win_rates.iloc[0]
    assert wr.win_rate == 1.0 and wr.ci_high == pytest.approx(1.0) and wr.ci_low < 0.7
    c = res.strengths.set_index("method").loc["c"]
    assert c.n_votes == 0 and pd.isna(c.strength) and c.note == "no votes yet"
    assert np.isfinite(res.strengths.set_index("method").loc[["a", "b"], "strength"]
                       .astype(float)).all()
    assert any("a won every decisive vote" in w for w in res.warnings)
    strength_figure(res.strengths)  # draws with a method without votes


def test_position_term_and_both_bad_rule() -> None:
    rng = np.random.default_rng(2)
    frame = simulate_votes(TRUE, 20, 100, 0.5, LOG_NU, 0.6, rng, both_bad=0.1)
    res = analyse(frame, list(TRUE), Options(n_boot=300))
    pos = res.position.iloc[0]
    assert pos.ci_low < 0.6 < pos.ci_high and pos.ci_low > 0 and pos.left_share > 0.5
    wr = res.win_rates
    assert (wr.both_bad > 0).all() and wr.both_bad_rate.between(0.05, 0.16).all()
    excl = analyse(frame, list(TRUE), Options(n_boot=300, both_bad="exclude")).win_rates
    assert (excl.n < wr.n).all()  # excluded: fewer votes count
    sens = res.sensitivity
    assert {"strength_both_bad_tie", "strength_both_bad_exclude", "both_bad_votes"} <= set(sens)


def test_primary_comparisons_holm() -> None:
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.2])),
                               [0.04, 0.09, 0.09, 0.2])
    frame = simulate_votes({"h": 1.0, "a": 0.0, "b": 0.9}, 20, 60, 0.3, LOG_NU, 0.0,
                           np.random.default_rng(3))
    res = analyse(frame, ["h", "a", "b"], Options(n_boot=300), Primary("h", ("a", "b")))
    p = res.primary.set_index("opponent")
    assert len(p) == 2 and np.allclose(p.ci_level, 1 - 0.05 / 2)
    assert p.loc["a", "significant"] and not p.loc["b", "significant"]
    assert (p.p_adjusted >= p.p_value).all()


def test_population_values_are_consistent() -> None:
    pop = population_values(TRUE, 0.0, LOG_NU, 0.0, draws=10)
    truth = np.array(list(TRUE.values())) - 0.75
    np.testing.assert_allclose(list(pop["strength"].values()), truth, atol=1e-4)
    wide = population_values(TRUE, 1.0, LOG_NU, 0.0, draws=20_000)
    assert wide["win_rate"][("m0", "m3")] > pop["win_rate"][("m0", "m3")]  # tastes blur


def test_interval_coverage_small() -> None:
    """Fast version of the coverage check (the slow one runs 200 replicates)."""
    res = coverage(replicates=12, n_voters=20, votes_per_voter=100, taste_sd=1.0, n_boot=200,
                   seed=7)
    voter, vote = res["coverage"]["voter"], res["coverage"]["vote"]
    assert voter["win_rate"] >= 0.85 and voter["strength"] >= 0.85
    assert vote["strength"] < voter["strength"]  # votes as independent: too narrow


@pytest.mark.slow
def test_interval_coverage_200_replicates() -> None:
    res = coverage(replicates=200, n_voters=20, votes_per_voter=100, taste_sd=1.0, n_boot=500)
    print("\ncoverage (200 replicates, 20 voters x 100 votes, taste sd 1.0):", res["coverage"])
    assert res["coverage"]["voter"]["win_rate"] >= 0.90
    assert res["coverage"]["voter"]["strength"] >= 0.90


@pytest.mark.slow
def test_davidson_bias_200_replicates() -> None:
    """2,000 votes per replicate, known log-strengths 0 / 0.5 / 1 / 1.5, Davidson ties."""
    names, k = list(TRUE), 4
    truth = np.array(list(TRUE.values())) - 0.75
    rng = np.random.default_rng(5)
    est = []
    for _ in range(200):
        frame = simulate_votes(TRUE, 20, 100, 0.0, LOG_NU, 0.2, rng)
        est.append(fit_davidson(counts_tensor(*_codes(frame, names), k)).strength)
    bias = np.abs(np.mean(est, 0) - truth).max()
    print(f"\nDavidson BT, 200 replicates x 2000 votes: max |bias| {bias:.4f}")
    assert bias < 0.02  # Monte Carlo SE of a mean over 200 replicates is about 0.005
