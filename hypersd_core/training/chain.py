"""Chains of runs (TSCD 8 -> 4 -> 2 -> 1 -> DMD) and the device queue.

A chain is a list of run folders created up front (so every stage is visible at
once); stage i starts from stage i-1's ``final/`` adapter. A driver process
launches them one after another, each only when no other run trains on this
device (one run per device, guarded by a lock file), and stops the chain when a
stage does not finish. A single queued run is a chain of one.

    python -m hypersd_core.training.chain --runs-root runs --preset digits-tscd-k8 --preset digits-tscd-k4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from hypersd_core.filelocks import FileLock
from hypersd_core.models.lora import WEIGHT_NAME
from hypersd_core.paths import ROOT
from hypersd_core.training.config import StageConfig, load_preset
from hypersd_core.training.runs import Run, active_run, launch, list_runs, pid_alive

LOCK_NAME = ".device.lock"
# DMD (rank 16, its own feedback rewards) starts from k=1; the separate feedback stage's
# merged adapter is rank 32 and is its own row (digits-feedback from k=1)
CHAIN_PRESETS = ("digits-tscd-k8", "digits-tscd-k4", "digits-tscd-k2", "digits-tscd-k1",
                 "digits-dmd")


def run_label(cfg: StageConfig) -> str:
    """A short readable label for a stage: its adapter name, else stage (and k)."""
    if cfg.name:
        return cfg.name
    return f"{cfg.stage}-k{cfg.k}" if cfg.stage == "tscd" else cfg.stage


def new_run_dir(runs_root: str | Path, cfg: StageConfig, index: int | None = None) -> Path:
    """A fresh, unused run folder name: ``<time>-<label>`` (plus ``-N`` if taken)."""
    root = Path(runs_root)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{index}-{run_label(cfg)}" if index is not None else f"{stamp}-{run_label(cfg)}"
    path, n = root / base, 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    return inside(root, path)


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, refused (ValueError) unless it is a folder directly in ``root``."""
    root, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved.parent != root:
        raise ValueError(f"run folder {Path(path).name!r} would be outside the runs folder")
    return resolved


def create_chain(stages: list[StageConfig], runs_root: str | Path) -> list[Run]:
    """Create one queued run folder per stage; stage i's ``init_adapter`` is stage i-1's final.

    The first stage keeps its own ``init_adapter`` (empty: start from the base model).
    """
    if not stages:
        raise ValueError("a chain needs at least one stage")
    runs: list[Run] = []
    for i, cfg in enumerate(stages):
        if runs:
            cfg = dataclasses.replace(cfg, init_adapter=str(runs[-1].final_dir / WEIGHT_NAME))
        cfg.validate()
        runs.append(Run.create(new_run_dir(runs_root, cfg, i if len(stages) > 1 else None), cfg))
    return runs


@contextlib.contextmanager
def device_lock(runs_root: str | Path) -> Iterator[None]:
    """Exclusive lock on the device's run queue (a file under ``runs_root``)."""
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / LOCK_NAME):
        yield


def is_live(status: dict) -> bool:
    """Training, being started, or queued with a live driver: it holds its place on the
    device (a queued run whose driver is gone holds nothing until it is resumed)."""
    return status.get("state") in ("queued", "running", "stopping") and (
        pid_alive(status.get("pid")) or pid_alive(status.get("waiter_pid")))


def run_ahead(runs_root: str | Path, run: Run | None = None) -> Run | None:
    """The run that trains before ``run`` (before a new run when None): the one training,
    else the oldest live queued run created before it. Runs start in the order they were
    created, so what Start says about waiting stays true."""
    busy = active_run(runs_root)
    if busy is not None:
        return busy
    created = run.config_path.stat().st_mtime_ns if run is not None else None
    waiting = []
    for other in list_runs(runs_root):
        if run is not None and other.dir == run.dir:
            continue
        st = other.status()
        if st.get("state") != "queued" or not pid_alive(st.get("waiter_pid")):
            continue
        when = other.config_path.stat().st_mtime_ns
        if created is None or when < created:
            waiting.append((when, other))
    return min(waiting, key=lambda w: w[0])[1] if waiting else None


def start_when_free(run: Run, runs_root: str | Path, poll_s: float = 2.0,
                    log: Callable[[str], None] = print) -> subprocess.Popen | None:
    """Wait until no run is ahead of ``run`` under ``runs_root`` (one training, or an
    older one queued), then launch ``run``.

    While waiting, status.json says which run it waits for. Returns None when the
    run was stopped before it could start.
    """
    noted = None
    while True:
        if run.stop_requested() or run.status().get("state") == "stopped":
            run.write_status(state="stopped", waiting_for=None,
                             error="stopped before it started")
            run.stop_path.unlink(missing_ok=True)  # honoured: no stale flag in the folder
            return None
        with device_lock(runs_root):
            busy = run_ahead(runs_root, run)
            if busy is None:
                run.write_status(waiting_for=None)
                return launch(run, resume=run.latest_checkpoint() is not None)
        if busy.dir.name != noted:
            noted = busy.dir.name
            run.write_status(state="queued", waiting_for=noted, waiter_pid=os.getpid())
            log(f"{run.dir.name} waits: run {noted} is ahead of it on this device")
        time.sleep(poll_s)


def drive(runs: list[Run], runs_root: str | Path, poll_s: float = 2.0,
          log: Callable[[str], None] = print) -> list[Run]:
    """Run ``runs`` in order; stop at the first that does not end ``done``.

    The stages after a failed or stopped one are marked stopped (Resume starts them).
    Returns the runs.
    """
    for i, run in enumerate(runs):
        proc = start_when_free(run, runs_root, poll_s, log)
        if proc is not None:
            log(f"started {run.dir.name} (pid {proc.pid})")
            proc.wait()
            run.stop_path.unlink(missing_ok=True)  # the process has ended: a stop flag is spent
        state = run.status().get("state")
        log(f"{run.dir.name}: {state}")
        if state != "done":
            for later in runs[i + 1:]:
                later.write_status(state="stopped", waiting_for=None,
                                   error=f"not started: stage {run.dir.name} ended {state}")
            break
    return runs


def run_chain(stages: list[StageConfig], runs_root: str | Path, poll_s: float = 2.0,
              log: Callable[[str], None] = print) -> list[Run]:
    """Create the chain's run folders and train them in order, in this process."""
    return drive(create_chain(stages, runs_root), runs_root, poll_s, log)


def spawn_driver(runs: list[Run], runs_root: str | Path) -> subprocess.Popen:
    """Drive existing runs from a separate process (survives an app restart)."""
    cmd = [sys.executable, "-m", "hypersd_core.training.chain", "--runs-root", str(runs_root),
           "--drive", *[str(r.dir) for r in runs]]
    log = open(Path(runs_root) / "chains.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(ROOT))
    for run in runs:
        run.write_status(waiter_pid=proc.pid)
    return proc


def waiting_note(run: Run) -> str:
    """Why a queued run has not started, in words ('' when it is not waiting)."""
    status = run.status()
    if status.get("state") != "queued" or pid_alive(status.get("pid")):
        return ""
    if status.get("waiting_for"):
        other = status["waiting_for"]
        if Run(run.dir.parent / other).status().get("state") in ("running", "stopping"):
            return f"waits because run {other} is training on this device"
        return f"waits for run {other}, which is ahead of it in this device's queue"
    if status.get("waiter_pid") and not pid_alive(status.get("waiter_pid")):
        return "queued, but its chain process is gone: press Resume to start it"
    previous = previous_stage(run)
    if previous is not None and previous.status().get("state") != "done":
        return f"waits for the previous stage of its chain, {previous.dir.name}"
    return ""  # nothing to wait for: its process is being started


def previous_stage(run: Run) -> Run | None:
    """The run whose final adapter this run starts from (a chain's previous stage), if any."""
    try:
        init = run.config().init_adapter
    except (OSError, ValueError):
        return None
    if not init:
        return None
    folder = Path(init).parent.parent  # <run>/final/pytorch_lora_weights.safetensors
    return Run(folder) if (folder / "config.yaml").is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train stages one after another.")
    parser.add_argument("--runs-root", default=os.environ.get("HYPERSD_RUNS_DIR", "runs"))
    parser.add_argument("--preset", action="append", default=[],
                        help="stage preset, in chain order (default: the full digits chain)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every stage (e.g. steps=50)")
    parser.add_argument("--drive", nargs="+", help="existing run folders to train in order")
    parser.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.drive:
        runs = drive([Run(d) for d in args.drive], args.runs_root, args.poll)
    else:
        stages = [load_preset(p, args.set) for p in (args.preset or CHAIN_PRESETS)]
        runs = run_chain(stages, args.runs_root, args.poll)
    return 0 if all(r.status().get("state") == "done" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
