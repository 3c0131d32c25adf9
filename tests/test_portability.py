"""Windows portability: every module imports where ``fcntl`` does not exist, and run
folders are still locked there (the lock-file fallback of ``hypersd_core/filelocks.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hypersd_core.paths import ROOT

NO_FCNTL = "import sys; sys.modules['fcntl'] = None  # `import fcntl` raises ImportError\n"


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", NO_FCNTL + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_every_module_imports_without_fcntl():
    res = _run("""
        import importlib, json, pkgutil
        import hypersd_core, train_tab, compare_tab
        names = ["app"]
        for pkg in (hypersd_core, train_tab, compare_tab):
            names += [pkg.__name__] + [m.name for m in pkgutil.walk_packages(
                pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]
        failed = {}
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as err:
                failed[name] = f"{type(err).__name__}: {err}"
        print(json.dumps({"n": len(names), "failed": failed}))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] > 100 and out["failed"] == {}, out["failed"]


def test_run_lock_works_without_fcntl(tmp_path):
    res = _run(f"""
        import os, subprocess, sys
        from pathlib import Path
        from hypersd_core import filelocks
        from hypersd_core.training.runs import RunLock, RunLockedError, lock_holder
        assert filelocks.backend() == "marker", filelocks.backend()
        run = Path({str(tmp_path / 'run')!r})
        assert lock_holder(run) is None
        held = RunLock(run).acquire()
        assert lock_holder(run) == os.getpid()
        try:
            RunLock(run).acquire()
            raise SystemExit("a second lock was granted")
        except RunLockedError as err:
            assert f"process {{os.getpid()}}" in str(err), err
        held.release()
        assert lock_holder(run) is None
        # a holder that died without releasing (kill -9): its marker names a dead PID
        dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
        (run / "LOCK.held").write_text(str(dead.pid))
        assert lock_holder(run) is None
        RunLock(run).acquire().release()
        print("ok")
    """, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_file_lock_excludes_a_second_holder(tmp_path):
    """The platform's own backend (flock here): a second open file cannot take the lock."""
    from hypersd_core.filelocks import FileLock, is_locked

    path = tmp_path / "LOCK"
    first = FileLock(path).acquire()
    assert is_locked(path)
    with pytest.raises(BlockingIOError):
        FileLock(path).acquire()
    first.release()
    assert not is_locked(path)
    with FileLock(path):
        assert is_locked(path)
