"""Blind pairwise user study: config, vote storage (SQLite, WAL) and statistics.

A shown pair is stored with a server-issued single-use token; a vote redeems the
token once, inside one ``BEGIN IMMEDIATE`` transaction, so a vote is stored once
or not at all. Voter ids are kept only as salted SHA-256 (HMAC) hashes.
Statistics are pure functions of :meth:`StudyStore.votes_frame`: win rates with
percentile-bootstrap CIs and Bradley-Terry scores (MM algorithm, Hunter 2004).
No UI and no torch here; the study tab calls this module.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
import sqlite3
import stat
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .paths import ASSETS

STUDY_YAML = ASSETS / "study.yaml"
SALT_ENV = "HYPERSD_STUDY_SALT"
SALT_FILENAME = "study_salt"
MIN_SALT_CHARS = 16
CHOICES = ("A", "B", "tie", "both_bad")
VOTE_COLUMNS = ["id", "token", "prompt", "seed", "steps", "method_a", "method_b",
                "choice", "voter_hash", "created_at"]
RESULT_COLUMNS = ["method", "steps", "wins", "losses", "ties", "both_bad", "win_rate",
                  "ci_low", "ci_high", "bt_score"]


# --------------------------------------------------------------------- config
@dataclass
class StudyConfig:
    """What the study shows: every pair shares prompt, seed and step count."""

    prompts: list[str] = field(default_factory=lambda: [
        "a red handwritten digit 7", "a blue handwritten digit 3",
        "a green handwritten digit 0", "a yellow handwritten digit 5",
        "a magenta handwritten digit 8", "a cyan handwritten digit 2"])
    methods: list[str] = field(default_factory=lambda: [
        "teacher", "lcm", "tcd", "hypersd", "hypersd-unified"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])

    def __post_init__(self) -> None:
        _check_items("prompts", self.prompts, lambda v: isinstance(v, str) and v.strip() != "",
                     "non-empty strings")
        _check_items("methods", self.methods, lambda v: isinstance(v, str) and v.strip() != "",
                     "non-empty strings")
        if len(self.methods) < 2:
            raise ValueError(f"methods needs at least 2 entries to form pairs, "
                             f"got {self.methods!r}")
        for name, low in (("steps", 1), ("seeds", 0)):
            _check_items(name, getattr(self, name),
                         lambda v, low=low: type(v) is int and v >= low, f"integers >= {low}")

    @classmethod
    def from_yaml(cls, path: str | Path = STUDY_YAML) -> StudyConfig:
        """Load and validate a YAML mapping; absent keys keep their defaults."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
        unknown = sorted(set(data) - {"prompts", "methods", "steps", "seeds"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; "
                             "allowed: prompts, methods, steps, seeds")
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain dict, for saving next to results."""
        return asdict(self)


def _check_items(name: str, values: object, valid, want: str) -> None:
    """Raise unless ``values`` is a non-empty duplicate-free list of valid items."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name} must be a non-empty list of {want}, got {values!r}")
    for v in values:
        if not valid(v):
            raise ValueError(f"{name} must hold {want}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values!r}")


def resolve_salt(db_path: str | Path) -> bytes:
    """The voter-hash salt: env HYPERSD_STUDY_SALT, else a random one kept next to the DB.

    The file (``study_salt`` beside the DB) is created once with mode 0600 and
    atomically (link of a finished temp file), so racing processes agree on it.
    """
    env = os.environ.get(SALT_ENV)
    if env is not None:
        if len(env) < MIN_SALT_CHARS:
            raise ValueError(f"{SALT_ENV} must be at least {MIN_SALT_CHARS} characters, "
                             f"got {len(env)}; unset it to use a generated salt file")
        return env.encode()
    path = Path(db_path).resolve().parent / SALT_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".salt-")  # mkstemp: mode 0600
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its salt
        finally:
            os.unlink(tmp)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"salt file {path} is readable by others (mode {oct(mode)}); "
                              f"run: chmod 600 {path}")
    salt = path.read_bytes().strip()
    if len(salt) < MIN_SALT_CHARS:
        raise ValueError(f"salt file {path} is empty or too short; delete it to regenerate "
                         "(existing voter hashes will no longer match)")
    return salt


# ---------------------------------------------------------------------- store
class StudyError(Exception):
    """Base class for user-study errors."""


class InvalidToken(StudyError):
    """A vote's token is unknown (forged / never issued) or already used."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "unknown" or "used"


@dataclass(frozen=True)
class Pair:
    """One shown pair. ``left``/``right`` must stay server-side until the vote."""

    token: str
    prompt: str
    seed: int
    steps: int
    left: str
    right: str


@dataclass(frozen=True)
class Vote:
    """A stored vote; ``method_a``/``method_b`` are the revealed left/right methods."""

    id: int
    token: str
    prompt: str
    seed: int
    steps: int
    method_a: str
    method_b: str
    choice: str
    voter_hash: str
    created_at: str

    @property
    def winner(self) -> str | None:
        """The preferred method, or None for 'tie' and 'both_bad'."""
        return {"A": self.method_a, "B": self.method_b}.get(self.choice)


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pairs (
    token TEXT PRIMARY KEY, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    steps INTEGER NOT NULL, method_left TEXT NOT NULL, method_right TEXT NOT NULL,
    issued_at TEXT NOT NULL, used INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)),
    CHECK (method_left <> method_right));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE REFERENCES pairs(token),
    prompt TEXT NOT NULL, seed INTEGER NOT NULL, steps INTEGER NOT NULL,
    method_a TEXT NOT NULL, method_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN {CHOICES!r}),
    voter_hash TEXT NOT NULL, created_at TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class StudyStore:
    """Votes in SQLite (WAL, busy_timeout), one connection per thread.

    Safe to share one instance across Gradio's thread pool and across processes.

    Args:
        db_path: SQLite file; its folder is created if missing.
        salt: voter-hash salt; default :func:`resolve_salt` (env, else file by the DB).
        busy_timeout_ms: how long a writer waits for the lock before failing.
        durable: fsync every commit (synchronous=FULL). False uses NORMAL: commits
            stay atomic and survive a process crash, but a power loss may drop the
            latest ones; about 20x the write rate where fsync is slow.
    """

    def __init__(self, db_path: str | Path, salt: bytes | str | None = None,
                 busy_timeout_ms: int = 30_000, durable: bool = True) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        salt = resolve_salt(self.db_path) if salt is None else salt
        self._salt = salt.encode() if isinstance(salt, str) else salt
        if len(self._salt) < MIN_SALT_CHARS:
            raise ValueError(f"salt must be at least {MIN_SALT_CHARS} bytes, got {len(self._salt)}")
        self._busy_ms = busy_timeout_ms
        self._synchronous = "FULL" if durable else "NORMAL"
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StudyError(f"could not enable WAL mode on {self.db_path}")
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version=1; COMMIT;")

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit: transactions are explicit)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=self._busy_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_ms)}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (call once, when no request is running)."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def voter_hash(self, voter_id: str) -> str:
        """Salted SHA-256 (HMAC) of a voter id; the raw id is never stored."""
        if not isinstance(voter_id, str) or not voter_id:
            raise ValueError(f"voter_id must be a non-empty string, got {voter_id!r}")
        return hmac.new(self._salt, voter_id.encode(), hashlib.sha256).hexdigest()

    def issue_pair(self, prompt: str, seed: int, steps: int, methods: tuple[str, str],
                   rng: random.Random | None = None) -> Pair:
        """Store a pair with a fresh single-use token, in random left/right order.

        Args:
            methods: two distinct method names; their order here does not matter.
            rng: source of the order coin flip; default is the OS's CSPRNG.
        """
        a, b = methods
        if a == b:
            raise ValueError(f"a pair needs two distinct methods, got {methods!r}")
        if (rng or secrets.SystemRandom()).random() < 0.5:
            a, b = b, a
        pair = Pair(secrets.token_urlsafe(24), prompt, int(seed), int(steps), a, b)
        self._conn().execute(
            "INSERT INTO pairs (token, prompt, seed, steps, method_left, method_right, "
            "issued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (pair.token, prompt, pair.seed, pair.steps, a, b, _now()))
        return pair

    def next_pair(self, config: StudyConfig, rng: random.Random | None = None) -> Pair:
        """Issue a pair with prompt, seed, steps and two distinct methods drawn from config."""
        rng = rng or secrets.SystemRandom()
        methods = rng.sample(config.methods, 2)
        return self.issue_pair(rng.choice(config.prompts), rng.choice(config.seeds),
                               rng.choice(config.steps), (methods[0], methods[1]), rng=rng)

    def get_pair(self, token: str) -> Pair:
        """The pair behind a token (for regenerating its images); InvalidToken if unknown."""
        row = self._conn().execute(
            "SELECT token, prompt, seed, steps, method_left, method_right FROM pairs "
            "WHERE token = ?", (token,)).fetchone()
        if row is None:
            raise InvalidToken("unknown vote token: it was never issued (forged or mistyped)",
                               "unknown")
        return Pair(*row)

    def record_vote(self, token: str, choice: str, voter_id: str) -> Vote:
        """Redeem a token: mark its pair used and store the vote, atomically.

        Args:
            token: the token of a pair from :meth:`issue_pair`.
            choice: 'A' (left), 'B' (right), 'tie' or 'both_bad'.
            voter_id: e.g. a session or user id; stored only as a salted hash.
        Returns:
            The stored vote, with the revealed method names.
        Raises:
            ValueError: bad choice or voter id. InvalidToken: unknown or used token.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
        if not isinstance(token, str) or not token:
            raise InvalidToken(f"vote token must be a non-empty string, got {token!r}", "unknown")
        voter_hash = self.voter_hash(voter_id)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT prompt, seed, steps, method_left, method_right, used FROM pairs "
                "WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise InvalidToken("unknown vote token: it was never issued "
                                   "(forged or mistyped)", "unknown")
            if row[5]:
                raise InvalidToken("vote token already used: each shown pair takes one vote",
                                   "used")
            conn.execute("UPDATE pairs SET used = 1 WHERE token = ?", (token,))
            created = _now()
            cur = conn.execute(
                "INSERT INTO votes (token, prompt, seed, steps, method_a, method_b, choice, "
                "voter_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token, *row[:5], choice, voter_hash, created))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Vote(cur.lastrowid, token, *row[:5], choice, voter_hash, created)

    def votes_frame(self) -> pd.DataFrame:
        """All votes, oldest first, with columns VOTE_COLUMNS."""
        rows = self._conn().execute(
            f"SELECT {', '.join(VOTE_COLUMNS)} FROM votes ORDER BY id").fetchall()
        return pd.DataFrame(rows, columns=VOTE_COLUMNS)

    def export_csv(self, path: str | Path) -> Path:
        """Write all votes as CSV (via a temp file, then rename); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self.votes_frame().to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path


# ----------------------------------------------------------------- statistics
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
