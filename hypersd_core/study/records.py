"""The user study's records and errors: a shown pair, its provenance, a stored vote, and
the errors a vote can end in. Plain data, no storage (``store.py`` keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class StudyError(Exception):
    """Base class for user-study errors."""


class InvalidToken(StudyError):
    """A vote's token is unknown (forged / never issued) or already used."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "unknown" or "used"


class RateLimited(StudyError):
    """Too many new voters or votes from one network address."""


@dataclass(frozen=True)
class PairContext:
    """Provenance of the pairs a server shows: model, code, adapters per method@steps."""

    base_model: str = ""
    code_version: str = ""
    adapters: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (name, sha256)


@dataclass(frozen=True)
class Pair:
    """One shown pair. ``left``/``right`` and ``seed`` must stay server-side."""

    token: str
    prompt: str
    seed: int
    steps: int
    left: str
    right: str
    seed_slot: int = 0
    steps_left: int = 0
    steps_right: int = 0
    pair_id: int = 0


@dataclass(frozen=True)
class Vote:
    """A stored vote; ``method_a``/``method_b`` are the revealed left/right methods."""

    id: int
    token: str
    prompt: str
    seed_slot: int
    steps: int
    method_a: str
    method_b: str
    choice: str
    voter_hash: str
    voter_kind: str
    created_at: str
    decide_seconds: float

    @property
    def winner(self) -> str | None:
        """The preferred method, or None for 'tie' and 'both_bad'."""
        return {"A": self.method_a, "B": self.method_b}.get(self.choice)
