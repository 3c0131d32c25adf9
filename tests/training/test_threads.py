"""CPU runs share the cores: thread counts from the number of live training processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from hypersd_core.training import threads as th


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_trainer_processes_are_recognised():
    assert th._is_trainer(["python", "-m", "hypersd_core.training.trainer", "--run-dir", "r"])
    assert th._is_trainer(["/usr/bin/python3", "-m", "hypersd_core", "train", "--preset", "x"])
    assert not th._is_trainer(["python", "-m", "hypersd_core", "sample", "--steps", "4"])
    assert not th._is_trainer(["python", "-m", "hypersd_core.training.chain", "--drive", "a"])
    assert not th._is_trainer(["python", "app.py"])


def test_live_trainers_reads_proc(tmp_path):
    for pid, argv in ((11, ["python", "-m", "hypersd_core.training.trainer", "--run-dir", "a"]),
                      (12, ["python", "-m", "hypersd_core", "train", "--preset", "p"]),
                      (13, ["python", "app.py"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (tmp_path / "self").mkdir()  # not a pid
    (tmp_path / "14").mkdir()  # ended while read: no cmdline
    assert th.live_trainers(tmp_path) == 2
    assert th.live_trainers(tmp_path / "missing") == 1 and th.count_trainers(tmp_path / "x") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_started_trainer_is_counted():
    before = th.count_trainers()
    # a process whose command line names the trainer module, as the app's runs do
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "hypersd_core.training.trainer"])
    try:
        deadline = time.time() + 10
        while th.count_trainers() < before + 1 and time.time() < deadline:
            time.sleep(0.1)
        assert th.count_trainers() == before + 1
        assert th.live_trainers() == max(1, before + 1)
    finally:
        proc.kill()
        proc.wait()
    assert th.count_trainers() == before


def test_share_divides_the_cores_and_follows_changes(keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    live = {"n": 1}
    share = th.ThreadShare(0, "cpu", interval_s=10, count=lambda: live["n"], cores=lambda: 4)
    assert share.update(now=0.0) == 4 and torch.get_num_threads() == 4
    live["n"] = 2
    assert share.update(now=5.0) is None  # not looked at again before interval_s
    assert share.update(now=10.0) == 2 and torch.get_num_threads() == 2
    assert share.update(now=20.0) is None  # unchanged
    live["n"] = 9
    assert share.update(now=30.0) == 1  # never 0


def test_a_fixed_count_wins(keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = th.ThreadShare(3, "cpu", count=lambda: 5, cores=lambda: 2)
    assert share.update(now=0.0) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert th.ThreadShare(0, "cpu", count=lambda: 1, cores=lambda: 8).update(now=0.0) == 1


def test_gpu_runs_leave_threads_alone(keep_threads):
    before = torch.get_num_threads()
    assert th.ThreadShare(0, "cuda", count=lambda: 1, cores=lambda: 64).update(now=0.0) is None
    assert torch.get_num_threads() == before


def test_config_rejects_negative_threads():
    from hypersd_core.training.config import load_preset

    with pytest.raises(ValueError, match="cpu_threads"):
        load_preset("digits-tscd-k8", ["cpu_threads=-1"])
