"""User study: config, single-use vote tokens, privacy, concurrency and statistics."""

from __future__ import annotations

import random
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hypersd_core.study.store import (
    CHOICES,
    RESULT_COLUMNS,
    SALT_ENV,
    SALT_FILENAME,
    STUDY_YAML,
    InvalidToken,
    StudyConfig,
    StudyStore,
    bradley_terry,
    pairwise_win_rates,
    resolve_salt,
    results_table,
)

SALT = b"test-salt-0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path):
    s = StudyStore(tmp_path / "votes.db", salt=SALT)
    yield s
    s.close()


def _synthetic(strengths: dict[str, float], n: int, seed: int, tie_p: float = 0.0) -> pd.DataFrame:
    """Votes drawn from a Bradley-Terry model with the given log-strengths."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    rows = []
    for _ in range(n):
        a, b = rng.choice(names, size=2, replace=False)
        p_a = 1.0 / (1.0 + np.exp(strengths[b] - strengths[a]))
        u = rng.random()
        choice = "tie" if u < tie_p else ("A" if rng.random() < p_a else "B")
        rows.append((4, str(a), str(b), choice))
    return pd.DataFrame(rows, columns=["steps", "method_a", "method_b", "choice"])


# --------------------------------------------------------------------- config
def test_shipped_config_loads_and_defaults_match() -> None:
    cfg = StudyConfig.from_yaml(STUDY_YAML)
    assert cfg.methods == StudyConfig().methods
    assert cfg.steps == [1, 2, 4, 8] and len(cfg.prompts) >= 3 and cfg.seeds


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["teacher"]}, "at least 2"),
    ({"methods": ["lcm", "lcm"]}, "duplicates"),
    ({"prompts": []}, "non-empty list"),
    ({"prompts": [""]}, "non-empty strings"),
    ({"steps": [0, 4]}, "steps must hold integers >= 1, got 0"),
    ({"steps": [True]}, "integers"),
    ({"seeds": [-1]}, "seeds must hold integers >= 0"),
    ({"seeds": "0"}, "non-empty list"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_config_yaml_unknown_key(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("methods: [a, b]\nstep: [1]\n")
    with pytest.raises(ValueError, match=r"unknown keys \['step'\]"):
        StudyConfig.from_yaml(p)


def test_salt_file_created_once_0600(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SALT_ENV, raising=False)
    db = tmp_path / "d" / "votes.db"
    s1 = resolve_salt(db)
    path = db.parent / SALT_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_salt(db) == s1 and len(s1) >= 32
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        resolve_salt(db)
    monkeypatch.setenv(SALT_ENV, "an-env-salt-long-enough")
    assert resolve_salt(db) == b"an-env-salt-long-enough"
    monkeypatch.setenv(SALT_ENV, "short")
    with pytest.raises(ValueError, match="at least 16"):
        resolve_salt(db)


# ---------------------------------------------------------------------- store
def test_left_right_order_randomised_and_seedable(store: StudyStore) -> None:
    def orders(seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        return [(p.left, p.right) for p in
                (store.issue_pair("p", 0, 4, ("lcm", "hypersd"), rng=rng) for _ in range(200))]

    o = orders(1)
    assert {("lcm", "hypersd"), ("hypersd", "lcm")} == set(o)
    assert 60 < sum(left == "lcm" for left, _ in o) < 140
    assert orders(1) == o  # same seed, same orders
    with pytest.raises(ValueError, match="distinct"):
        store.issue_pair("p", 0, 4, ("lcm", "lcm"))


def test_next_pair_draws_from_config(store: StudyStore) -> None:
    cfg = StudyConfig()
    rng = random.Random(0)
    pairs = [store.next_pair(cfg, rng) for _ in range(300)]
    assert all(p.left != p.right for p in pairs)
    assert {p.prompt for p in pairs} == set(cfg.prompts)
    assert {p.steps for p in pairs} == set(cfg.steps)
    assert {p.seed for p in pairs} == set(cfg.seeds)
    assert {p.left for p in pairs} | {p.right for p in pairs} == set(cfg.methods)
    assert len({p.token for p in pairs}) == 300


def test_vote_flow_stores_once_and_rejects_replay(store: StudyStore) -> None:
    pair = store.issue_pair("a red handwritten digit 7", 3, 2, ("tcd", "teacher"),
                            rng=random.Random(0))
    assert store.get_pair(pair.token) == pair
    vote = store.record_vote(pair.token, "B", "session-1")
    assert (vote.method_a, vote.method_b) == (pair.left, pair.right)
    assert vote.winner == pair.right
    assert (vote.prompt, vote.seed, vote.steps) == ("a red handwritten digit 7", 3, 2)
    with pytest.raises(InvalidToken, match="already used") as err:
        store.record_vote(pair.token, "A", "session-2")
    assert err.value.reason == "used"
    frame = store.votes_frame()
    assert len(frame) == 1 and frame.choice.tolist() == ["B"]
    assert frame.voter_hash[0] == store.voter_hash("session-1") != "session-1"


def test_forged_token_and_bad_inputs_rejected(store: StudyStore) -> None:
    with pytest.raises(InvalidToken, match="never issued") as err:
        store.record_vote("forged-token", "A", "v")
    assert err.value.reason == "unknown"
    with pytest.raises(InvalidToken, match="never issued"):
        store.get_pair("forged-token")
    pair = store.issue_pair("p", 0, 1, ("lcm", "tcd"))
    msg = r"choice must be one of \['A', 'B', 'tie', 'both_bad'\], got 'left'"
    with pytest.raises(ValueError, match=msg):
        store.record_vote(pair.token, "left", "v")
    with pytest.raises(ValueError, match="voter_id"):
        store.record_vote(pair.token, "A", "")
    # the rejected attempts left the token usable
    assert store.record_vote(pair.token, "both_bad", "v").choice == "both_bad"
    assert len(store.votes_frame()) == 1


def test_choice_check_constraint_in_schema(store: StudyStore) -> None:
    conn = store._conn()
    with pytest.raises(Exception, match="CHECK constraint"):
        conn.execute("INSERT INTO votes (token, prompt, seed, steps, method_a, method_b, "
                     "choice, voter_hash, created_at) VALUES ('t','p',0,1,'a','b','X','h','now')")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_raw_voter_id_never_in_db_files(tmp_path: Path) -> None:
    raw = "alice.secret-voter@example.org"
    s = StudyStore(tmp_path / "votes.db", salt=SALT)
    for choice in CHOICES:
        s.record_vote(s.issue_pair("p", 0, 1, ("lcm", "tcd")).token, choice, raw)

    def blob() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())

    assert raw.encode() not in blob()  # WAL and -shm included while open
    s.export_csv(tmp_path / "votes.csv")
    s.close()
    assert raw.encode() not in blob()
    assert s.voter_hash(raw).encode() in blob()


def test_export_csv_round_trip(store: StudyStore, tmp_path: Path) -> None:
    rng = random.Random(5)
    for i in range(20):
        store.record_vote(store.next_pair(StudyConfig(), rng).token, CHOICES[i % 4], f"v{i % 3}")
    frame = store.votes_frame()
    back = pd.read_csv(store.export_csv(tmp_path / "out" / "votes.csv"))
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)


# ---------------------------------------------------------------- concurrency
@pytest.mark.parametrize("durable", [True, False])
def test_concurrent_votes_exactly_once(tmp_path: Path, capsys, durable: bool) -> None:
    n_threads, per_thread = 16, 50
    s = StudyStore(tmp_path / "votes.db", salt=SALT, durable=durable)
    cfg = StudyConfig()
    used: list[str] = []  # tokens already voted on, for replay attempts
    used_lock = threading.Lock()
    errors: list[BaseException] = []
    replays_rejected = [0]
    vote_start: list[float] = []  # all pairs issued; voting begins
    barrier = threading.Barrier(n_threads, action=lambda: vote_start.append(time.perf_counter()))

    def worker(k: int) -> None:
        try:
            rng = random.Random(k)
            pairs = [s.next_pair(cfg, rng) for _ in range(per_thread)]
            barrier.wait()
            for i, pair in enumerate(pairs):
                s.record_vote(pair.token, CHOICES[(k + i) % 4], f"voter-{k}")
                with used_lock:
                    used.append(pair.token)
                if k % 4 == 0:  # every 4th thread also replays someone else's token
                    with used_lock:
                        victim = used[rng.randrange(len(used))]
                    try:
                        s.record_vote(victim, "A", f"attacker-{k}")
                        errors.append(AssertionError(f"replay of {victim} accepted"))
                    except InvalidToken:
                        with used_lock:
                            replays_rejected[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    frame = s.votes_frame()
    attackers = {s.voter_hash(f"attacker-{k}") for k in range(n_threads)}
    s.close()
    total = n_threads * per_thread
    assert vote_start, errors[:3]
    voting = t1 - vote_start[0]
    with capsys.disabled():
        print(f"\n[study durable={durable}] {n_threads} threads x {per_thread} votes: "
              f"{len(frame)} stored; issue+vote {t1 - t0:.2f}s; voting phase {voting:.2f}s "
              f"= {len(frame) / voting:.0f} votes/s; {replays_rejected[0]} replays rejected")
    assert not errors, errors[:3]
    assert len(frame) == total and frame.token.is_unique and frame.id.is_unique
    assert replays_rejected[0] == (n_threads // 4) * per_thread
    assert not set(frame.voter_hash) & attackers


def test_racing_on_same_tokens_one_winner(store: StudyStore) -> None:
    tokens = [store.issue_pair("p", 0, 1, ("lcm", "tcd")).token for _ in range(30)]
    wins, rejects = [0], [0]
    lock = threading.Lock()

    def racer(k: int) -> None:
        for tok in tokens:
            try:
                store.record_vote(tok, "tie", f"r{k}")
                with lock:
                    wins[0] += 1
            except InvalidToken:
                with lock:
                    rejects[0] += 1

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins[0] == 30 and rejects[0] == 150 and len(store.votes_frame()) == 30


# ----------------------------------------------------------------- statistics
def test_bradley_terry_recovers_known_strengths() -> None:
    true = {"teacher": 1.5, "hypersd": 1.0, "tcd": 0.3, "lcm": -0.5, "broken": -2.3}
    bt = bradley_terry(_synthetic(true, 4000, seed=0))
    assert list(bt.sort_values(ascending=False).index) == list(true)
    centred = np.array(list(true.values())) - np.mean(list(true.values()))
    np.testing.assert_allclose(bt[list(true)].to_numpy(), centred, atol=0.15)
    assert abs(bt.mean()) < 1e-9
    # strength-blind ties (half-wins) shrink the scale but keep the order
    tied = bradley_terry(_synthetic(true, 4000, seed=1, tie_p=0.2))
    assert list(tied.sort_values(ascending=False).index) == list(true)


def test_bradley_terry_finite_without_wins() -> None:
    frame = pd.DataFrame({"steps": 1, "method_a": ["a", "a", "b"], "method_b": ["b", "c", "c"],
                          "choice": ["A", "A", "A"]})  # c never wins
    bt = bradley_terry(frame)
    assert np.isfinite(bt).all() and bt.idxmax() == "a" and bt.idxmin() == "c"
    even = bradley_terry(pd.DataFrame({"steps": 1, "method_a": ["a"], "method_b": ["b"],
                                       "choice": ["tie"]}))
    np.testing.assert_allclose(even.to_numpy(), 0.0, atol=1e-9)


def test_win_rate_ci_contains_true_rate() -> None:
    rng = np.random.default_rng(1)
    n, p = 400, 0.7
    wins = rng.random(n) < p
    frame = pd.DataFrame({"steps": 2, "method_a": "hypersd", "method_b": "lcm",
                          "choice": np.where(wins, "A", "B")})
    pw = pairwise_win_rates(frame, seed=0).set_index(["steps", "method", "opponent"])
    row = pw.loc[(2, "hypersd", "lcm")]
    assert row.ci_low < p < row.ci_high and row.ci_high - row.ci_low < 0.12
    assert row.win_rate == pytest.approx(wins.mean())
    back = pw.loc[("all", "lcm", "hypersd")]
    assert back.win_rate == pytest.approx(1 - row.win_rate)


def test_results_table_counts_ties_half_and_both_bad() -> None:
    frame = pd.DataFrame({
        "steps": [1, 1, 1, 1, 4],
        "method_a": ["x", "y", "x", "x", "x"],
        "method_b": ["y", "x", "y", "y", "y"],
        "choice": ["A", "A", "tie", "both_bad", "B"],
    })
    t = results_table(frame, n_boot=200)
    assert list(t.columns) == RESULT_COLUMNS
    x1 = t[(t.method == "x") & (t.steps == 1)].iloc[0]
    assert (x1.wins, x1.losses, x1.ties, x1.both_bad) == (1, 1, 1, 1)
    assert x1.win_rate == pytest.approx(0.5)  # (1 + 0.5) / 3, both_bad excluded
    xa = t[(t.method == "x") & (t.steps == "all")].iloc[0]
    assert (xa.wins, xa.losses) == (1, 2) and xa.win_rate == pytest.approx(1.5 / 4)
    assert t.equals(results_table(frame, n_boot=200))  # seeded bootstrap
    assert results_table(frame.iloc[:0]).empty
    with pytest.raises(ValueError, match="choices"):
        results_table(frame.assign(choice="left"))
