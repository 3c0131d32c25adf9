"""Provenance of study pairs: the code version and adapter file hashes. No UI, no torch."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

from hypersd_core.paths import ROOT

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


@functools.cache
def code_version(root: Path = ROOT) -> str:
    """``git`` commit of the code (``+dirty`` if tracked files changed), else the package
    version, else 'unknown'."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return commit[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"hypersd-studio {version('hypersd-studio')}"
    except Exception:  # noqa: BLE001 - not installed as a package
        return "unknown"


@functools.cache
def _hash_files(paths: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in paths:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def weights_hash(path: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of an adapter's weight file(s) (a file, or the
    weight files of a folder in name order); cached by path, size and mtime."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return _hash_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
