"""User study store: config, secret seeds, single-use tokens, voter limits, privacy,
balanced scheduling, provenance and the documented export."""

from __future__ import annotations

import random
import sqlite3
import stat
import threading
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from hypersd_core.study.export import COLUMN_DOCS, EXPORT_COLUMNS
from hypersd_core.study.schedule import cells
from hypersd_core.study.store import (
    CHOICES,
    SALT_ENV,
    SALT_FILENAME,
    STUDY_SEED_MIN,
    STUDY_YAML,
    InvalidToken,
    PairContext,
    RateLimited,
    StudyConfig,
    StudyStore,
    resolve_salt,
)

SALT = b"test-salt-0123456789abcdef"


@pytest.fixture
def store(tmp_path: Path):
    s = StudyStore(tmp_path / "votes.db", salt=SALT)
    yield s
    s.close()


# --------------------------------------------------------------------- config
def test_shipped_config_loads() -> None:
    cfg = StudyConfig.from_yaml(STUDY_YAML)
    assert cfg.methods == StudyConfig().methods and cfg.steps == [1, 2, 4, 8]
    assert cfg.primary.method == "hypersd" and cfg.primary.correction == "holm"
    assert set(cfg.primary.against) <= set(cfg.methods) and cfg.schedule == "balanced"


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["teacher"]}, "at least 2"),
    ({"methods": ["lcm", "lcm"]}, "duplicates"),
    ({"prompts": []}, "non-empty list"),
    ({"steps": [0, 4]}, "steps must hold integers >= 1, got 0"),
    ({"steps": [True]}, "integers"),
    ({"seeds": [-1]}, "seeds must hold integers >= 0"),
    ({"primary": {"method": "nope", "against": ["lcm"]}}, "primary.method"),
    ({"primary": {"method": "lcm", "against": ["lcm"]}}, "primary.against"),
    ({"primary": {"method": "lcm", "against": ["tcd"], "correction": "fdr"}}, "correction"),
    ({"anchor": {"method": "teacher"}}, "anchor must be"),
    ({"schedule": "random"}, "schedule must be one of"),
    ({"both_bad": "loss"}, "both_bad must be one of"),
    ({"require_login": 1}, "require_login must be true or false"),
    ({"new_voters_per_ip_per_hour": 0}, "integer >= 1"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_config_yaml_errors_are_one_line(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("methods: [a, b]\nstep: [1]\n")
    with pytest.raises(ValueError, match=r"unknown keys \['step'\]"):
        StudyConfig.from_yaml(p)
    p.write_text("methods: [a, b\nsteps: [1]\n")
    with pytest.raises(ValueError, match=r"s.yaml: line \d+ not valid YAML"):
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
    monkeypatch.setenv(SALT_ENV, "short")
    with pytest.raises(ValueError, match="at least 16"):
        resolve_salt(db)


# ------------------------------------------------------------- secret seeds
def test_study_seeds_are_secret_and_outside_typed_range(tmp_path: Path) -> None:
    a = StudyStore(tmp_path / "a" / "votes.db", salt=SALT)
    b = StudyStore(tmp_path / "b" / "votes.db", salt=b"another-salt-0123456789")
    cfg = StudyConfig()
    seeds = {(p, s): a.seed_for(p, s) for p in cfg.prompts for s in cfg.seeds}
    assert all(STUDY_SEED_MIN <= v < 2**63 for v in seeds.values())
    assert len(set(seeds.values())) == len(seeds)  # no two slots share a seed
    assert all(b.seed_for(p, s) != v for (p, s), v in seeds.items())  # the salt decides
    pair = a.next_pair(cfg, random.Random(0))
    assert pair.seed == a.seed_for(pair.prompt, pair.seed_slot) != pair.seed_slot
    export = a.export_csv(tmp_path / "e.csv").read_text()
    assert str(pair.seed) not in export and pair.token not in export
    a.close(), b.close()


# ---------------------------------------------------------------------- votes
def test_vote_flow_stores_once_and_rejects_replay(store: StudyStore) -> None:
    pair = store.issue_pair("a red handwritten digit 7", 3, 2, ("tcd", "teacher"),
                            rng=random.Random(0))
    assert store.get_pair(pair.token) == pair
    vote = store.record_vote(pair.token, "B", "cookie:x", "cookie")
    assert (vote.method_a, vote.method_b) == (pair.left, pair.right)
    assert vote.winner == pair.right and vote.voter_kind == "cookie"
    assert vote.decide_seconds >= 0
    with pytest.raises(InvalidToken, match="already used") as err:
        store.record_vote(pair.token, "A", "session-2")
    assert err.value.reason == "used"
    with pytest.raises(InvalidToken, match="never issued"):
        store.record_vote("forged-token", "A", "v")
    with pytest.raises(ValueError, match="voter_kind"):
        store.record_vote(store.issue_pair("p", 0, 1, ("lcm", "tcd")).token, "A", "v", "admin")
    frame = store.votes_frame()
    assert len(frame) == 1 and frame.voter_hash[0] == store.voter_hash("cookie:x")


def test_new_voters_per_ip_are_limited(store: StudyStore) -> None:
    limits = {"new_voters_per_hour": 2, "votes_per_minute": 100}
    tokens = [store.issue_pair("p", 0, 1, ("lcm", "tcd")).token for _ in range(12)]
    stored, refused = 0, 0
    for i, tok in enumerate(tokens[:10]):  # 10 invented voter ids from one address
        try:
            store.record_vote(tok, "A", f"cookie:invented-{i}", "cookie", ip="10.0.0.1", **limits)
            stored += 1
        except RateLimited as err:
            assert "new voters from this network address" in str(err)
            refused += 1
    assert (stored, refused) == (2, 8)
    # a known voter keeps voting; refused tokens stayed usable; another address is separate
    store.record_vote(tokens[2], "B", "cookie:invented-0", "cookie", ip="10.0.0.1", **limits)
    store.record_vote(tokens[3], "B", "cookie:other", "cookie", ip="10.0.0.2", **limits)
    assert store.votes_frame().voter_hash.nunique() == 3
    raw = b"".join(p.read_bytes() for p in store.db_path.parent.iterdir() if p.is_file())
    assert b"10.0.0.1" not in raw  # addresses only as salted hashes
    with pytest.raises(RateLimited, match="too many votes"):
        for tok in tokens[4:]:
            store.record_vote(tok, "A", "cookie:invented-0", "cookie", ip="10.0.0.1",
                              new_voters_per_hour=2, votes_per_minute=4)


def test_raw_voter_id_never_in_db_files(tmp_path: Path) -> None:
    raw = "alice.secret-voter@example.org"
    s = StudyStore(tmp_path / "votes.db", salt=SALT)
    for choice in CHOICES:
        s.record_vote(s.issue_pair("p", 0, 1, ("lcm", "tcd")).token, choice, raw)
    s.export_csv(tmp_path / "votes.csv")
    s.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert raw.encode() not in blob and s.voter_hash(raw).encode() in blob


def test_old_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "votes.db"
    with sqlite3.connect(db) as conn:  # the first schema, with one vote
        conn.executescript(
            "CREATE TABLE pairs (token TEXT PRIMARY KEY, prompt TEXT NOT NULL, seed INTEGER "
            "NOT NULL, steps INTEGER NOT NULL, method_left TEXT NOT NULL, method_right TEXT NOT "
            "NULL, issued_at TEXT NOT NULL, used INTEGER NOT NULL DEFAULT 0);"
            "CREATE TABLE votes (id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL "
            "UNIQUE, prompt TEXT NOT NULL, seed INTEGER NOT NULL, steps INTEGER NOT NULL, "
            "method_a TEXT NOT NULL, method_b TEXT NOT NULL, choice TEXT NOT NULL, voter_hash "
            "TEXT NOT NULL, created_at TEXT NOT NULL);"
            "INSERT INTO pairs VALUES ('t', 'p', 0, 2, 'lcm', 'tcd', '2026-01-01T00:00:00+00:00', 1);"
            "INSERT INTO votes (token, prompt, seed, steps, method_a, method_b, choice, voter_hash,"
            " created_at) VALUES ('t', 'p', 0, 2, 'lcm', 'tcd', 'A', 'h', "
            "'2026-01-01T00:00:05+00:00');")
    s = StudyStore(db, salt=SALT)
    frame = s.votes_frame()
    assert len(frame) == 1 and frame.voter_kind[0] == "session" and frame.steps_a[0] == 2
    s.record_vote(s.next_pair(StudyConfig()).token, "tie", "v")
    assert len(s.pairs_frame()) == 2
    s.close()


# ---------------------------------------------------------------- scheduling
def test_balanced_schedule_over_cells_prompts_seeds_and_sides(store: StudyStore) -> None:
    cfg = StudyConfig.from_yaml(STUDY_YAML)  # 5 methods x 4 step counts = 40 cells
    rng = random.Random(0)
    pairs = [store.next_pair(cfg, rng) for _ in range(500)]
    per_cell = Counter((frozenset([p.left, p.right]), p.steps) for p in pairs)
    assert len(per_cell) == len(cells(cfg)) == 40
    assert min(per_cell.values()) == 12 and max(per_cell.values()) == 13  # 500 / 40 = 12.5
    for cell in per_cell:
        mine = [p for p in pairs if (frozenset([p.left, p.right]), p.steps) == cell]
        a = sorted(cell[0])[0]
        left_a = sum(p.left == a for p in mine)
        assert abs(2 * left_a - len(mine)) <= 1, (cell, left_a, len(mine))  # sides balanced
        prompts = Counter(p.prompt for p in mine)
        assert max(prompts.values()) - min(prompts.get(q, 0) for q in cfg.prompts) <= 1
    assert {p.seed_slot for p in pairs} == set(cfg.seeds)
    assert len({p.token for p in pairs}) == 500


def test_active_schedule_prefers_uncertain_pairs(store: StudyStore) -> None:
    cfg = StudyConfig(methods=["a", "b", "c"], steps=[1], schedule="active")
    rng = random.Random(1)
    for _ in range(30):  # a vs b: lopsided and well measured
        p = store.issue_pair("x", 0, 1, ("a", "b"), rng, config_hash=cfg.digest())
        store.record_vote(p.token, "A" if p.left == "a" else "B", "v")
    picked = [store.next_pair(cfg, rng) for _ in range(6)]
    assert all({p.left, p.right} != {"a", "b"} for p in picked)  # unmeasured cells first


def test_anchor_cells_cross_step_counts(store: StudyStore) -> None:
    cfg = StudyConfig(methods=["teacher", "hypersd"], steps=[1, 4],
                      anchor={"method": "teacher", "steps": 25})
    keys = {c.key for c in cells(cfg)}
    assert "teacher@25|hypersd@1" in keys and "teacher@25|teacher@4" in keys
    pairs = [store.next_pair(cfg, random.Random(2)) for _ in range(len(keys))]
    anchors = [p for p in pairs if p.steps_left != p.steps_right]
    assert len(anchors) == 4 and all(25 in (p.steps_left, p.steps_right) for p in anchors)


# ---------------------------------------------------------------- provenance
def test_export_has_every_field_skipped_pairs_and_docs(store: StudyStore, tmp_path: Path) -> None:
    cfg = StudyConfig(methods=["lcm", "hypersd"], steps=[1, 2])
    ctx = PairContext("digits", "abc123", {"hypersd@1": ("hypersd-k1", "0123456789abcdef"),
                                           "hypersd@2": ("hypersd-k2", "fedcba9876543210")})
    rng = random.Random(3)
    pairs = [store.next_pair(cfg, rng, context=ctx, viewer_id="cookie:v1") for _ in range(6)]
    for p, c in zip(pairs[:4], CHOICES):
        store.record_vote(p.token, c, "cookie:v1", "cookie")
    path = store.export_csv(tmp_path / "out" / "votes.csv")
    df = pd.read_csv(path, keep_default_na=False)
    assert list(df.columns) == EXPORT_COLUMNS and len(df) == 6
    assert (df.status == "voted").sum() == 4 and (df.status == "skipped").sum() == 2
    voted = df[df.status == "voted"]
    for col in ("voted_at", "decide_seconds", "choice", "voter_hash", "voter_kind"):
        assert (voted[col].astype(str) != "").all(), col
    assert set(df.base_model) == {"digits"} and set(df.code_version) == {"abc123"}
    assert set(df.config_hash) == {cfg.digest()} and set(df.methods_rotation) == {"lcm,hypersd"}
    hyper = df.method_left == "hypersd"
    assert set(df.hash_left[hyper]) <= {"0123456789abcdef", "fedcba9876543210"}
    assert (df.hash_left[~hyper] == "").all()  # lcm has no adapter in this context
    assert (store.db_path.parent / f"study_config-{cfg.digest()}.yaml").exists()
    doc = path.with_name("votes.columns.md").read_text()
    assert all(f"`{c}`" in doc for c in COLUMN_DOCS)


# ---------------------------------------------------------------- concurrency
def test_concurrent_votes_exactly_once(tmp_path: Path) -> None:
    n_threads, per_thread = 8, 25
    s = StudyStore(tmp_path / "votes.db", salt=SALT, durable=False)
    cfg = StudyConfig()
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)
    tokens = [[s.next_pair(cfg).token for _ in range(per_thread)] for _ in range(n_threads)]

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for i, tok in enumerate(tokens[k]):
                for t in (tok, tokens[(k + 1) % n_threads][i]):  # raced by a neighbour
                    try:
                        s.record_vote(t, CHOICES[i % 4], f"voter-{k}")
                    except InvalidToken:
                        pass
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    frame = s.votes_frame()
    s.close()
    assert not errors, errors[:3]
    assert len(frame) == n_threads * per_thread and frame.token.is_unique
