"""The study's configuration (``assets/study.yaml``), its secrets and its snapshot.

Secrets: one salt per study database (env ``HYPERSD_STUDY_SALT``, else a 0600 file
``study_salt`` beside the DB). Everything secret is derived from it by HMAC with a
purpose label: voter hashes, IP hashes, the voter-cookie signing key and the image seeds.

**Image seeds are secret.** ``seeds`` in study.yaml are *seed slots* (0, 1, ...), used to
cycle and to reanalyse by seed; the seed an image is made with is
``STUDY_SEED_MIN + HMAC(key, prompt, slot) mod (2**63 - STUDY_SEED_MIN)``. Without the
key it is one of about 9.2e18 values, so the public ``/generate`` cannot reproduce a study
image (its seed cannot be guessed, whatever seed range ``/generate`` accepts), and it
never equals a small seed a person would type (all are >= 2**32; ``/generate`` itself
refuses seeds above 2**32 - 1). The seed never leaves the server: the page, the reveal
and the CSV show only the slot.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from hypersd_core import safe_yaml
from hypersd_core.paths import ASSETS

STUDY_YAML = ASSETS / "study.yaml"
SALT_ENV = "HYPERSD_STUDY_SALT"
SALT_FILENAME = "study_salt"
MIN_SALT_CHARS = 16
STUDY_SEED_MIN = 2**32
STUDY_SEED_MAX = 2**63 - 1
SCHEDULES = ("balanced", "active")
CORRECTIONS = ("holm", "bonferroni", "none")
BOTH_BAD_RULES = ("tie", "exclude")


@dataclass(frozen=True)
class Primary:
    """The primary comparisons: ``method`` against each of ``against`` at every step count."""

    method: str
    against: tuple[str, ...]
    correction: str = "holm"


@dataclass(frozen=True)
class Anchor:
    """A reference cell (e.g. the teacher at 25 steps) paired with every method and step."""

    method: str
    steps: int


@dataclass
class StudyConfig:
    """What the study shows and how it counts voters; every pair shares prompt, seed slot
    and step count (anchor pairs: the anchor's own step count on one side)."""

    prompts: list[str] = field(default_factory=lambda: [
        "a red handwritten digit 7", "a blue handwritten digit 3",
        "a green handwritten digit 0", "a yellow handwritten digit 5",
        "a magenta handwritten digit 8", "a cyan handwritten digit 2"])
    methods: list[str] = field(default_factory=lambda: [
        "teacher", "lcm", "tcd", "hypersd", "hypersd-unified"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    primary: Primary | None = None
    anchor: Anchor | None = None
    schedule: str = "balanced"
    both_bad: str = "tie"
    require_login: bool = False
    allow_session: bool = False
    new_voters_per_ip_per_hour: int = 3
    votes_per_ip_per_minute: int = 30
    votes_per_voter: int = 200  # votes one voter (login, cookie or session) may cast in all

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
        if isinstance(self.primary, dict):
            self.primary = _primary(self.primary, self.methods)
        if isinstance(self.anchor, dict):
            self.anchor = _anchor(self.anchor)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("both_bad", self.both_bad, BOTH_BAD_RULES)
        for name in ("require_login", "allow_session"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("new_voters_per_ip_per_hour", "votes_per_ip_per_minute", "votes_per_voter"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

    @classmethod
    def from_yaml(cls, path: str | Path = STUDY_YAML) -> StudyConfig:
        """Load and validate a YAML mapping; absent keys keep their defaults."""
        try:
            data = safe_yaml.load(Path(path).read_text(), str(path)) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ValueError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})"
                             ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; allowed: {', '.join(allowed)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain dict (YAML-safe), for the snapshot next to the database."""
        d = asdict(self)
        if self.primary is not None:
            d["primary"]["against"] = list(self.primary.against)
        return d

    def digest(self) -> str:
        """Short SHA-256 of the configuration: the id of its snapshot."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def write_snapshot(self, folder: str | Path) -> Path:
        """Write ``study_config-<digest>.yaml`` into ``folder`` once; return its path."""
        path = Path(folder) / f"study_config-{self.digest()}.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
            os.replace(tmp, path)
        return path


def _primary(d: dict, methods: list[str]) -> Primary:
    unknown = sorted(set(d) - {"method", "against", "correction"})
    if unknown:
        raise ValueError(f"primary: unknown keys {unknown}; allowed: method, against, correction")
    method, against = d.get("method"), d.get("against")
    if method not in methods:
        raise ValueError(f"primary.method must be one of the study's methods, got {method!r}")
    if isinstance(against, str):
        against = [against]
    if not against or not all(a in methods and a != method for a in against):
        raise ValueError(f"primary.against must list other methods of the study, got {against!r}")
    correction = d.get("correction", "holm")
    _choice("primary.correction", correction, CORRECTIONS)
    return Primary(method, tuple(against), correction)


def _anchor(d: dict) -> Anchor:
    if set(d) != {"method", "steps"} or not isinstance(d["method"], str) \
            or type(d["steps"]) is not int or d["steps"] < 1:
        raise ValueError(f"anchor must be {{method: NAME, steps: N >= 1}}, got {d!r}")
    return Anchor(d["method"], d["steps"])


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_items(name: str, values: object, valid, want: str) -> None:
    """Raise unless ``values`` is a non-empty duplicate-free list of valid items."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name} must be a non-empty list of {want}, got {values!r}")
    for v in values:
        if not valid(v):
            raise ValueError(f"{name} must hold {want}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values!r}")


# -------------------------------------------------------------------- secrets
def resolve_salt(db_path: str | Path) -> bytes:
    """The study's secret: env HYPERSD_STUDY_SALT, else a random one kept next to the DB.

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


def derive_key(salt: bytes, purpose: str) -> bytes:
    """A key for one purpose ('seed', 'voter-cookie', 'ip', ...) from the study salt."""
    return hmac.new(salt, f"hypersd-study|{purpose}".encode(), hashlib.sha256).digest()


def secret_seed(key: bytes, prompt: str, slot: int) -> int:
    """The image seed of a (prompt, seed slot): in [STUDY_SEED_MIN, STUDY_SEED_MAX]."""
    digest = hmac.new(key, f"{slot}|{prompt}".encode(), hashlib.sha256).digest()
    return STUDY_SEED_MIN + int.from_bytes(digest[:8], "big") % (STUDY_SEED_MAX - STUDY_SEED_MIN)
