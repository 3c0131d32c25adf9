"""Blind pairwise user study: config, vote storage (SQLite, WAL) and statistics.

A shown pair is stored with a server-issued single-use token; a vote redeems the
token once, inside one ``BEGIN IMMEDIATE`` transaction, so a vote is stored once
or not at all. Voter ids are kept only as salted SHA-256 (HMAC) hashes.
The statistics live in ``study_stats.py`` and are re-exported here.
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

import pandas as pd
import yaml

from hypersd_core.paths import ASSETS
from hypersd_core.study.stats import (  # noqa: F401  (re-exported: one study API)
    CHOICES,
    RESULT_COLUMNS,
    VOTE_COLUMNS,
    bootstrap_ci,
    bradley_terry,
    pairwise_win_rates,
    results_table,
)

STUDY_YAML = ASSETS / "study.yaml"
SALT_ENV = "HYPERSD_STUDY_SALT"
SALT_FILENAME = "study_salt"
MIN_SALT_CHARS = 16


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
