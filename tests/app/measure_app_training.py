"""Training speed of the digits-tscd-k8 preset started from the app vs from the CLI.

    python tests/app/measure_app_training.py STEPS REPS [OUT_DIR]

The runs alternate (CLI, app, CLI, app, ...) on an otherwise idle machine, each alone, so
that both get the same cores: two runs side by side would each start one OpenMP thread
per core and oversubscribe them, which measures the contention, not the app. The app's
page is open in headless Chromium on Train & Monitor, polling the app's run, while its
run trains. Prints each run's it/s over its steps after the first log (model loading and
the first step excluded), the thread count of its process, and the load average, then the
medians. Needs Debian's chromium.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[2]))


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def threads_of(pid: int | None) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, TypeError):
        return None


def wait(poll, pid_of, timeout: float = 1800.0) -> int | None:
    """Poll until done; the process's thread count sampled mid-run."""
    t0, threads = time.time(), None
    while not poll():
        if threads is None and time.time() - t0 > 10:
            threads = threads_of(pid_of())
        if time.time() - t0 > timeout:
            raise TimeoutError("run did not finish")
        time.sleep(1)
    return threads


def main(steps: int, reps: int, root: Path) -> None:
    import yaml
    from cdp import Chromium

    import app
    from hypersd_core.app.service import AppSettings
    from hypersd_core.bench.cpu_share import steady_its
    from train_tab import controller as ctl

    os.chdir(HERE.parents[2])
    sets = {"steps": steps, "log_every": 5, "sample_every": 100000, "checkpoint_every": 100000}
    settings = AppSettings.from_env(runs_dir=root / "app-runs", study_db=root / "study.db",
                                    port=7930)
    demo = app.build_demo(settings)
    _, url, _ = demo.launch(**{**app.launch_kwargs(settings), "prevent_thread_lock": True,
                               "quiet": True})
    results: dict[str, list[float]] = {"cli": [], "app": []}
    with Chromium() as browser:
        browser.open(url)
        browser.wait("document.querySelector('#generate-button') !== null", timeout=600)
        browser.click_text("button[role=tab]", "Train & Monitor")
        for rep in range(reps):
            cli_dir = root / f"cli-{rep}"
            start_load = load()
            cli = subprocess.Popen(
                [sys.executable, "-m", "hypersd_core", "train", "--preset", "digits-tscd-k8",
                 *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
                 "--run-dir", str(cli_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cli_threads = wait(lambda c=cli: c.poll() is not None, lambda c=cli: c.pid)
            values = yaml.safe_load(ctl.preset_text("digits-tscd-k8"))
            values.update(sets)
            run, _ = ctl.start(yaml.safe_dump(values), "digits", "", "digits", settings)
            app_threads = wait(lambda r=run: r.status().get("state") in ("done", "failed", "stopped"),
                               lambda r=run: r.status().get("pid"))
            row = {"rep": rep, "steps": steps, "cli_it_s": round(steady_its(cli_dir), 3),
                   "app_it_s": round(steady_its(run.dir), 3), "cli_threads": cli_threads,
                   "app_threads": app_threads, "load_start": start_load, "load_end": load()}
            results["cli"].append(row["cli_it_s"])
            results["app"].append(row["app_it_s"])
            print(json.dumps(row), flush=True)
    demo.close()
    cli_med, app_med = statistics.median(results["cli"]), statistics.median(results["app"])
    print(json.dumps({"median_cli_it_s": cli_med, "median_app_it_s": app_med,
                      "app_over_cli": round(app_med / cli_med, 3)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tempfile.mkdtemp(prefix="app-vs-cli-"))
    main(int(sys.argv[1]), int(sys.argv[2]), out)
