"""CPU threads shared fairly between the training runs of one machine.

Every PyTorch process starts one OpenMP thread per core. Two CPU runs side by side (the
app's chain and a single run, two CLI runs, ...) then put four busy-waiting threads on
two cores, and each step waits for descheduled threads: measured on a 2-core machine,
two digits-tscd-k8 runs side by side trained at 0.16 it/s each with the default threads
and at 2.6 it/s each with one thread each (3.4 it/s for one run alone with two threads).
So a CPU run, unless told otherwise, takes ``cores // live training runs`` threads and
looks again every ``interval_s`` seconds, when runs start or end.

``cpu_threads`` in a run's config: 0 (auto, as above) or a fixed count. An explicit
``OMP_NUM_THREADS`` in the environment also fixes the count (PyTorch's own rule).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

TRAINER_MARKERS = ("hypersd_core.training.trainer",)  # a chain's driver only waits


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _is_trainer(argv: list[str]) -> bool:
    """A training process: the trainer module, or ``python -m hypersd_core train``."""
    if any(marker in arg for arg in argv for marker in TRAINER_MARKERS):
        return True
    return any(a == "hypersd_core" and argv[i + 1:i + 2] == ["train"]
               for i, a in enumerate(argv))


def live_trainers(proc: Path = Path("/proc")) -> int:
    """Training processes on this machine, this one included (at least 1). Where there is
    no /proc to read, 1."""
    return max(1, count_trainers(proc))


def count_trainers(proc: Path = Path("/proc")) -> int:
    """Training processes whose command line /proc shows (0 where it cannot be read)."""
    count = 0
    try:
        entries = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return 0
    for entry in entries:
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if _is_trainer([a for a in argv if a]):
            count += 1
    return count


class ThreadShare:
    """Call ``update()`` now and then (each step is fine: it reads /proc at most every
    ``interval_s``); it sets torch's thread count and returns it when it changed."""

    def __init__(self, setting: int = 0, device: str = "cpu", interval_s: float = 10.0,
                 count=live_trainers, cores=usable_cores):
        self.fixed = setting or (int(os.environ["OMP_NUM_THREADS"])
                                 if os.environ.get("OMP_NUM_THREADS", "").isdigit() else 0)
        self.active = device == "cpu"
        self.interval_s, self.count, self.cores = interval_s, count, cores
        self.last = -float("inf")
        self.threads: int | None = None

    def wanted(self) -> int:
        if self.fixed:
            return self.fixed
        return max(1, self.cores() // self.count())

    def update(self, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        if not self.active or now - self.last < self.interval_s:
            return None
        self.last = now
        n = self.wanted()
        if n == self.threads:
            return None
        self.threads = n
        torch.set_num_threads(n)
        return n
