"""Training speed of the digits-tscd-k8 preset started from the app vs from the CLI.

    python tests/app/measure_app_training.py STEPS REPS [OUT_DIR]

Both runs train at the same time, so they see the same background load; the app's page
is open in headless Chromium on Train & Monitor, polling the app's run. Prints the final
it/s of each run per repeat, and the load average. Needs Debian's chromium.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[2]))


def final_its(run_dir: Path) -> float:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    return [r["it_s"] for r in records if "it_s" in r][-1]


def load() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def main(steps: int, reps: int, root: Path) -> None:
    import yaml
    from cdp import Chromium

    import app
    from hypersd_core.app.service import AppSettings
    from train_tab import controller as ctl

    os.chdir(HERE.parents[2])
    sets = {"steps": steps, "log_every": 4, "sample_every": 100000, "checkpoint_every": 100000}
    settings = AppSettings.from_env(runs_dir=root / "app-runs", study_db=root / "study.db",
                                    port=7930)
    demo = app.build_demo(settings)
    _, url, _ = demo.launch(**{**app.launch_kwargs(settings), "prevent_thread_lock": True,
                               "quiet": True})
    with Chromium() as browser:
        browser.open(url)
        browser.wait("document.querySelector('#generate-button') !== null", timeout=600)
        browser.click_text("button[role=tab]", "Train & Monitor")
        for rep in range(reps):
            cli_dir = root / f"cli-{rep}"
            cli = subprocess.Popen(
                [sys.executable, "-m", "hypersd_core", "train", "--preset", "digits-tscd-k8",
                 *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
                 "--run-dir", str(cli_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            values = yaml.safe_load(ctl.preset_text("digits-tscd-k8"))
            values.update(sets)
            run, _ = ctl.start(yaml.safe_dump(values), "digits", "", "digits", settings)
            start_load = load()
            while run.status().get("state") not in ("done", "failed", "stopped") or cli.poll() is None:
                time.sleep(2)
            print(json.dumps({"rep": rep, "steps": steps, "cli_it_s": round(final_its(cli_dir), 4),
                              "app_it_s": round(final_its(run.dir), 4), "load_start": start_load,
                              "load_end": load()}), flush=True)
    demo.close()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tempfile.mkdtemp(prefix="app-vs-cli-"))
    main(int(sys.argv[1]), int(sys.argv[2]), out)
