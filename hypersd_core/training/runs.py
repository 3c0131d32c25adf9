"""Run folders: config, status, metrics stream, stop flag, checkpoints, processes.

A run folder (DESIGN.md) holds everything about a run, so a page reload or an app
restart loses nothing. One process owns a run folder at a time: the trainer holds an
exclusive lock on ``LOCK`` (``hypersd_core/filelocks.py``: ``flock`` on POSIX,
``msvcrt`` on Windows; the system drops it when the process ends, also on ``kill -9``),
and a second start or resume is refused naming the holder's PID.
Checkpoints are written to a temp folder, their COMPLETE manifest records the size and
SHA-256 of every file, then they are renamed, and only then are old ones pruned; on
resume a partial or corrupt one is skipped with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from hypersd_core.filelocks import FileLock, is_locked
from hypersd_core.paths import ROOT
from hypersd_core.training.config import StageConfig, load_config_file, save_config

STATES = ("queued", "running", "stopping", "done", "failed", "stopped")
COMPLETE = "COMPLETE"  # marker file written last inside a checkpoint
LOCK = "LOCK"  # flock'ed by the process that owns the run folder; holds its PID


class RunLockedError(RuntimeError):
    """The run folder is owned by another live process."""


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir/LOCK`` (released on exit or kill)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._lock: FileLock | None = None

    @property
    def fd(self) -> int | None:
        return self._lock.fd if self._lock is not None else None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path)
        try:
            lock.acquire()
        except BlockingIOError:
            raise RunLockedError(busy_message(self.path.parent, lock_holder(self.path.parent))) from None
        os.ftruncate(lock.fd, 0)
        os.write(lock.fd, str(os.getpid()).encode())
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> int | None:
    """The PID holding the run folder's lock (0 when it is held but unreadable), or None."""
    path = Path(run_dir) / LOCK
    if not is_locked(path):
        return None
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def busy_message(run_dir: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    return (f"{run_dir} is in use by {who} (it holds the run's lock); stop it with "
            f"`python -m hypersd_core stop {run_dir}` or wait for it to end")


@dataclass
class Run:
    """A run folder."""

    dir: Path

    def __post_init__(self):
        self.dir = Path(self.dir)

    # ---- layout
    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def samples_dir(self) -> Path:
        return self.dir / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    @property
    def log_path(self) -> Path:
        return self.dir / "log.txt"

    @property
    def stop_path(self) -> Path:
        return self.dir / "STOP"

    # ---- ownership
    def lock(self) -> RunLock:
        """Own the folder (RunLockedError naming the holder's PID when another process does)."""
        return RunLock(self.dir).acquire()

    def holder(self) -> int | None:
        """PID of the process that owns the folder now, or None."""
        return lock_holder(self.dir)

    # ---- creation
    @classmethod
    def create(cls, run_dir: str | Path, cfg: StageConfig) -> Run:
        run = cls(Path(run_dir))
        if run.dir.exists() and not run.dir.is_dir():
            raise ValueError(f"--run-dir {run.dir} is a file, not a folder")
        pid = run.holder()
        if pid is not None:
            raise RunLockedError(busy_message(run.dir, pid))
        if run.config_path.exists():
            raise FileExistsError(
                f"{run.dir} already holds a run; resume it with `train --resume {run.dir}` "
                "or choose another --run-dir")
        try:
            run.dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run.config_path)
        except OSError as err:
            raise ValueError(f"cannot write the run folder {run.dir}: "
                             f"{err.strerror or err}") from None
        run.write_status(state="queued", step=0, total=cfg.steps)
        return run

    def config(self) -> StageConfig:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.dir} is not a run folder (no config.yaml)")
        return load_config_file(self.config_path)

    # ---- status
    def status(self) -> dict:
        try:
            status = json.loads(self.status_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"state": "unknown", "step": 0, "total": 0}
        state, pid = status.get("state"), status.get("pid")
        if (state in ("running", "stopping") or (state == "queued" and pid)) and not pid_alive(pid):
            status["state"] = "failed"
            status["error"] = status.get("error") or "the run's process is gone (crashed or killed)"
        return status

    def write_status(self, **fields) -> dict:
        status = {}
        if self.status_path.is_file():
            try:
                status = json.loads(self.status_path.read_text())
            except json.JSONDecodeError:
                status = {}
        status.update(fields, updated=time.time())
        _atomic_write(self.status_path, json.dumps(status, indent=1))
        return status

    # ---- metrics
    def log_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        """Records after byte ``offset`` and the new offset (for incremental polling)."""
        if not self.metrics_path.is_file():
            return [], 0
        with open(self.metrics_path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # ignore a line still being written
        records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return records, offset + end

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past ``after_step`` so a resumed run continues the same curve."""
        records, _ = self.read_metrics()
        kept = [r for r in records if r.get("step", 0) <= after_step]
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # ---- stop flag
    def request_stop(self) -> None:
        """Ask the run to stop: a flag file, plus SIGINT to its process group."""
        self.stop_path.write_text(str(time.time()))
        status = self.status()
        pid = status.get("pid")
        if status.get("state") in ("running", "queued") and pid_alive(pid):
            self.write_status(state="stopping")
            try:  # Windows has no process groups: the flag file alone stops the run there
                if hasattr(os, "killpg"):
                    os.killpg(os.getpgid(pid), signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    # ---- checkpoints
    def checkpoints(self, verify: bool = True) -> list[Path]:
        """Intact checkpoints, oldest first; a partial or corrupt one (a file whose size
        or SHA-256 differs from the COMPLETE manifest) is skipped with a warning naming it.
        ``verify=False`` lists finished ones (with a manifest) without reading their files."""
        if not self.checkpoints_dir.is_dir():
            return []
        valid = []
        for path in sorted(self.checkpoints_dir.glob("step-*"), key=_step_of):
            if path.name.endswith(".tmp"):
                continue
            problem = checkpoint_problem(path, hashes=verify)
            if not problem:
                valid.append(path)
            elif verify:
                warnings.warn(f"skipping incomplete or corrupt checkpoint {path} ({problem})",
                              stacklevel=2)
        return valid

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, step: int, write_fn, keep: int) -> Path:
        """``write_fn(tmp_dir)`` writes the state; then verify, rename, prune."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"step-{step:07d}"
        tmp = self.checkpoints_dir / f"step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_fn(tmp)
        manifest = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                    for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": manifest}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints(verify=False)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(path: Path, hashes: bool = True) -> str:
    """Why a checkpoint is not intact ('' when it is): no or unreadable COMPLETE
    manifest, a missing file, a size or (``hashes``) SHA-256 that differs from it.
    Manifests of older checkpoints hold sizes only; those are checked by size."""
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
        if not isinstance(files, dict) or not files:
            return "empty COMPLETE manifest"
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = entry["size"] if isinstance(entry, dict) else entry
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
            if hashes and isinstance(entry, dict) and file_sha256(file) != entry["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
    except FileNotFoundError:
        return "no COMPLETE manifest (the write was interrupted)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable COMPLETE manifest ({type(err).__name__})"
    return ""


def verify_checkpoint(path: Path) -> bool:
    """True when the COMPLETE manifest exists and every file has its recorded size and SHA-256."""
    return not checkpoint_problem(path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child not yet reaped) is not alive
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def list_runs(root: str | Path) -> list[Run]:
    """Every run folder under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [Run(p.parent) for p in root.glob("*/config.yaml")]
    return sorted(runs, key=lambda r: r.config_path.stat().st_mtime, reverse=True)


def active_run(root: str | Path) -> Run | None:
    """The run currently training under ``root`` (one at a time per device), if any."""
    for run in list_runs(root):
        if run.status().get("state") in ("running", "stopping", "queued") and \
                pid_alive(run.status().get("pid")):
            return run
    return None


def launch(run: Run, resume: bool = False, env: dict | None = None) -> subprocess.Popen:
    """Start the run as its own process (own process group), output to log.txt."""
    pid = run.holder()
    if pid is not None:
        raise RunLockedError(busy_message(run.dir, pid))
    cmd = [sys.executable, "-m", "hypersd_core.training.trainer", "--run-dir", str(run.dir)]
    if resume:
        cmd.append("--resume")
    run.stop_path.unlink(missing_ok=True)
    log = open(run.log_path, "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=str(ROOT))
    run.write_status(state="queued", pid=proc.pid, error=None)
    return proc
