"""Two CPU processes over gloo, a fault injected on ONE of them: both processes must do
the same thing (skip the same step, stop at the same step, resume from the same
checkpoint or refuse together) and end with equal weights.

One pair of worker processes (``dist_faults.py``) runs every scenario in turn, each in
a forked child, so the trainer is imported once; the scenarios' outcomes are read by
the tests below. The same worker against the trainer before these fixes hangs or ends
with different weights on the two ranks in every scenario.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import load_file

from hypersd_core.training.config import make_config
from hypersd_core.training.runs import Run

# one pair of processes runs 7 two-process trainings: ~2 CPU-minutes, so `-m slow`
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
STEPS = 4

# name -> (fault, faulty rank, at, extra scenario keys)
SCENARIOS = {
    "plain": {},
    "overflow": {"fault": "overflow", "rank": 1, "at": 2},
    "nan_loss": {"fault": "nan_loss", "rank": 1, "at": 2},
    "stop_file": {"fault": "stop_file", "rank": 0, "at": 3},
    "sigterm": {"fault": "sigterm", "rank": 1, "at": 2},
    # copies of the stopped run: one rank's view lacks its checkpoint; a restart without --resume
    "stale": {"fault": "stale_checkpoints", "rank": 1, "copy_from": "stop_file", "resume": True},
    "restart": {"copy_from": "stop_file"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tiny_sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = make_image_folder(tmp_path_factory.mktemp("data"), 8)
    cfg = make_config({"model": str(tiny_sd15), "data": str(data), "steps": STEPS, "batch_size": 2,
                       "log_every": 1, "sample_every": 100, "checkpoint_every": 2,
                       "lora_rank": 4, "lora_alpha": 4, "max_nonfinite": 3,
                       "sample_prompts": ["a red handwritten digit 1"]})
    scenarios = []
    for name, spec in SCENARIOS.items():
        sc = {**spec, "run": str(root / name), "timeout": 600}
        if "copy_from" in spec:
            sc["copy_from"] = str(root / spec["copy_from"])
        else:
            Run.create(root / name, cfg)
        scenarios.append(sc)
    port = _free_port()
    plan = root / "plan.json"
    plan.write_text(json.dumps({"world": 2, "port": port, "grace": 90, "scenarios": scenarios}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    logs = [open(root / f"worker{r}.log", "w") for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "dist_faults.py"), str(r), str(plan)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in (0, 1)]
    try:
        for p in procs:
            p.wait(timeout=600 * len(scenarios))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return root


def _outcome(root: Path, name: str) -> dict:
    """Exit codes, weight digests and status of one scenario, per rank."""
    run = Run(root / name)
    ranks = []
    for r in (0, 1):
        path = run.dir / f"rank{r}.json"
        info = json.loads(path.read_text()) if path.is_file() else {"code": "no result"}
        digest = run.final_dir / f"weights-rank{r}.sha256"
        info["digest"] = digest.read_text() if digest.is_file() else None
        ranks.append(info)
    log = "".join((root / f"worker{r}.log").read_text()[-3000:] for r in (0, 1))
    return {"ranks": ranks, "status": run.status(), "run": run, "log": log}


def _agree(out: dict, code: int = 0) -> None:
    """Both processes exited with ``code`` and hold the same weights."""
    codes = [r["code"] for r in out["ranks"]]
    assert codes == [code, code], f"exit codes {codes}\n{out['log']}"
    if code == 0:
        digests = [r["digest"] for r in out["ranks"]]
        assert digests[0] is not None and digests[0] == digests[1], digests


def _final_state(run: Run) -> dict:
    ckpt = run.latest_checkpoint()
    return torch.load(ckpt / "trainer.pt", weights_only=True)


def test_overflow_on_one_rank_is_skipped_by_both(outcomes):
    """fp16 loss scaling: rank 1's scaled gradients overflow. Both skip the step and halve
    the scale (the scaler's state is checkpointed); no rank steps on inf."""
    out = _outcome(outcomes, "overflow")
    _agree(out)
    assert out["status"]["state"] == "done"
    records, _ = out["run"].read_metrics()
    scales = [r["fp16_scale"] for r in records if "fp16_scale" in r]
    assert scales == [2.0**15]  # one skipped step, the scale halved once
    assert not any("skipped_nonfinite" in r for r in records)
    lora = load_file(str(out["run"].final_dir / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in lora.values())  # before: NaN on both ranks
    assert _final_state(out["run"])["scaler"]["scale"] == 2.0**15


def test_nonfinite_loss_on_one_rank_is_skipped_by_both(outcomes):
    """Rank 1's loss is NaN with finite gradients (split_nonfinite): both skip the step."""
    out = _outcome(outcomes, "nan_loss")
    _agree(out)
    assert out["status"]["state"] == "done"
    records, _ = out["run"].read_metrics()
    assert [r["step"] for r in records if "skipped_nonfinite" in r] == [2]


def test_stop_file_seen_by_rank0_stops_both(outcomes):
    out = _outcome(outcomes, "stop_file")
    _agree(out)
    assert out["status"]["state"] == "stopped" and out["status"]["step"] == 2
    assert out["run"].latest_checkpoint().name == "step-0000002"


def test_sigterm_to_one_rank_stops_both_cleanly(outcomes):
    """torchrun forwards SIGTERM to its workers; one rank getting it first stops both."""
    out = _outcome(outcomes, "sigterm")
    _agree(out)
    assert out["status"]["state"] == "stopped" and out["status"]["step"] == 2


def test_a_checkpoint_missing_on_one_rank_is_refused_by_both(outcomes):
    out = _outcome(outcomes, "stale")
    _agree(out, code=2)
    status = out["status"]
    assert status["state"] == "failed" and "missing or incomplete on rank(s) [1]" in status["error"]
    assert "\n" not in status["error"]
    records, _ = out["run"].read_metrics()
    assert max(r["step"] for r in records) == 2  # nothing trained past the checkpoint


def test_a_restart_without_resume_continues_and_only_rank0_hashes(outcomes):
    """torchrun --max-restarts runs the same command again: the run continues from its
    checkpoint (not step 0) to the uninterrupted run's weights; rank 0 alone reads the
    checkpoint's SHA-256."""
    out, plain = _outcome(outcomes, "restart"), _outcome(outcomes, "plain")
    _agree(out)
    _agree(plain)
    assert out["status"]["state"] == "done"
    records, _ = out["run"].read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # continued: no second step 1
    assert out["ranks"][0]["digest"] == plain["ranks"][0]["digest"]
    assert out["ranks"][0]["file_sha256"] > 0 and out["ranks"][1]["file_sha256"] == 0
