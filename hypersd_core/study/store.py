"""Blind pairwise user study: vote storage (SQLite, WAL), scheduling, provenance, limits.

A shown pair is stored with a server-issued single-use token and everything needed to
reanalyse it later (base model, both adapters and their file hashes, code version, the
study-config digest whose snapshot lies next to the DB, methods in rotation, time shown).
A vote redeems the token once, inside one ``BEGIN IMMEDIATE`` transaction, with the voter's
kind (login / cookie / session) and time to decide. Voter ids and IP addresses are stored
only as salted HMAC hashes. New voters per IP hash per hour and votes per IP hash per minute
are capped. No UI and no torch here.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from hypersd_core.study.config import (  # noqa: F401  (re-exported: one study API)
    MIN_SALT_CHARS,
    SALT_ENV,
    SALT_FILENAME,
    STUDY_SEED_MIN,
    STUDY_YAML,
    StudyConfig,
    derive_key,
    resolve_salt,
    secret_seed,
)
from hypersd_core.study.export import BLIND_COLUMNS, EXPORT_COLUMNS, VOTE_COLUMNS, write_export
from hypersd_core.study.records import (  # noqa: F401  (re-exported: one study API)
    InvalidToken,
    Pair,
    PairContext,
    RateLimited,
    StudyError,
    Vote,
)
from hypersd_core.study.schedule import cells, choose_cell, left_first, prompt_and_slot
from hypersd_core.study.stats import CHOICES

VOTER_KINDS = ("login", "cookie", "session")


# columns added after the first schema: part of new tables, added in place to old ones
_ADDED = {
    "pairs": [("seed_slot", "INTEGER NOT NULL DEFAULT 0"), ("steps_left", "INTEGER"),
              ("steps_right", "INTEGER"), ("base_model", "TEXT NOT NULL DEFAULT ''"),
              ("adapter_left", "TEXT NOT NULL DEFAULT ''"),
              ("adapter_right", "TEXT NOT NULL DEFAULT ''"),
              ("hash_left", "TEXT NOT NULL DEFAULT ''"), ("hash_right", "TEXT NOT NULL DEFAULT ''"),
              ("code_version", "TEXT NOT NULL DEFAULT ''"),
              ("config_hash", "TEXT NOT NULL DEFAULT ''"),
              ("methods_rotation", "TEXT NOT NULL DEFAULT ''"),
              ("schedule", "TEXT NOT NULL DEFAULT ''"), ("viewer_hash", "TEXT NOT NULL DEFAULT ''")],
    "votes": [("voter_kind", "TEXT NOT NULL DEFAULT 'session'"), ("decide_seconds", "REAL"),
              ("ip_hash", "TEXT NOT NULL DEFAULT ''")],
}


def _extra(table: str) -> str:
    return "".join(f", {name} {decl}" for name, decl in _ADDED[table])


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pairs (
    token TEXT PRIMARY KEY, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    steps INTEGER NOT NULL, method_left TEXT NOT NULL, method_right TEXT NOT NULL,
    issued_at TEXT NOT NULL, used INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1)){_extra("pairs")},
    CHECK (method_left <> method_right OR steps_left <> steps_right));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE REFERENCES pairs(token),
    prompt TEXT NOT NULL, seed INTEGER NOT NULL, steps INTEGER NOT NULL,
    method_a TEXT NOT NULL, method_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN {CHOICES!r}),
    voter_hash TEXT NOT NULL, created_at TEXT NOT NULL{_extra("votes")});
CREATE TABLE IF NOT EXISTS voters (
    voter_hash TEXT PRIMARY KEY, voter_kind TEXT NOT NULL, ip_hash TEXT NOT NULL,
    first_seen TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS voters_ip ON voters (ip_hash, first_seen);
CREATE INDEX IF NOT EXISTS votes_voter ON votes (voter_hash);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="microseconds")


class StudyStore:
    """Votes in SQLite (WAL, busy_timeout), one connection per thread.

    Safe to share one instance across Gradio's thread pool and across processes.

    Args:
        db_path: SQLite file; its folder is created if missing.
        salt: the study secret; default :func:`resolve_salt` (env, else file by the DB).
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
        self._seed_key = derive_key(self._salt, "seed")
        self._ip_key = derive_key(self._salt, "ip")
        self._busy_ms = busy_timeout_ms
        self._synchronous = "FULL" if durable else "NORMAL"
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StudyError(f"could not enable WAL mode on {self.db_path}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            for table, columns in _ADDED.items():
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            conn.execute("CREATE INDEX IF NOT EXISTS votes_ip ON votes (ip_hash, created_at)")
            conn.execute("PRAGMA user_version=2")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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

    @property
    def salt(self) -> bytes:
        """The study secret (for keys derived from it, e.g. the voter-cookie key)."""
        return self._salt

    def voter_hash(self, voter_id: str) -> str:
        """Salted SHA-256 (HMAC) of a voter id; the raw id is never stored."""
        if not isinstance(voter_id, str) or not voter_id:
            raise ValueError(f"voter_id must be a non-empty string, got {voter_id!r}")
        return hmac.new(self._salt, voter_id.encode(), hashlib.sha256).hexdigest()

    def ip_hash(self, ip: str) -> str:
        """Salted hash of a network address (for rate limits; the address is not stored)."""
        return hmac.new(self._ip_key, ip.encode(), hashlib.sha256).hexdigest()[:32]

    def seed_for(self, prompt: str, slot: int) -> int:
        """The secret image seed of a prompt and seed slot (see study.config)."""
        return secret_seed(self._seed_key, prompt, slot)

    # ------------------------------------------------------------------ pairs
    def issue_pair(self, prompt: str, seed: int, steps: int, methods: tuple[str, str],
                   rng: random.Random | None = None, *, seed_slot: int = 0,
                   sides_steps: tuple[int, int] | None = None, a_left: bool | None = None,
                   context: PairContext | None = None, config_hash: str = "",
                   rotation: str = "", schedule: str = "", viewer_hash: str = "") -> Pair:
        """Store a pair with a fresh single-use token.

        Args:
            methods: two method names (distinct unless ``sides_steps`` differ).
            rng: source of the side coin flip when ``a_left`` is None; default CSPRNG.
            sides_steps: steps of methods[0] / methods[1] (anchor pairs); default both ``steps``.
            a_left: show methods[0] on the left (None: random).
        """
        sa, sb = sides_steps or (int(steps), int(steps))
        if methods[0] == methods[1] and sa == sb:
            raise ValueError(f"a pair needs two distinct methods, got {methods!r}")
        if a_left is None:
            a_left = (rng or secrets.SystemRandom()).random() >= 0.5
        (left, sl), (right, sr) = ((methods[0], sa), (methods[1], sb))
        if not a_left:
            (left, sl), (right, sr) = (right, sr), (left, sl)
        ctx = context or PairContext()
        al, hl = ctx.adapters.get(f"{left}@{sl}", ("", ""))
        ar, hr = ctx.adapters.get(f"{right}@{sr}", ("", ""))
        token = secrets.token_urlsafe(24)
        cur = self._conn().execute(
            "INSERT INTO pairs (token, prompt, seed, steps, method_left, method_right, issued_at, "
            "seed_slot, steps_left, steps_right, base_model, adapter_left, adapter_right, "
            "hash_left, hash_right, code_version, config_hash, methods_rotation, schedule, "
            "viewer_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (token, prompt, int(seed), int(steps), left, right, _now(), int(seed_slot), sl, sr,
             ctx.base_model, al, ar, hl, hr, ctx.code_version, config_hash, rotation, schedule,
             viewer_hash))
        return Pair(token, prompt, int(seed), int(steps), left, right, int(seed_slot), sl, sr,
                    cur.lastrowid)

    def next_pair(self, config: StudyConfig, rng: random.Random | None = None,
                  context: PairContext | None = None, viewer_id: str | None = None) -> Pair:
        """Issue the scheduled pair (config.schedule) with a secret seed; see study.schedule."""
        rng = rng or secrets.SystemRandom()
        all_cells = cells(config)
        index = {frozenset([(c.method_a, c.steps_a), (c.method_b, c.steps_b)]): c
                 for c in all_cells}
        digest = config.digest()
        config.write_snapshot(self.db_path.parent)  # study_config-<digest>.yaml, once
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            shown: dict[str, int] = {}
            a_left: dict[str, int] = {}
            for ml, sl, mr, sr, n in conn.execute(
                    "SELECT method_left, steps_left, method_right, steps_right, COUNT(*) FROM pairs "
                    "WHERE config_hash = ? GROUP BY 1, 2, 3, 4", (digest,)):
                c = index.get(frozenset([(ml, sl), (mr, sr)]))
                if c is not None:
                    shown[c.key] = shown.get(c.key, 0) + n
                    if (ml, sl) == (c.method_a, c.steps_a):
                        a_left[c.key] = a_left.get(c.key, 0) + n
            votes = self._cell_votes(conn, digest, index) if config.schedule == "active" else None
            cell = choose_cell(all_cells, shown, rng, config.schedule, votes)
            times = shown.get(cell.key, 0)
            prompt, slot = prompt_and_slot(config, all_cells.index(cell), times)
            first = left_first((a_left.get(cell.key, 0), times - a_left.get(cell.key, 0)), rng)
            pair = self.issue_pair(
                prompt, self.seed_for(prompt, slot), cell.steps, (cell.method_a, cell.method_b),
                seed_slot=slot, sides_steps=(cell.steps_a, cell.steps_b), a_left=first,
                context=context, config_hash=digest, rotation=",".join(config.methods),
                schedule=config.schedule,
                viewer_hash=self.voter_hash(viewer_id) if viewer_id else "")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return pair

    def _cell_votes(self, conn, digest: str, index: dict) -> dict[str, tuple[float, float]]:
        """(wins of side a + ties / 2, votes) per cell key, for active scheduling."""
        out: dict[str, list[float]] = {}
        for ml, sl, mr, sr, choice, n in conn.execute(
                "SELECT p.method_left, p.steps_left, p.method_right, p.steps_right, v.choice, "
                "COUNT(*) FROM votes v JOIN pairs p ON p.token = v.token "
                "WHERE p.config_hash = ? GROUP BY 1, 2, 3, 4, 5", (digest,)):
            c = index.get(frozenset([(ml, sl), (mr, sr)]))
            if c is None:
                continue
            a_is_left = (ml, sl) == (c.method_a, c.steps_a)
            win_a = {"A": a_is_left, "B": not a_is_left}.get(choice)
            acc = out.setdefault(c.key, [0.0, 0.0])
            acc[0] += n * (0.5 if win_a is None else float(win_a))
            acc[1] += n
        return {k: (v[0], v[1]) for k, v in out.items()}

    def get_pair(self, token: str) -> Pair:
        """The pair behind a token (for rendering its images); InvalidToken if unknown."""
        row = self._conn().execute(
            "SELECT token, prompt, seed, steps, method_left, method_right, seed_slot, "
            "COALESCE(steps_left, steps), COALESCE(steps_right, steps), rowid FROM pairs "
            "WHERE token = ?", (token,)).fetchone()
        if row is None:
            raise InvalidToken("unknown vote token: it was never issued (forged or mistyped)",
                               "unknown")
        return Pair(*row)

    # ------------------------------------------------------------------ votes
    def record_vote(self, token: str, choice: str, voter_id: str, voter_kind: str = "session",
                    ip: str | None = None, new_voters_per_hour: int | None = None,
                    votes_per_minute: int | None = None,
                    votes_per_voter: int | None = None) -> Vote:
        """Redeem a token: mark its pair used and store the vote, atomically.

        Args:
            token: the token of a pair from :meth:`issue_pair` / :meth:`next_pair`.
            choice: 'A' (left), 'B' (right), 'tie' or 'both_bad'.
            voter_id: a login, a signed-cookie id or a session id; stored only as a salted hash.
            voter_kind: 'login', 'cookie' or 'session'.
            ip: the client's address (only its salted hash is stored), for the limits.
            new_voters_per_hour, votes_per_minute: limits per IP hash (None: no limit).
            votes_per_voter: votes one voter may cast in all (None: no cap).
        Raises:
            ValueError: bad choice, kind or voter id. InvalidToken: unknown or used token.
            RateLimited: a limit was reached; nothing is stored and the token stays usable.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {list(CHOICES)}, got {choice!r}")
        if voter_kind not in VOTER_KINDS:
            raise ValueError(f"voter_kind must be one of {list(VOTER_KINDS)}, got {voter_kind!r}")
        if not isinstance(token, str) or not token:
            raise InvalidToken(f"vote token must be a non-empty string, got {token!r}", "unknown")
        voter_hash = self.voter_hash(voter_id)
        ip_hash = self.ip_hash(ip) if ip else ""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT prompt, seed_slot, steps, method_left, method_right, used, issued_at "
                "FROM pairs WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise InvalidToken("unknown vote token: it was never issued "
                                   "(forged or mistyped)", "unknown")
            if row[5]:
                raise InvalidToken("vote token already used: each shown pair takes one vote",
                                   "used")
            self._check_limits(conn, voter_hash, voter_kind, ip_hash, new_voters_per_hour,
                               votes_per_minute, votes_per_voter)
            created = _now()
            decide = (datetime.fromisoformat(created) - datetime.fromisoformat(row[6])
                      ).total_seconds()
            conn.execute("UPDATE pairs SET used = 1 WHERE token = ?", (token,))
            cur = conn.execute(
                "INSERT INTO votes (token, prompt, seed, steps, method_a, method_b, choice, "
                "voter_hash, created_at, voter_kind, decide_seconds, ip_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token, *row[:5], choice, voter_hash, created, voter_kind, decide, ip_hash))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Vote(cur.lastrowid, token, *row[:5], choice, voter_hash, voter_kind, created,
                    decide)

    def _check_limits(self, conn, voter_hash: str, kind: str, ip_hash: str,
                      new_per_hour: int | None, per_minute: int | None,
                      per_voter: int | None = None) -> None:
        """Register a new voter (limited per IP hash); cap votes per IP hash and per voter."""
        if per_voter is not None:
            cast = conn.execute("SELECT COUNT(*) FROM votes WHERE voter_hash = ?",
                                (voter_hash,)).fetchone()[0]
            if cast >= per_voter:
                raise RateLimited(f"this voter has cast {cast} votes, the study's cap per voter; "
                                  "thank you")
        if ip_hash and per_minute is not None:
            recent = conn.execute("SELECT COUNT(*) FROM votes WHERE ip_hash = ? AND created_at > ?",
                                  (ip_hash, _ago(60))).fetchone()[0]
            if recent >= per_minute:
                raise RateLimited(f"too many votes from this network address ({recent} in the "
                                  "last minute); wait a minute")
        if conn.execute("SELECT 1 FROM voters WHERE voter_hash = ?", (voter_hash,)).fetchone():
            return
        if ip_hash and new_per_hour is not None:
            fresh = conn.execute("SELECT COUNT(*) FROM voters WHERE ip_hash = ? AND first_seen > ?",
                                 (ip_hash, _ago(3600))).fetchone()[0]
            if fresh >= new_per_hour:
                raise RateLimited(f"too many new voters from this network address ({fresh} in the "
                                  "last hour): keep voting in the same browser, or try later")
        conn.execute("INSERT INTO voters (voter_hash, voter_kind, ip_hash, first_seen) "
                     "VALUES (?, ?, ?, ?)", (voter_hash, kind, ip_hash, _now()))

    def votes_frame(self) -> pd.DataFrame:
        """All votes, oldest first, with the pair's provenance: columns VOTE_COLUMNS."""
        rows = self._conn().execute(_VOTES_SQL).fetchall()
        return pd.DataFrame(rows, columns=VOTE_COLUMNS)

    def pairs_frame(self) -> pd.DataFrame:
        """Every issued pair (voted or skipped), oldest first: columns EXPORT_COLUMNS."""
        rows = self._conn().execute(_EXPORT_SQL).fetchall()
        return pd.DataFrame(rows, columns=EXPORT_COLUMNS)

    def export_csv(self, path: str | Path) -> Path:
        """Write every pair (skipped ones too) as CSV plus ``<name>.columns.md`` documenting
        the columns (temp file, then rename); return the CSV's path. A pair without a vote
        (skipped, or still on someone's screen) keeps its methods, adapters and hashes
        secret: those cells are empty."""
        frame = self.pairs_frame()
        frame.loc[frame.status != "voted", list(BLIND_COLUMNS)] = ""
        return write_export(frame, Path(path))


_VOTES_SQL = """
SELECT v.id, p.rowid, v.token, v.prompt, p.seed_slot, v.steps,
       COALESCE(p.steps_left, v.steps), COALESCE(p.steps_right, v.steps),
       v.method_a, v.method_b, v.choice, v.voter_hash, v.voter_kind, v.created_at,
       v.decide_seconds, p.base_model, p.config_hash
FROM votes v JOIN pairs p ON p.token = v.token ORDER BY v.id"""

_EXPORT_SQL = """
SELECT p.rowid, CASE WHEN v.id IS NULL THEN 'skipped' ELSE 'voted' END, p.issued_at,
       COALESCE(v.created_at, ''), v.decide_seconds, p.prompt, p.seed_slot, p.steps,
       p.method_left, COALESCE(p.steps_left, p.steps), p.adapter_left, p.hash_left,
       p.method_right, COALESCE(p.steps_right, p.steps), p.adapter_right, p.hash_right,
       COALESCE(v.choice, ''),
       CASE v.choice WHEN 'A' THEN p.method_left WHEN 'B' THEN p.method_right ELSE '' END,
       COALESCE(v.voter_hash, ''), COALESCE(v.voter_kind, ''), p.viewer_hash, p.base_model,
       p.code_version, p.config_hash, p.methods_rotation, p.schedule
FROM pairs p LEFT JOIN votes v ON v.token = p.token ORDER BY p.rowid"""
