"""One process of a two-process CPU (gloo) run, with a fault injected on one rank.

``python dist_faults.py RANK PLAN.json``: the process imports the trainer once, then
runs each scenario of the plan in a forked child (a fresh process group and
accelerate state per scenario, no second import), and writes what every child did to
``<run>/rank<R>.json``. A child still running ``grace`` seconds after another rank's
child of the same scenario ended (a collective waiting for a process that left), or
past the scenario's timeout, is killed and recorded as ``"hung"``.

Faults (``scenario["fault"]``), each injected on ``scenario["rank"]`` only:

* ``overflow``: a CPU GradScaler on both processes (fp16 loss scaling, emulated); this
  rank's ``at``-th backward gets an infinite output gradient, so its scaled gradients
  overflow while its loss stays finite.
* ``nan_loss``: this rank's per-sample loss has one NaN at the ``at``-th call whose
  gradient is finite (as ``split_nonfinite`` makes it).
* ``stop_file``: this rank sees the STOP file from its ``at``-th look; the other rank
  never does (a node whose view of the shared folder lags).
* ``sigterm``: this rank receives SIGTERM during its ``at``-th loss.
* ``stale_checkpoints``: this rank does not see the newest checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path


def _inject(sc: dict, rank: int) -> dict:
    import accelerate
    import torch

    from hypersd_core.distill import tscd
    from hypersd_core.training import runs

    counts = {"file_sha256": 0}
    real_sha = runs.file_sha256

    def counted_sha(path):
        counts["file_sha256"] += 1
        return real_sha(path)

    runs.file_sha256 = counted_sha
    fault, at, mine = sc.get("fault"), sc.get("at", 2), sc.get("rank") == rank
    if fault == "overflow":
        real_init, real_backward = accelerate.Accelerator.__init__, accelerate.Accelerator.backward
        calls = {"n": 0}

        def init(self, *a, **kw):
            real_init(self, *a, **kw)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

        class Overflow(torch.autograd.Function):  # the loss as is; its gradient overflows
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return g * float("inf")

        def backward(self, loss, **kw):
            calls["n"] += 1
            if mine and calls["n"] == at:
                loss = Overflow.apply(loss)
            return real_backward(self, loss, **kw)

        accelerate.Accelerator.__init__, accelerate.Accelerator.backward = init, backward
    if fault in ("nan_loss", "sigterm"):
        real_loss = tscd.ConsistencyStage.loss
        calls = {"n": 0}

        def loss(self, batch, generator):
            out, logs = real_loss(self, batch, generator)
            calls["n"] += 1
            if mine and calls["n"] == at:
                if fault == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    bad = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
                    bad[0] = True
                    out = torch.where(bad, torch.full_like(out, float("nan")), out)
            return out, logs

        tscd.ConsistencyStage.loss = loss
    if fault == "stop_file":
        looks = {"n": 0}

        def stop_requested(self):
            looks["n"] += 1
            return mine and looks["n"] >= at

        runs.Run.stop_requested = stop_requested
    if fault == "stale_checkpoints" and mine:
        real_list, real_problem = runs.Run.checkpoints, runs.checkpoint_problem

        def newest(run_dir):
            names = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*"))
            return names[-1] if names else None

        def checkpoints(self, verify=True):
            hidden = newest(self.dir)
            return [p for p in real_list(self, verify) if p.name != hidden]

        def checkpoint_problem(path, hashes=True):
            if Path(path).name == newest(Path(path).parent.parent):
                return "no COMPLETE manifest (the write was interrupted)"
            return real_problem(path, hashes)

        runs.Run.checkpoints, runs.checkpoint_problem = checkpoints, checkpoint_problem
    return counts


def _child(sc: dict, rank: int, world: int, port: int) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    counts = _inject(sc, rank)
    from hypersd_core.training.trainer import main

    argv = ["--run-dir", sc["run"]] + (["--resume"] if sc.get("resume") else [])
    code = 1
    try:
        code = main(argv)
    finally:
        Path(sc["run"], f"rank{rank}.json").write_text(json.dumps({"code": code, **counts}))
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _prepare(sc: dict, rank: int) -> None:
    """Copy ``copy_from`` to the scenario's run folder (rank 0; the others wait for it)."""
    if not sc.get("copy_from"):
        return
    dst = Path(sc["run"])
    if rank == 0:
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copytree(sc["copy_from"], tmp, ignore=shutil.ignore_patterns("rank*.json", "LOCK",
                                                                      "weights-rank*"))
        os.replace(tmp, dst)
    deadline = time.time() + 60
    while not dst.exists() and time.time() < deadline:
        time.sleep(0.1)


def main(rank: int, plan_file: str) -> None:
    import torch

    torch.set_num_threads(1)
    import hypersd_core.training.trainer  # noqa: F401  (imported once, shared by the children)

    plan = json.loads(Path(plan_file).read_text())
    for i, sc in enumerate(plan["scenarios"]):
        _prepare(sc, rank)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
                code = _child(sc, rank, plan["world"], plan["port"] + i)
            finally:
                os._exit(code)
        others = [Path(sc["run"], f"rank{r}.json") for r in range(plan["world"]) if r != rank]
        deadline = time.time() + sc.get("timeout", 600)
        while not os.waitpid(pid, os.WNOHANG)[0]:
            # hung: still running long after another process of the scenario ended
            gone = [p.stat().st_mtime for p in others if p.is_file()]
            if time.time() > deadline or (gone and time.time() - min(gone) > plan["grace"]):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                Path(sc["run"], f"rank{rank}.json").write_text(json.dumps({"code": "hung"}))
                break
            time.sleep(0.1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
